"""Start N local ranks, place them on devices, supervise them and stop them: the one place helix starts processes.

Contract
    ``spawn(world, target, args)`` starts ``world`` processes (multiprocessing spawn). Each gets torchrun's
    variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT: a free loopback
    port), ignores Ctrl-C (the launcher owns it), turns SIGTERM into SystemExit so that ``finally`` blocks run,
    ends itself if the launcher dies, and calls ``target(rank, *args)``; its return value is the exit code (an
    exception prints its traceback and exits 1).
    ``init_process_group(device)`` is device placement, from those variables (or torchrun's): ``cuda``: rank r on
    ``cuda:LOCAL_RANK`` with NCCL (asynchronous error handling on, NVLink multicast off); ``cpu``: gloo, the cores
    shared among the local ranks when asked.
    ``supervise(procs, name)`` waits for every rank; the first that fails stops the others and is named on stderr.
    ``stop(procs)`` sends SIGTERM to every live rank and every process below it (Inductor's compile workers),
    then SIGKILL after a grace period.
    ``run_ranks(world, fn, *args)`` calls ``fn(rank, *args)`` inside an initialised process group on each rank and
    returns the results ordered by rank; a failure on any rank stops the others and is raised in the caller with
    that rank's traceback (``helix bench``, ``examples/``, the tests).
    Under torchrun a command does not call ``spawn``: each process is one rank and calls ``init_process_group``.
"""

from __future__ import annotations

import datetime
import io
import os
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

NCCL_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a failed or timed-out collective tears the rank down
            "TORCH_NCCL_DUMP_ON_TIMEOUT": "0",
            "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- one rank --------------------------------------------------------------------------------------------------------
def init_process_group(device: str = "cpu", timeout: float | None = None, share_cores: bool = False) -> None:
    """Join the process group the environment describes (``spawn``'s or torchrun's variables).

    ``device`` "cuda": NCCL, this rank on ``cuda:LOCAL_RANK``; "cpu": gloo. ``share_cores``: on the CPU, give each
    local rank an equal share of the cores (else torch's thread count is left as it is).
    """
    import torch
    import torch.distributed as dist

    kw = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
    if device == "cuda":
        for key, value in NCCL_ENV.items():
            os.environ.setdefault(key, value)
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", 0)))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local), **kw)
        return
    if share_cores:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    dist.init_process_group("gloo", **kw)


def lost_peer(e: BaseException | None) -> bool:
    """Whether ``e`` (or what it wraps) is a failed collective or store: the symptom of a peer going away."""
    import torch.distributed as dist

    while e is not None:
        if isinstance(e, dist.DistError) or any(w in str(e) for w in ("Connection", "gloo", "Gloo", "closed by peer")):
            return True
        e = e.__cause__ or e.__context__ or getattr(e, "inner_exception", None)
    return False


def _terminated(signum, frame):
    raise SystemExit(128 + signum)  # unwinds (the launcher SIGKILLs a rank still blocked after its grace period)


def _exit(code: int) -> None:
    """Leave now, without waiting for non-daemon threads (a compile worker, a dead peer's collective), but after
    multiprocessing's finalizers: queues are flushed and semaphores released rather than reported as leaked."""
    import multiprocessing.util

    sys.stdout.flush()
    sys.stderr.flush()
    try:
        multiprocessing.util._exit_function()
    finally:
        os._exit(code)


def _child(rank: int, world: int, port: int, parent: int, target, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher handles Ctrl-C and stops us with SIGTERM
    signal.signal(signal.SIGTERM, _terminated)

    def orphaned():  # the launcher was killed outright: do not live on holding a port and memory
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=orphaned, daemon=True).start()
    try:
        code = target(rank, *args)
        code = code if isinstance(code, int) else 0
    except SystemExit as e:  # SIGTERM from the launcher
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 -- a rank's crash: its traceback, then exit 1
        traceback.print_exc()
        code = 1
    _exit(code)


# -- the launcher ------------------------------------------------------------------------------------------------------
def spawn(world: int, target, args=(), context=None) -> list:
    """Start ``world`` ranks running ``target(rank, *args)`` (see the module docstring); returns the processes."""
    import torch.multiprocessing as mp

    ctx = context or mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world, port, os.getpid(), target, tuple(args)), daemon=False)
             for r in range(world)]
    try:
        for p in procs:
            p.start()
    except BaseException:
        stop(procs)
        raise
    return procs


