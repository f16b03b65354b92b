"""`helix generate`: stream text from a checkpoint on N local ranks (or under torchrun, across hosts).

    helix generate ckpt-helix/ --prompt "Hello" --max-new-tokens 32             # a `helix convert` output
    helix generate ckpt/ --kvp 2 --tpa 2 --prompt "Hello"                       # an HF checkpoint directory
    helix generate model.gguf --nproc 2 --layout auto --prompt "Hello"          # GGUF: converted once to a temp dir
    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        -m helix_compile.cli generate ckpt-helix/ --prompt "Hello"

Contract
    Every rank loads only its shards (``helix_compile.from_pretrained``), builds a rank-local
    ``helix_compile.StaticCache`` for prompt + max-new-tokens, and drives the compiled forward itself: one prefill
    call, then one q_len=1 decode call per token (no ``model.generate``). The next token is chosen on every rank
    (greedy argmax by default; with --temperature > 0, transformers' temperature / top-k / top-p logits processors
    and ``torch.multinomial`` under the shared --seed, as ``generate(do_sample=True)`` draws them) and rank 0's
    choice is broadcast, so all ranks feed the same token even if their logits differ in the last ulp.
    stdout (rank 0) is the generated text only, streamed; the prompt, layout and timing (prefill, TTL in ms/token,
    tokens/s) go to stderr.
    Launching: under torchrun (RANK/WORLD_SIZE set) each process is one rank. Otherwise this process launches
    --nproc ranks itself (spawn, gloo on CPU / nccl on GPU, a free loopback port) and supervises them.
Faults
    A rank that dies: the launcher stops the others at once and exits 1 naming the rank. Across hosts, gloo's
    collectives fail when a peer's connection drops; a watchdog ends a rank whose decode step stalls for --timeout
    seconds (the first two calls, which compile, get --compile-timeout). Ctrl-C or SIGTERM: the ranks are
    stopped, the GGUF temp dir removed, exit 130 (143). Bad input (a layout or world size other than the plan's, a
    missing or corrupted rank file) is a one-line error with exit code 2.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

EPILOG = """examples:
  helix generate ckpt-helix/ --prompt "The capital of France is" --max-new-tokens 32
  helix generate ckpt/ --kvp 2 --tpa 2 --prompt "Hello" --temperature 0.7 --top-p 0.9 --seed 1
  helix generate SmolLM2-135M-Instruct.Q4_1.gguf --nproc 2 --layout auto --chat --prompt "What is Helix?"
  torchrun --nproc-per-node 2 -m helix_compile.cli generate ckpt-helix/ --prompt "Hello"
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="stream text from N ranks (spawned here, or under torchrun)",
                              description=__doc__.split("\n")[0].split(": ", 1)[1], epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a helix convert output, an HF checkpoint directory, or a .gguf file")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--nproc", type=int, help="ranks to launch here (default: the plan's or kvp*tpa); ignored "
                                              "under torchrun")
    p.add_argument("--kvp", type=int, help="KV-parallel width (default: the plan's)")
    p.add_argument("--tpa", type=int, help="tensor-parallel width of attention (default: the plan's, else 1)")
    p.add_argument("--layout", help="'auto' (the planner picks for --nproc ranks) or kvp=..,tpa=..[,kv_block=..]")
    p.add_argument("--kv-block", type=int, help="tokens per round-robin KV block (default: the plan's, else 16)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, help="sample from the smallest set with probability >= p")
    p.add_argument("--seed", type=int, default=0, help="shared sampling seed (the same on every rank)")
    p.add_argument("--executor", choices=["inductor", "eager"], default="inductor",
                   help="run the local graph through Inductor (default) or without it")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds a decode step or collective may stall before a rank gives up (default 60)")
    p.add_argument("--compile-timeout", type=float, default=900.0, help="the same for the first two (compiling) calls")
    p.add_argument("--step-delay", type=float, default=0.0, help=argparse.SUPPRESS)  # fault-injection tests
    p.set_defaults(func=run)
    return p


# -- what to load ------------------------------------------------------------------------------------------------
def _parse_layout(text: str) -> dict:
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key.strip() not in ("kvp", "tpa", "tpf", "ep", "kv_block", "hopb_chunks") or not value.strip().isdigit():
            raise ValueError(f"--layout {text!r}: use 'auto' or a comma list like kvp=2,tpa=2,kv_block=16")
        out[key.strip()] = int(value)
    return out


def resolve(args, world: int | None):
    """(folder to load, Layout, world size) from the arguments; ``world`` is torchrun's, or None to choose."""
    from .layout import Layout
    from .loading import PLAN_FILE, plan_layout, read_plan

    path = Path(args.model)
    if not path.exists():
        raise ValueError(f"{args.model}: no such file or directory")
    if path.is_file():
        raise ValueError(f"{args.model} is a file: give a directory (a .gguf is converted by the launcher, "
                         "which torchrun bypasses: run helix convert first)")
    fields = {k: v for k, v in (("kvp", args.kvp), ("tpa", args.tpa), ("kv_block", args.kv_block)) if v is not None}
    if args.layout and args.layout != "auto":
        fields.update(_parse_layout(args.layout))
    plan = read_plan(path) if (path / PLAN_FILE).exists() else None
    if plan is not None:
        layout = plan_layout(plan)
        if fields:  # refused here, before any rank starts, if it places the weights differently
            import dataclasses

            from .loading import check_layout

            layout = dataclasses.replace(layout, **fields, **({} if "tpf" in fields else {"tpf": None}))
            check_layout(plan, layout, path)
        want = plan["world_size"]
        have = world or args.nproc or layout.world_size
        if have != want:
            raise ValueError(
                f"{path} was converted for {want} ranks (kvp={plan['layout']['kvp']} tpa={plan['layout']['tpa']}) "
                f"but {'torchrun started' if world else '--nproc asks for'} {have}: run it on {want} ranks, or "
                f"convert the original checkpoint again for {have}"
            )
        return path, layout, want
    if args.layout == "auto":
        n = world or args.nproc
        if not n:
            raise ValueError("--layout auto needs --nproc N (or torchrun) to know how many ranks to plan for")
        from transformers import AutoConfig

        from .planner import choose_layout

        text = AutoConfig.from_pretrained(path).get_text_config(decoder=True)
        # the context is not known before tokenising; 4096 prompt tokens is a generous bound, and the choice
        # depends on it only through the KV bytes
        chosen = choose_layout(text, n, args.max_new_tokens + 4096, batch_size=1)
        chosen.update({k: v for k, v in fields.items() if k == "kv_block"})
        return path, Layout(**chosen), n
    if "kvp" not in fields:
        raise ValueError(f"{path} is an HF checkpoint: give --kvp K [--tpa T] or --layout auto (or convert it "
                         "with helix convert, whose plan.json holds the layout)")
    layout = Layout(**fields)
    n = world or args.nproc or layout.world_size
    if n != layout.world_size:
        raise ValueError(f"kvp={layout.kvp} x tpa={layout.tpa} needs {layout.world_size} ranks but "
                         f"{'torchrun started' if world else '--nproc asks for'} {n}")
    return path, layout, n


# -- one rank ----------------------------------------------------------------------------------------------------
class Watchdog:
    """Ends the process (exit 3, with a message) when ``beat()`` was not called for ``limit`` seconds."""

    def __init__(self, rank: int, limit: float):
        self.rank, self.limit, self.last, self.what = rank, limit, time.monotonic(), "starting"
        threading.Thread(target=self._watch, daemon=True).start()

    def beat(self, what: str, limit: float | None = None):
        self.last, self.what = time.monotonic(), what
        if limit is not None:
            self.limit = limit

    def _watch(self):
        while True:
            time.sleep(0.5)
            if time.monotonic() - self.last > self.limit:
                print(f"helix generate: rank {self.rank}: no progress for {self.limit:.0f} s while {self.what}: another "
                      f"rank died or hangs; exiting (raise --timeout if steps are that slow)", file=sys.stderr,
                      flush=True)
                os._exit(3)


def _say(rank: int, text: str) -> None:
    if rank == 0:
        print(text, file=sys.stderr, flush=True)


def rank_main(args, path: Path, layout) -> int:
    """One rank, inside an initialised process group: load, prefill, decode, stream (rank 0)."""
    import warnings

    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer, LogitsProcessorList, TextStreamer
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    import helix_compile
    from helix_compile import StaticCache
    from helix_compile.verify import generate_inputs

    warnings.filterwarnings("ignore", message="`past_key_values` is deprecated")
    rank, world = dist.get_rank(), dist.get_world_size()
    dog = Watchdog(rank, args.compile_timeout)
    tok = AutoTokenizer.from_pretrained(path)
    if args.chat:
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(args.prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise ValueError(f"the prompt {args.prompt!r} is 0 tokens for the tokenizer in {path}")
    t0 = time.perf_counter()
    model = helix_compile.from_pretrained(path, layout)
    _say(rank, f"helix generate: {path} on {world} ranks, kvp={layout.kvp} tpa={layout.tpa} tpf={layout.tpf} "
               f"kv_block={layout.kv_block}, executor {args.executor}; loaded in {time.perf_counter() - t0:.1f} s; "
               f"prompt {ids.shape[1]} tokens")
    cache = StaticCache(model.config, max_batch_size=1, max_cache_len=ids.shape[1] + args.max_new_tokens,
                        layout=layout)
    compiled = torch.compile(model, backend="helix", fullgraph=True,
                             options={"layout": layout, "executor": args.executor})
    warpers = LogitsProcessorList()
    if args.temperature > 0:
        warpers.append(TemperatureLogitsWarper(args.temperature))
        if args.top_k:
            warpers.append(TopKLogitsWarper(args.top_k))
        if args.top_p is not None and args.top_p < 1.0:
            warpers.append(TopPLogitsWarper(args.top_p))
    torch.manual_seed(args.seed)  # the same draws on every rank, and as transformers' generate under this seed
    streamer = TextStreamer(tok, skip_special_tokens=True) if rank == 0 else None
    eos = set(_as_list(getattr(model.generation_config, "eos_token_id", None)) or _as_list(tok.eos_token_id))
    seen, step_input, times = ids, ids, []
    with torch.no_grad():
        for step in range(args.max_new_tokens):
            start = time.perf_counter()
            # what transformers' generate passes (attention_mask, position_ids): some families (OPT, BioGPT, XGLM)
            # cannot be traced over a static cache without them
            inputs = generate_inputs(model, step_input, seen.shape[1] - step_input.shape[1])
            logits = compiled(input_ids=step_input, past_key_values=cache, **inputs).logits[:, -1].float()
            if args.temperature > 0:
                probs = torch.softmax(warpers(seen, logits), dim=-1)
                token = torch.multinomial(probs, num_samples=1)
            else:
                token = logits.argmax(-1, keepdim=True)
            dist.broadcast(token, src=0)
            times.append(time.perf_counter() - start)
            dog.beat(f"decode step {step + 1}", args.timeout if step >= 1 else None)
            if streamer is not None:
                streamer.put(token[0])
            seen, step_input = torch.cat([seen, token], dim=1), token
            if token.item() in eos:
                break
            if args.step_delay:
                time.sleep(args.step_delay)
    if streamer is not None:
        streamer.end()
    # the first three calls compile: prefill, the decode graph, and the decode graph with the attention mask's
    # length dynamic (it grows every step)
    decode = times[3:] or times[2:] or times[1:]
    if decode:
        ttl = 1000 * sum(decode) / len(decode)
        _say(rank, f"helix generate: {len(times)} tokens; prefill {1000 * times[0]:.0f} ms (compiles); TTL "
                   f"{ttl:.1f} ms/token, {1000 / ttl:.1f} tokens/s over {len(decode)} decode steps")
    dist.barrier()
    return 0


def _as_list(x):
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def _init(args, rank: int, world: int) -> None:
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=max(args.timeout, args.compile_timeout)))


