"""Generate text from a checkpoint on N ranks: what `helix generate` runs (``cli/generate.py`` only parses).

    from helix_compile import generation
    req = generation.prepare("ckpt/", ["The capital of France is"], layout={"kvp": 2}, device="cpu")
    generation.launch_ranks(req)     # spawns req.world ranks; rank 0 prints the text
    # under torchrun instead: generation.rank_entry(generation.prepare(..., world=WORLD_SIZE), RANK)

Contract
    Before any rank starts, the launching process checks the checkpoint (config, tokenizer, whole weight files),
    tokenizes the prompts (one left-padded batch), checks the token counts against the model's positions and the
    layout against the model's heads and FFN, and resolves the dtype (``auto``: the checkpoint's) and the device
    (CUDA when present). Each rank then loads only its shards (``helix_compile.from_pretrained``) on
    ``cuda:LOCAL_RANK`` or the CPU, replaces the model's forward by the helix-compiled one and runs
    transformers' own ``model.generate`` over a rank-local ``helix_compile.StaticCache``: sampling, stopping and
    the checkpoint's ``generation_config`` are transformers' (the flags override it as generate's keyword
    arguments do). The final scores of every step are broadcast from rank 0, so every rank picks the same token
    even if its logits differ in the last ulp.
    A warm-up generation of up to 3 tokens on the real prompts compiles the prefill and decode graphs first, so
    the summary reports compile time apart from prefill and TTL.
    stdout (rank 0) is the generated text only (streamed for one prompt; for several, each completion followed
    by an empty line, in prompt order); progress lines and the summary go to stderr.
    Launching: under torchrun (RANK/WORLD_SIZE set) each process is one rank (``rank_entry``). Otherwise
    ``launch_ranks`` starts ``nproc`` ranks through ``helix_compile.launch`` (spawn; NCCL on CUDA, gloo on the
    CPU; a free loopback port) and supervises them.
Faults
    A rank that dies: the launcher stops the others at once and exits 1 naming the rank. NCCL's asynchronous
    error handling tears a rank down on a failed or timed-out collective (timeout --timeout); across hosts, gloo's
    collectives fail when a peer's connection drops; a watchdog ends a rank that makes no progress for --timeout
    seconds (--compile-timeout while compiling). Ctrl-C or SIGTERM: the ranks are stopped, the GGUF temp dir
    removed, exit 130 (143). Bad input is one line on stderr with exit code 2, before any rank starts.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import launch
from .parse import TORCH_DTYPES

# -- what to run -------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Request:
    """Everything a rank needs, decided and checked before any rank starts (plain data: crosses a spawn)."""

    path: str  # the directory every rank loads
    name: str  # what the user gave (the .gguf rather than its temporary conversion)
    layout: object  # helix_compile.Layout
    world: int
    dtype: str  # torch dtype name
    device: str  # "cuda" or "cpu"
    input_ids: list  # left-padded [batch][length]
    attention_mask: list
    pad_token_id: int  # what the left padding holds; generate is told the same
    generate_kwargs: dict  # decoding arguments given (transformers' generate kwargs; the rest: generation_config)
    max_new_tokens: int = 32
    seed: int = 0  # sampling seed, the same on every rank
    executor: str = "inductor"  # or "eager": the local graph without Inductor
    timeout: float = 60.0  # seconds a decode step or collective may stall before a rank gives up
    compile_timeout: float = 900.0  # the same while loading and compiling
    step_delay: float = 0.0  # seconds of sleep after each token (fault-injection tests)
    verified: bool = False  # every file was checked against the manifest's sha256 before the ranks started
    kv_dtype: str = "auto"  # the KV cache's elements: "auto" (the model's dtype) or "fp8" (StaticCache(kv_dtype=...))


def tokenize(tok, prompts: list[str], chat: bool, path) -> tuple[list, list, int]:
    """One left-padded batch: (input_ids, attention_mask) as lists, and the pad id (the tokenizer's, else EOS)."""
    rows = []
    for text in prompts:
        if chat:
            if not getattr(tok, "chat_template", None):
                raise ValueError(f"--chat: the tokenizer in {path} has no chat template")
            ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          return_dict=True)["input_ids"]
        else:
            ids = tok(text)["input_ids"]
        ids = list(ids[0] if ids and isinstance(ids[0], list) else ids)
        if not ids:
            raise ValueError(f"the prompt {text!r} is 0 tokens for the tokenizer in {path}")
        rows.append(ids)
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    if isinstance(pad, list):
        pad = pad[0]
    ids = [[pad] * (width - len(r)) + r for r in rows]
    mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
    return ids, mask, pad


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def prepare(model, prompts: list[str], *, max_new_tokens: int = 32, layout: dict | str | None = None,
            nproc: int | None = None, world: int | None = None, dtype: str = "auto", device: str = "auto",
            chat: bool = False, generate_kwargs: dict | None = None, name: str | None = None, kv_dtype: str = "auto",
            **options) -> Request:
    """Check the arguments and the checkpoint and decide everything a rank needs.

    ``model``: a checkpoint directory (an HF one or a ``helix convert`` output). ``layout``: a dict of Layout
    fields (``{}`` or None: the manifest's for a conversion, else planned), or "auto" (planned; a dict with only
    kv_block is planned too). ``nproc``: ranks to launch (default: the manifest's, kvp*tpa, or every visible
    GPU); ``world``: torchrun's world size, when each process is one rank. ``dtype``: auto (the checkpoint's),
    bfloat16, float16 or float32; ``device``: auto, cuda or cpu; ``kv_dtype``: auto (the model's) or fp8 (refused
    here for MLA and for a GPU below compute capability 8.9). ``options``: the other ``Request`` fields
    (seed, executor, timeout, compile_timeout, step_delay).
    Raises ValueError with one line naming the problem: nothing has started yet.
    """
    import dataclasses as dc

    import torch
    from transformers import AutoConfig, AutoTokenizer

    from .layout import Layout
    from .loading import check_layout, manifest_file, manifest_layout, read_manifest
    from .preflight import check_checkpoint, check_request

    auto = layout == "auto"
    fields = {} if auto or layout is None else dict(layout)
    path = Path(model)
    if not path.exists():
        raise ValueError(f"{model}: no such file or directory")
    if path.is_file():
        raise ValueError(f"{model} is a file: give a checkpoint directory (a .gguf is converted by the launcher, "
                         "which torchrun bypasses: run helix convert first)")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    check_checkpoint(path, checksums=world is None)  # under torchrun each rank checks only its own file
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"{path}/config.json: transformers cannot read it ({str(e).splitlines()[0]})") from None
    text = config.get_text_config(decoder=True)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 -- transformers raises many kinds here; all mean "no usable tokenizer"
        raise ValueError(f"{path}: cannot load its tokenizer ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    input_ids, attention_mask, pad_token_id = tokenize(tok, prompts, chat, path)
    prompt_len = len(input_ids[0])
    check_request(config, prompt_len, max_new_tokens)

    device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    if dtype == "auto":
        found = getattr(config, "dtype", None) or getattr(text, "dtype", None)
        dtype = str(found).removeprefix("torch.") if found is not None else "float32"
        if dtype not in TORCH_DTYPES:
            raise ValueError(f"{path}: the checkpoint's dtype is {dtype}; give --dtype bfloat16, float16 or float32")
    if kv_dtype not in ("auto", "fp8"):
        raise ValueError(f"--kv-dtype must be auto or fp8, got {kv_dtype!r}")
    from .cache import kv_storage_dtype

    cache_dtype = kv_storage_dtype(kv_dtype, getattr(torch, dtype), text, device)

    manifest = read_manifest(path) if manifest_file(path) else None
    if manifest is not None:
        chosen = manifest_layout(manifest)
        if fields:  # refused here if it places the weights differently from the conversion
            chosen = dc.replace(chosen, **fields, **({} if "tpf" in fields else {"tpf": None}))
            check_layout(manifest, chosen, path)
        want, have = manifest["world_size"], world or nproc or chosen.world_size
        if have != want:
            raise ValueError(
                f"{path} was converted for {want} ranks (kvp={manifest['layout']['kvp']} "
                f"tpa={manifest['layout']['tpa']}) but {'torchrun started' if world else '--nproc asks for'} {have}: "
                f"run it on {want} ranks, or convert the original checkpoint again for {have}")
    elif auto or not set(fields) - {"kv_block"}:
        n = world or nproc or (visible_gpus() if device == "cuda" else 0)
        if not n:
            raise ValueError(f"{path} is an HF checkpoint: give the layout (--kvp K [--tpa T] [--ep E]), or --nproc N "
                             f"for the planner to choose one (--layout auto)")
        from .planner import choose_layout

        planned = choose_layout(text, n, prompt_len + max_new_tokens, batch_size=len(input_ids),
                                dtype=getattr(torch, dtype), kv_dtype=cache_dtype)
        chosen = Layout(**planned, **{k: v for k, v in fields.items() if k == "kv_block"})
    else:
        if "kvp" not in fields:
            fields["kvp"] = max(1, (world or nproc or 1) // fields.get("tpa", 1))
        chosen = Layout(**fields)
    n = world or nproc or chosen.world_size
    if n != chosen.world_size:
        raise ValueError(f"kvp={chosen.kvp} x tpa={chosen.tpa} needs {chosen.world_size} ranks but "
                         f"{'torchrun started' if world else '--nproc asks for'} {n}")
    chosen.validate(text)
    if device == "cuda" and world is None and n > visible_gpus():
        raise ValueError(f"{n} ranks need {n} GPUs (one each) but {visible_gpus()} are visible: use --nproc "
                         f"{visible_gpus()} with a layout for it, or --device cpu")
    return Request(path=str(path), name=name or str(path), layout=chosen, world=n, dtype=dtype, device=device,
                   input_ids=input_ids, attention_mask=attention_mask, pad_token_id=pad_token_id, generate_kwargs=dict(generate_kwargs or {}),
                   max_new_tokens=max_new_tokens, verified=world is None and manifest is not None, kv_dtype=kv_dtype,
                   **options)


def decoding_kwargs(do_sample=None, temperature=None, top_k=None, top_p=None, repetition_penalty=None) -> dict:
    """transformers generate() keyword arguments for the decoding arguments given (the rest: generation_config's)."""
    given = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                 repetition_penalty=repetition_penalty)
    out = {k: v for k, v in given.items() if v is not None}
    if out.get("temperature") == 0:  # 0 means greedy, as in most serving front ends
        out.pop("temperature")
        out["do_sample"] = False
    elif "do_sample" not in out and any(k in out for k in ("temperature", "top_k", "top_p")):
        out["do_sample"] = True  # a sampling parameter asks for sampling
    return out


# -- one rank ----------------------------------------------------------------------------------------------------
class Watchdog:
    """Ends the process (exit 3, with a message) when ``beat()`` was not called for ``limit`` seconds."""

    def __init__(self, rank: int, limit: float):
        self.rank, self.limit, self.last, self.what = rank, limit, time.monotonic(), "starting"
        self.stopped = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def stop(self):
        self.stopped.set()

    def beat(self, what: str, limit: float | None = None):
        self.last, self.what = time.monotonic(), what
        if limit is not None:
            self.limit = limit

    def _watch(self):
        while not self.stopped.wait(0.5):
            if time.monotonic() - self.last > self.limit:
                print(f"helix generate: rank {self.rank}: no progress for {self.limit:.0f} s while {self.what}: another "
                      f"rank died or hangs; exiting (raise --timeout if steps are that slow)", file=sys.stderr,
                      flush=True)
                os._exit(3)


def _say(rank: int, text: str) -> None:
    if rank == 0:
        print(f"helix generate: {text}", file=sys.stderr, flush=True)


class _Clock:
    """A transformers streamer that timestamps every step (the first ``put`` is the prompt) and streams one
    prompt's text on rank 0; ``beat`` keeps the watchdog fed."""

    def __init__(self, text_streamer, beat):
        self.times, self.inner, self.beat = [], text_streamer, beat

    def put(self, value):
        self.times.append(time.perf_counter())
        self.beat(f"generating token {len(self.times) - 1}")
        if self.inner is not None:
            self.inner.put(value)

    def end(self):
        if self.inner is not None:
            self.inner.end()


def _same_on_every_rank():
    """A logits processor, last in the list: rank 0's final scores on every rank (one broadcast per step)."""
    import torch.distributed as dist
    from transformers import LogitsProcessor

    class FromRankZero(LogitsProcessor):
        def __call__(self, input_ids, scores):
            dist.broadcast(scores, src=0)
            return scores

    return FromRankZero()


def _peak_memory(device) -> float:
    """This rank's peak memory in GiB: CUDA allocations on a GPU, the process's resident set on the CPU."""
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def rank_main(req: Request) -> int:
    """One rank, inside an initialised process group: load, compile (warm-up), generate, report."""
    import gc
    import warnings

    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer, LogitsProcessorList, TextStreamer

    import helix_compile
    from helix_compile import StaticCache

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", message="`past_key_values` is deprecated")
    # Inductor's advice to enable TF32 for fp32 matmuls: helix keeps fp32 exact, so the advice is not taken
    warnings.filterwarnings("ignore", message="TensorFloat32 tensor cores")
    hf_logging.disable_progress_bar()  # stderr carries helix's progress lines only
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if req.device == "cuda" else torch.device("cpu")
    dtype = getattr(torch, req.dtype)
    layout = req.layout
    dog = Watchdog(rank, req.compile_timeout)
    try:
        ids = torch.tensor(req.input_ids, device=device)
        mask = torch.tensor(req.attention_mask, device=device)
        batch, prompt_len = ids.shape
        where = f"{req.device}" + (f" (cuda:0..{world - 1} of {torch.cuda.get_device_name(device)})"
                                   if req.device == "cuda" and world > 1 else
                                   f" ({torch.cuda.get_device_name(device)})" if req.device == "cuda" else "")
        _say(rank, f"{req.name}: {world} rank(s), kvp={layout.kvp} tpa={layout.tpa} tpf={layout.tpf} ep={layout.ep} "
                   f"kv_block={layout.kv_block}, {req.dtype}" + (" (KV cache fp8)" if req.kv_dtype == "fp8" else "")
                   + f" on {where}, executor {req.executor}; "
                   f"{batch} prompt(s) of {prompt_len} tokens (left-padded), {req.max_new_tokens} new tokens")
        _say(rank, "loading this rank's shards ...")
        t0 = time.perf_counter()
        # the launcher already checked a conversion's files against its manifest (preflight.check_checkpoint)
        model = helix_compile.from_pretrained(req.path, layout, dtype=dtype, device=device, verify=not req.verified)
        tok = AutoTokenizer.from_pretrained(req.path)
        loaded = time.perf_counter() - t0
        _say(rank, f"loaded in {loaded:.1f} s")
        model.forward = torch.compile(model.forward, backend="helix", fullgraph=True,
                                      options={"layout": layout, "executor": req.executor})
        common = dict(input_ids=ids, attention_mask=mask, pad_token_id=req.pad_token_id,
                      logits_processor=LogitsProcessorList([_same_on_every_rank()]))

        def cache():
            return StaticCache(model, max_batch_size=batch, max_cache_len=prompt_len + req.max_new_tokens,
                               layout=layout, kv_dtype=req.kv_dtype)

        # warm-up: the prefill graph and the decode graph(s) compile here, on the real prompts, so that the timed
        # generation below compiles nothing
        warm = min(3, req.max_new_tokens)
        _say(rank, f"compiling (a warm-up of {warm} token(s): prefill and decode graphs) ...")
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(**common, past_key_values=cache(), max_new_tokens=warm, min_new_tokens=warm, do_sample=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        compiled = time.perf_counter() - t0
        _say(rank, f"compiled in {compiled:.1f} s")
        gc.collect()
        dog.beat("generating", req.timeout)

        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True) if rank == 0 and batch == 1 else None
        clock = _Clock(streamer, dog.beat)
        if req.step_delay:
            base = clock.put

            def put(value):
                base(value)
                time.sleep(req.step_delay)

            clock.put = put
        torch.manual_seed(req.seed)  # the same draws on every rank, and as transformers' generate under this seed
        with torch.no_grad():
            out = model.generate(**common, past_key_values=cache(), max_new_tokens=req.max_new_tokens, streamer=clock,
                                 **req.generate_kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if rank == 0 and batch > 1:
            for row in out[:, prompt_len:]:
                print(tok.decode(row, skip_special_tokens=True), end="\n\n", flush=True)
        steps = [b - a for a, b in zip(clock.times, clock.times[1:])]  # each generated token's time
        memory = [None] * world
        dist.all_gather_object(memory, _peak_memory(device))
        if steps:
            prefill, decode = steps[0], steps[1:]
            ttl = 1000 * sum(decode) / len(decode) if decode else float("nan")
            total = len(steps) * batch / sum(steps)
            _say(rank, f"{len(steps)} tokens x {batch} prompt(s); load {loaded:.1f} s, compile {compiled:.1f} s; "
                       f"prefill {1000 * prefill:.1f} ms; TTL {ttl:.2f} ms/token over {len(decode)} decode steps "
                       f"({1000 / ttl if decode else float('nan'):.1f} tokens/s per prompt, "
                       f"{total:.1f} tokens/s in all); "
                       f"peak memory per rank {', '.join(f'{m:.2f}' for m in memory)} GiB")
        dist.barrier()
        return 0
    finally:
        dog.stop()  # a caller that goes on (a test, a notebook) keeps no watchdog behind


def rank_entry(req: Request, rank: int) -> int:
    """One rank, in the process group the environment describes (``launch``'s or torchrun's): the exit code
    (0; 2 for bad input, named on stderr; 1 when a peer was lost; 130 on Ctrl-C)."""
    import torch.distributed as dist

    try:
        launch.init_process_group(req.device, timeout=max(req.timeout, req.compile_timeout), share_cores=True)
        return rank_main(req)
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
        if not launch.lost_peer(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"helix generate: rank {rank}: a collective failed ({first}); another rank probably died. "
              f"Exiting", file=sys.stderr, flush=True)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawned_rank(rank: int, req: Request) -> int:
    return rank_entry(req, rank)


def launch_ranks(req: Request) -> int:
    """Start ``req.world`` ranks here and supervise them (``launch.launch``): the first to fail stops the others."""
    return launch.launch(req.world, _spawned_rank, (req,), name="helix generate")


def generate(model, prompts: list[str], *, layout: dict | str | None = None, nproc: int | None = None,
             **kw) -> int:
    """``prepare`` then ``launch_ranks``; a .gguf file is converted once into a temporary directory first
    (removed afterwards). Under torchrun (RANK and WORLD_SIZE set) this process is one rank instead."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # one rank under torchrun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        try:
            req = prepare(model, prompts, layout=layout, nproc=nproc, world=world, **kw)
        except ValueError as e:
            print(f"helix generate: error: rank {rank}: {e}", file=sys.stderr)
            return 2
        return rank_entry(req, rank)
    tmp = None
    try:
        path, name = Path(model), str(model)
        if path.is_file() and path.suffix == ".gguf":
            tmp = Path(tempfile.mkdtemp(prefix="helix-gguf-"))
            model = convert_gguf(path, tmp / "converted", layout=layout, nproc=nproc, device=kw.get("device", "auto"),
                                 max_new_tokens=kw.get("max_new_tokens", 32))
            layout = None  # the conversion's manifest holds it
        req = prepare(model, prompts, layout=layout, nproc=nproc, name=name, **kw)
        return launch_ranks(req)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def convert_gguf(model: Path, out: Path, layout: dict | str | None = None, nproc: int | None = None,
                 device: str = "auto", max_new_tokens: int = 32) -> Path:
    """A GGUF is de-quantised once, here, into a per-rank conversion that every rank then reads its part of."""
    from .convert import convert, open_source
    from .layout import Layout

    auto = layout == "auto"
    fields = {} if auto or layout is None else dict(layout)
    source = open_source(model)
    if auto or not set(fields) - {"kv_block"}:
        n = nproc or (visible_gpus() if device != "cpu" else 0)
        if not n:
            raise ValueError(f"{model}: give the layout (--kvp K [--tpa T]), or --nproc N for the planner to choose")
        from .planner import choose_layout

        text = source.config.get_text_config(decoder=True)
        prompt_bound = 4096  # the prompt is not tokenized yet; the choice depends on it only through the KV bytes
        fields = {**choose_layout(text, n, max_new_tokens + prompt_bound, batch_size=1),
                  **{k: v for k, v in fields.items() if k == "kv_block"}}
    elif "kvp" not in fields:
        fields["kvp"] = max(1, (nproc or 1) // fields.get("tpa", 1))
    return convert(model, Layout(**fields), out, progress=False, source=source)