def supervise(procs, name: str = "helix") -> int:
    """Wait for every rank. The first to end with a non-zero code stops the others and is named on stderr; the
    result is that code for 2 (bad input) and 130 (interrupted), else 1. 0 when every rank succeeds."""
    import multiprocessing.connection

    alive = {p.sentinel: r for r, p in enumerate(procs)}
    while alive:
        for sentinel in multiprocessing.connection.wait(list(alive)):
            r = alive.pop(sentinel)
            procs[r].join()
            code = procs[r].exitcode
            if code != 0:
                how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                others = [q for q in procs if q.is_alive()]
                stop(procs)
                print(f"{name}: rank {r} ended with {how}; stopped the other {len(others)} rank(s)"
                      + ("" if code in (2, 130) else ". Check that rank's messages above and run again"),
                      file=sys.stderr, flush=True)
                return code if code in (2, 130) else 1
    return 0


def launch(world: int, target, args=(), name: str = "helix") -> int:
    """``spawn`` then ``supervise``; every rank is stopped on the way out (also on Ctrl-C or SIGTERM here)."""
    procs = []
    try:
        procs = spawn(world, target, args)
        return supervise(procs, name)
    finally:
        stop(procs)


def stop(procs, grace: float = 5.0) -> None:
    """SIGTERM every live rank and its own children, then SIGKILL what is left after ``grace`` seconds."""
    for p in procs:
        if p.pid is not None and p.is_alive():
            signal_tree(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        if p.pid is not None:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                signal_tree(p.pid, signal.SIGKILL)
                p.join()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read from /proc), parents before their children."""
    children = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    order, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        order.append(p)
        todo.extend(children.get(p, []))
    return order


def signal_tree(pid: int, sig) -> None:
    """Send ``sig`` to ``pid`` and every process below it (children first)."""
    order = [pid] + descendants(pid)
    for p in reversed(order):
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


# -- results back to the caller ------------------------------------------------------------------------------------------
def _result_rank(rank, fn, args, queue, device, share_cores, timeout):
    import torch
    import torch.distributed as dist

    try:
        init_process_group(device, timeout=timeout, share_cores=share_cores)
        # as bytes: a tensor put on the queue as it is travels as a handle to this process's shared memory, which
        # the caller can no longer open once this process has exited
        value = io.BytesIO()
        torch.save(fn(rank, *args), value)
        queue.put((rank, "ok", value.getvalue()))
        return 0
    except BaseException:  # noqa: BLE001 -- every failure goes to the caller, with its traceback
        queue.put((rank, "error", traceback.format_exc()))
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world: int, fn, *args, timeout: float = 3600, backend: str = "gloo", share_cores: bool = False) -> list:
    """Call ``fn(rank, *args)`` on ``world`` spawned ranks (``backend`` "gloo": CPU; "nccl": rank r on cuda:r);
    return the results ordered by rank (tensors in them on the CPU). The first failure (an exception, a rank that dies without a result, or
    ``timeout`` seconds without progress) stops every rank and raises RuntimeError naming the rank."""
    import torch
    import torch.multiprocessing as mp
    from queue import Empty

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    device = "cuda" if backend == "nccl" else "cpu"
    procs = spawn(world, _result_rank, (fn, args, queue, device, share_cores, None), context=ctx)
    results, error = {}, None
    try:
        last = time.monotonic()
        while len(results) < world and error is None:
            try:
                rank, status, value = queue.get(timeout=0.5)
            except Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    try:  # its traceback may still be on its way
                        rank, status, value = queue.get(timeout=2)
                    except Empty:
                        error = f"rank {dead[0][0]} ended with exit code {dead[0][1]} without a result"
                        break
                elif time.monotonic() - last > timeout:
                    error = f"no rank reported for {timeout:.0f} s; ranks {sorted(set(range(world)) - set(results))} " \
                            f"still running"
                    break
                else:
                    continue
            last = time.monotonic()
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(value), map_location="cpu", weights_only=False)  # from our ranks
            else:
                error = f"rank {rank}:\n{value}"
        if error is None:
            for p in procs:
                p.join(timeout=60)
    finally:
        stop(procs, grace=5.0)
    if error is not None:
        raise RuntimeError(error)
    return [results[r] for r in range(world)]