def _rank_entry(args, path, layout, rank: int, world: int) -> int:
    """Run one rank with the process group from the environment; user errors become exit 2."""
    import torch.distributed as dist

    try:
        _init(args, rank, world)
        return rank_main(args, path, layout)
    except ValueError as e:
        print(f"helix generate: error: rank {rank}: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        inner = getattr(e, "inner_exception", None)  # Dynamo wraps the backend's refusals
        if isinstance(inner, (ValueError, NotImplementedError)):
            print(f"helix generate: error: rank {rank}: {inner}", file=sys.stderr, flush=True)
            return 2
        if not _lost_peer(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"helix generate: rank {rank}: a collective failed ({first}); another rank probably died. "
              f"Exiting", file=sys.stderr, flush=True)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _lost_peer(e: BaseException) -> bool:
    """Whether ``e`` (or what it wraps) is a failed collective or store: the symptom of a peer going away."""
    import torch.distributed as dist

    while e is not None:
        if isinstance(e, dist.DistError) or any(w in str(e) for w in ("Connection", "gloo", "Gloo", "closed by peer")):
            return True
        e = e.__cause__ or e.__context__ or getattr(e, "inner_exception", None)
    return False


def _spawned(rank: int, world: int, port: int, parent: int, args, path, layout) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher handles Ctrl-C and stops us with SIGTERM

    def orphaned():  # the launcher was killed outright: do not live on holding a port and memory
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=orphaned, daemon=True).start()
    os._exit(_rank_entry(args, path, layout, rank, world))  # _exit: no waiting for non-daemon threads


# -- launcher ----------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, path: Path, layout, world: int) -> int:
    """Spawn ``world`` ranks and supervise them: the first to fail stops the others."""
    import multiprocessing.connection

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_spawned, args=(r, world, port, os.getpid(), args, path, layout), daemon=False)
             for r in range(world)]
    try:
        for p in procs:
            p.start()
        alive = {p.sentinel: r for r, p in enumerate(procs)}
        while alive:
            for sentinel in multiprocessing.connection.wait(list(alive)):
                r = alive.pop(sentinel)
                procs[r].join()
                code = procs[r].exitcode
                if code != 0:
                    how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                    others = [q for q in procs if q.is_alive()]
                    _stop(procs)
                    print(f"helix generate: rank {r} ended with {how}; stopped the other {len(others)} rank(s)"
                          + ("" if code in (2, 130) else ". Check that rank's messages above and run again"),
                          file=sys.stderr, flush=True)
                    return code if code in (2, 130) else 1
        return 0
    finally:
        _stop(procs)  # Ctrl-C / SIGTERM in the launcher land here too


def _stop(procs, grace: float = 5.0) -> None:
    for p in procs:
        if p.pid is not None and p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        if p.pid is not None:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()


def run(args) -> int:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # one rank under torchrun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        try:
            path, layout, _ = resolve(args, world)
        except ValueError as e:
            print(f"helix generate: error: rank {rank}: {e}", file=sys.stderr)
            return 2
        return _rank_entry(args, path, layout, rank, world)
    tmp = None
    try:
        model = Path(args.model)
        if model.is_file() and model.suffix == ".gguf":
            tmp = Path(tempfile.mkdtemp(prefix="helix-gguf-"))
            args.model = str(_convert_gguf(args, model, tmp / "converted"))
        path, layout, world = resolve(args, None)
        return launch(args, path, layout, world)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf(args, model: Path, out: Path) -> Path:
    """A GGUF is de-quantised once, here, into a per-rank conversion that every rank then reads its part of."""
    from .convert import convert, open_source
    from .layout import Layout

    fields = _parse_layout(args.layout) if args.layout and args.layout != "auto" else {}
    fields.update({k: v for k, v in (("kvp", args.kvp), ("tpa", args.tpa), ("kv_block", args.kv_block)) if v})
    if args.layout != "auto" and "kvp" not in fields:
        raise ValueError(f"{model}: give --kvp K [--tpa T], or --nproc N with --layout auto")
    source = open_source(model)
    if args.layout == "auto":
        if not args.nproc:
            raise ValueError("--layout auto needs --nproc N to know how many ranks to plan for")
        from .planner import choose_layout

        text = source.config.get_text_config(decoder=True)
        fields = {**choose_layout(text, args.nproc, args.max_new_tokens + 4096, batch_size=1),
                  **{k: v for k, v in fields.items() if k == "kv_block"}}
    args.kvp = args.tpa = args.layout = None
    return convert(model, Layout(**fields), out, progress=False, source=source)
