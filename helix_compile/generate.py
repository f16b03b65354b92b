"""`helix generate`: generate text from a checkpoint on N local ranks (or under torchrun, across hosts).

    helix generate ckpt/ --prompt "The capital of France is"                    # every visible GPU, layout planned
    helix generate ckpt/ --kvp 2 --tpa 2 --dtype float32 --prompt "Hello"       # an explicit layout and dtype
    helix generate ckpt-helix/ --prompt-file prompts.txt --max-new-tokens 64    # a helix convert output; a batch
    helix generate model.gguf --nproc 2 --prompt "Hello"                        # GGUF: converted once to a temp dir
    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        -m helix_compile.cli generate ckpt-helix/ --prompt "Hello"

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
    Launching: under torchrun (RANK/WORLD_SIZE set) each process is one rank. Otherwise this process launches
    --nproc ranks itself (spawn; NCCL on CUDA, gloo on the CPU; a free loopback port) and supervises them.
Faults
    A rank that dies: the launcher stops the others at once and exits 1 naming the rank. NCCL's asynchronous
    error handling tears a rank down on a failed or timed-out collective (timeout --timeout); across hosts, gloo's
    collectives fail when a peer's connection drops; a watchdog ends a rank that makes no progress for --timeout
    seconds (--compile-timeout while compiling). Ctrl-C or SIGTERM: the ranks are stopped, the GGUF temp dir
    removed, exit 130 (143). Bad input is one line on stderr with exit code 2, before any rank starts.
"""

from __future__ import annotations

import argparse
import dataclasses
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
  helix generate ckpt/ --prompt "The capital of France is" --max-new-tokens 32
  helix generate ckpt/ --kvp 2 --tpa 2 --dtype float32 --prompt "Hello" --temperature 0.7 --top-p 0.9 --seed 1
  helix generate ckpt-helix/ --prompt "Hello" --prompt "The capital of France is"   # one left-padded batch
  printf 'Hello\\nBonjour\\n' | helix generate ckpt/ --nproc 2 --prompt-file -   # one prompt per line
  helix generate SmolLM2-135M-Instruct.Q4_1.gguf --nproc 2 --chat --prompt "What is Helix?"
  torchrun --nproc-per-node 2 -m helix_compile.cli generate ckpt-helix/ --prompt "Hello"
"""

LAYOUT_FIELDS = ("kvp", "tpa", "tpf", "ep", "kv_block", "hopb_chunks")
DTYPES = ("auto", "bfloat16", "float16", "float32")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="generate text on N ranks (spawned here, or under torchrun)",
                              description=__doc__.split("\n")[0].split(": ", 1)[1], epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a helix convert output, an HF checkpoint directory, or a .gguf file")
    src = p.add_argument_group("prompts (one left-padded batch; stdin when neither is given)")
    src.add_argument("--prompt", action="append", help="a prompt; repeat for a batch")
    src.add_argument("--prompt-file", help="a file with one prompt per line ('-': stdin)")
    src.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    src.add_argument("--max-new-tokens", type=_positive, default=32, help="tokens to generate per prompt (default 32)")
    run_ = p.add_argument_group("ranks, layout, dtype and device")
    run_.add_argument("--nproc", type=_positive, help="ranks to launch here (default: the plan's, kvp*tpa, or every "
                                                      "visible GPU); ignored under torchrun")
    run_.add_argument("--layout", help="'auto' (the planner picks for the ranks, the prompt and --max-new-tokens) or "
                                       "kvp=..,tpa=..[,ep=..,tpf=..,kv_block=..]; default: the plan's, else auto")
    run_.add_argument("--kvp", type=_positive, help="KV-parallel width")
    run_.add_argument("--tpa", type=_positive, help="tensor-parallel width of attention (default 1)")
    run_.add_argument("--ep", type=_positive, help="expert-parallel width of an MoE FFN (default 1)")
    run_.add_argument("--tpf", type=_positive, help="tensor-parallel width of the FFN (default: ranks / ep)")
    run_.add_argument("--kv-block", type=_positive, help="tokens per round-robin KV block (default: the plan's, else 16)")
    run_.add_argument("--dtype", choices=DTYPES, default="auto", help="weights and KV cache (default auto: the "
                                                                       "checkpoint's dtype)")
    run_.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                      help="cuda: rank r on cuda:LOCAL_RANK with NCCL; cpu: gloo (default: cuda when present)")
    run_.add_argument("--executor", choices=["inductor", "eager"], default="inductor",
                      help="run the local graph through Inductor (default) or without it")
    smp = p.add_argument_group("decoding (default: the checkpoint's generation_config, as transformers' generate)")
    smp.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=None,
                     help="sample (--do-sample) or decode greedily (--no-do-sample)")
    smp.add_argument("--temperature", type=float, help="sampling temperature; 0 means greedy")
    smp.add_argument("--top-k", type=int, help="sample among the k most likely tokens (0: no top-k)")
    smp.add_argument("--top-p", type=float, help="sample from the smallest set with probability >= p")
    smp.add_argument("--repetition-penalty", type=float, help="transformers' repetition penalty (1.0: none)")
    smp.add_argument("--seed", type=int, default=0, help="sampling seed, the same on every rank (default 0)")
    flt = p.add_argument_group("faults")
    flt.add_argument("--timeout", type=float, default=60.0,
                     help="seconds a decode step or collective may stall before a rank gives up (default 60)")
    flt.add_argument("--compile-timeout", type=float, default=900.0, help="the same while loading and compiling")
    p.add_argument("--step-delay", type=float, default=0.0, help=argparse.SUPPRESS)  # fault-injection tests
    p.set_defaults(func=run)
    return p


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
    generate_kwargs: dict  # decoding flags given on the command line (transformers' generate kwargs)
    verified: bool = False  # every file was checked against plan.json's sha256 before the ranks started


def parse_layout(text: str) -> dict:
    """``kvp=2,tpa=1,ep=2`` -> {"kvp": 2, "tpa": 1, "ep": 2}."""
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key.strip() not in LAYOUT_FIELDS or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--layout {text!r}: use 'auto' or a comma list of {', '.join(LAYOUT_FIELDS)} with "
                             f"positive values, like kvp=2,tpa=2,kv_block=16")
        out[key.strip()] = int(value)
    return out


def _layout_fields(args) -> dict:
    flags = {k: getattr(args, k) for k in ("kvp", "tpa", "ep", "tpf", "kv_block") if getattr(args, k) is not None}
    if args.layout and args.layout != "auto":
        fields = parse_layout(args.layout)
        clash = sorted(set(flags) & set(fields) | (set(flags) - {"kv_block"}))
        if clash:
            given = " ".join(f"--{k.replace('_', '-')} {flags[k]}" for k in clash if k in flags)
            raise ValueError(f"--layout {args.layout} and {given} both set the layout: give it one way")
        return {**fields, **flags}
    if args.layout == "auto" and set(flags) - {"kv_block"}:
        raise ValueError("--layout auto and --kvp/--tpa/--ep/--tpf both set the layout: give it one way")
    return flags


def read_prompts(args) -> list[str]:
    if args.prompt and args.prompt_file:
        raise ValueError("--prompt and --prompt-file both give prompts: use one")
    if args.prompt:
        return list(args.prompt)
    if args.prompt_file and args.prompt_file != "-":
        file = Path(args.prompt_file)
        if not file.is_file():
            raise ValueError(f"--prompt-file {file}: no such file")
        text = file.read_text()
    elif args.prompt_file == "-" or not sys.stdin.isatty():
        text = sys.stdin.read()
    else:
        raise ValueError("no prompt: give --prompt TEXT, --prompt-file FILE, or pipe prompts on stdin")
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"no prompt: {'the file ' + args.prompt_file if args.prompt_file not in (None, '-') else 'stdin'} "
                         f"has no non-empty line")
    return prompts


def tokenize(tok, prompts: list[str], chat: bool, path) -> tuple[list, list]:
    """One left-padded batch: (input_ids, attention_mask) as lists."""
    import torch

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
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows]).tolist()
    mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
    return ids, mask


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def prepare(args, world: int | None, name: str | None = None) -> Request:
    """Check the arguments and the checkpoint and decide everything (``world``: torchrun's, or None to choose).

    Raises ValueError with one line naming the problem: nothing has started yet.
    """
    import dataclasses as dc

    import torch
    from transformers import AutoConfig, AutoTokenizer

    from .layout import Layout
    from .loading import PLAN_FILE, check_layout, plan_layout, read_plan
    from .preflight import check_checkpoint, check_request

    path = Path(args.model)
    if not path.exists():
        raise ValueError(f"{args.model}: no such file or directory")
    if path.is_file():
        raise ValueError(f"{args.model} is a file: give a checkpoint directory (a .gguf is converted by the launcher, "
                         "which torchrun bypasses: run helix convert first)")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    fields = _layout_fields(args)
    check_checkpoint(path, checksums=world is None)  # under torchrun each rank checks only its own file
    prompts = read_prompts(args)
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"{path}/config.json: transformers cannot read it ({str(e).splitlines()[0]})") from None
    text = config.get_text_config(decoder=True)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 -- transformers raises many kinds here; all mean "no usable tokenizer"
        raise ValueError(f"{path}: cannot load its tokenizer ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    input_ids, attention_mask = tokenize(tok, prompts, args.chat, path)
    prompt_len = len(input_ids[0])
    check_request(config, prompt_len, args.max_new_tokens)

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    dtype = args.dtype
    if dtype == "auto":
        found = getattr(config, "dtype", None) or getattr(text, "dtype", None)
        dtype = str(found).removeprefix("torch.") if found is not None else "float32"
        if dtype not in DTYPES:
            raise ValueError(f"{path}: the checkpoint's dtype is {dtype}; give --dtype bfloat16, float16 or float32")

    plan = read_plan(path) if (path / PLAN_FILE).exists() else None
    if plan is not None:
        layout = plan_layout(plan)
        if fields:  # refused here if it places the weights differently from the conversion
            layout = dc.replace(layout, **fields, **({} if "tpf" in fields else {"tpf": None}))
            check_layout(plan, layout, path)
        want, have = plan["world_size"], world or args.nproc or layout.world_size
        if have != want:
            raise ValueError(
                f"{path} was converted for {want} ranks (kvp={plan['layout']['kvp']} tpa={plan['layout']['tpa']}) "
                f"but {'torchrun started' if world else '--nproc asks for'} {have}: run it on {want} ranks, or "
                f"convert the original checkpoint again for {have}")
    elif args.layout == "auto" or not set(fields) - {"kv_block"}:
        n = world or args.nproc or (_visible_gpus() if device == "cuda" else 0)
        if not n:
            raise ValueError(f"{path} is an HF checkpoint: give the layout (--kvp K [--tpa T] [--ep E]), or --nproc N "
                             f"for the planner to choose one (--layout auto)")
        from .planner import choose_layout

        chosen = choose_layout(text, n, prompt_len + args.max_new_tokens, batch_size=len(input_ids),
                               dtype=getattr(torch, dtype))
        layout = Layout(**chosen, **{k: v for k, v in fields.items() if k == "kv_block"})
    else:
        if "kvp" not in fields:
            fields["kvp"] = max(1, (world or args.nproc or 1) // fields.get("tpa", 1))
        layout = Layout(**fields)
    n = world or args.nproc or layout.world_size
    if n != layout.world_size:
        raise ValueError(f"kvp={layout.kvp} x tpa={layout.tpa} needs {layout.world_size} ranks but "
                         f"{'torchrun started' if world else '--nproc asks for'} {n}")
    layout.validate(text)
    if device == "cuda" and world is None and n > _visible_gpus():
        raise ValueError(f"{n} ranks need {n} GPUs (one each) but {_visible_gpus()} are visible: use --nproc "
                         f"{_visible_gpus()} with a layout for it, or --device cpu")
    return Request(path=str(path), name=name or str(path), layout=layout, world=n, dtype=dtype, device=device,
                   input_ids=input_ids, attention_mask=attention_mask, generate_kwargs=decoding_kwargs(args),
                   verified=world is None and plan is not None)


def decoding_kwargs(args) -> dict:
    """transformers generate() keyword arguments for the decoding flags given (the rest: generation_config's)."""
    out = {k: getattr(args, k) for k in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")
           if getattr(args, k) is not None}
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


def rank_main(args, req: Request) -> int:
    """One rank, inside an initialised process group: load, compile (warm-up), generate, report."""
    import gc
    import warnings

    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer, GenerationConfig, LogitsProcessorList, TextStreamer

    import helix_compile
    from helix_compile import StaticCache

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", message="`past_key_values` is deprecated")
    hf_logging.disable_progress_bar()  # stderr carries helix's progress lines only
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if req.device == "cuda" else torch.device("cpu")
    dtype = getattr(torch, req.dtype)
    layout = req.layout
    dog = Watchdog(rank, args.compile_timeout)
    ids = torch.tensor(req.input_ids, device=device)
    mask = torch.tensor(req.attention_mask, device=device)
    batch, prompt_len = ids.shape
    where = f"{req.device}" + (f" (cuda:0..{world - 1} of {torch.cuda.get_device_name(device)})"
                               if req.device == "cuda" and world > 1 else
                               f" ({torch.cuda.get_device_name(device)})" if req.device == "cuda" else "")
    _say(rank, f"{req.name}: {world} rank(s), kvp={layout.kvp} tpa={layout.tpa} tpf={layout.tpf} ep={layout.ep} "
               f"kv_block={layout.kv_block}, {req.dtype} on {where}, executor {args.executor}; "
               f"{batch} prompt(s) of {prompt_len} tokens (left-padded), {args.max_new_tokens} new tokens")
    _say(rank, "loading this rank's shards ...")
    t0 = time.perf_counter()
    # the launcher already checked a conversion's files against plan.json (preflight.check_checkpoint)
    model = helix_compile.from_pretrained(req.path, layout, dtype=dtype, device=device, verify=not req.verified)
    if (Path(req.path) / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(req.path)
    tok = AutoTokenizer.from_pretrained(req.path)
    loaded = time.perf_counter() - t0
    _say(rank, f"loaded in {loaded:.1f} s")
    model.forward = torch.compile(model.forward, backend="helix", fullgraph=True,
                                  options={"layout": layout, "executor": args.executor})
    pad = tok.pad_token_id if tok.pad_token_id is not None else model.generation_config.pad_token_id
    if pad is None:
        pad = _as_list(model.generation_config.eos_token_id or tok.eos_token_id)[:1] or [0]
        pad = pad[0]
    common = dict(input_ids=ids, attention_mask=mask, pad_token_id=pad,
                  logits_processor=LogitsProcessorList([_same_on_every_rank()]))

    def cache():
        return StaticCache(model, max_batch_size=batch, max_cache_len=prompt_len + args.max_new_tokens,
                           layout=layout)

    # warm-up: the prefill graph and the decode graph(s) compile here, on the real prompts, so that the timed
    # generation below compiles nothing
    warm = min(3, args.max_new_tokens)
    _say(rank, f"compiling (a warm-up of {warm} token(s): prefill and decode graphs) ...")
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(**common, past_key_values=cache(), max_new_tokens=warm, min_new_tokens=warm, do_sample=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    compiled = time.perf_counter() - t0
    _say(rank, f"compiled in {compiled:.1f} s")
    gc.collect()
    dog.beat("generating", args.timeout)

    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True) if rank == 0 and batch == 1 else None
    clock = _Clock(streamer, dog.beat)
    if args.step_delay:
        base = clock.put

        def put(value):
            base(value)
            time.sleep(args.step_delay)

        clock.put = put
    torch.manual_seed(args.seed)  # the same draws on every rank, and as transformers' generate under this seed
    with torch.no_grad():
        out = model.generate(**common, past_key_values=cache(), max_new_tokens=args.max_new_tokens, streamer=clock,
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
                   f"({1000 / ttl if decode else float('nan'):.1f} tokens/s per prompt, {total:.1f} tokens/s in all); "
                   f"peak memory per rank {', '.join(f'{m:.2f}' for m in memory)} GiB")
    dist.barrier()
    return 0


def _as_list(x):
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def _init(args, req: Request, rank: int, world: int) -> None:
    import torch
    import torch.distributed as dist

    if req.device == "cuda":
        # a failed or timed-out collective tears the rank down instead of hanging (helix sets it, not torch's
        # default); the launcher then stops the others
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "0")
        for key in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
            os.environ.setdefault(key, "0" if key == "NCCL_NVLS_ENABLE" else "1")
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local),
                                timeout=datetime.timedelta(seconds=max(args.timeout, args.compile_timeout)))
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=max(args.timeout, args.compile_timeout)))


def _rank_entry(args, req: Request, rank: int, world: int) -> int:
    """Run one rank with the process group from the environment; user errors become exit 2."""
    import torch.distributed as dist

    try:
        _init(args, req, rank, world)
        return rank_main(args, req)
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


def _spawned(rank: int, world: int, port: int, parent: int, args, req: Request) -> None:
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
        code = _rank_entry(args, req, rank, world)
    except SystemExit as e:  # SIGTERM from the launcher
        code = e.code if isinstance(e.code, int) else 1
    _exit(code)


def _terminated(signum, frame):
    raise SystemExit(128 + signum)  # unwinds (the launcher SIGKILLs a rank still blocked after its grace period)


def _exit(code: int) -> None:
    """Leave now, without waiting for non-daemon threads (a compile worker, a dead peer's collective), but after
    multiprocessing's finalizers: semaphores this rank created are released rather than reported as leaked."""
    import multiprocessing.util

    sys.stdout.flush()
    sys.stderr.flush()
    try:
        multiprocessing.util._exit_function()
    finally:
        os._exit(code)


# -- launcher ----------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, req: Request) -> int:
    """Spawn ``req.world`` ranks and supervise them: the first to fail stops the others."""
    import multiprocessing.connection

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port, world = _free_port(), req.world
    procs = [ctx.Process(target=_spawned, args=(r, world, port, os.getpid(), args, req), daemon=False)
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
    """SIGTERM every live rank and its own children (Inductor's compile workers), then SIGKILL what is left."""
    for p in procs:
        if p.pid is not None and p.is_alive():
            _signal_tree(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        if p.pid is not None:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                _signal_tree(p.pid, signal.SIGKILL)
                p.join()


def _signal_tree(pid: int, sig) -> None:
    """Send ``sig`` to ``pid`` and every process below it (read from /proc; children first)."""
    children = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    order, todo = [], [pid]
    while todo:
        p = todo.pop()
        order.append(p)
        todo.extend(children.get(p, []))
    for p in reversed(order):
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


def run(args) -> int:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # one rank under torchrun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        try:
            req = prepare(args, world)
        except ValueError as e:
            print(f"helix generate: error: rank {rank}: {e}", file=sys.stderr)
            return 2
        return _rank_entry(args, req, rank, world)
    tmp = None
    try:
        model, name = Path(args.model), args.model
        if model.is_file() and model.suffix == ".gguf":
            tmp = Path(tempfile.mkdtemp(prefix="helix-gguf-"))
            args.model = str(_convert_gguf(args, model, tmp / "converted"))
        req = prepare(args, None, name=name)
        return launch(args, req)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf(args, model: Path, out: Path) -> Path:
    """A GGUF is de-quantised once, here, into a per-rank conversion that every rank then reads its part of."""
    from .convert import convert, open_source
    from .layout import Layout

    fields = _layout_fields(args)
    source = open_source(model)
    if args.layout == "auto" or not set(fields) - {"kv_block"}:
        n = args.nproc or (_visible_gpus() if args.device != "cpu" else 0)
        if not n:
            raise ValueError(f"{model}: give the layout (--kvp K [--tpa T]), or --nproc N for the planner to choose")
        from .planner import choose_layout

        text = source.config.get_text_config(decoder=True)
        prompt_bound = 4096  # the prompt is not tokenized yet; the choice depends on it only through the KV bytes
        fields = {**choose_layout(text, n, args.max_new_tokens + prompt_bound, batch_size=1),
                  **{k: v for k, v in fields.items() if k == "kv_block"}}
    elif "kvp" not in fields:
        fields["kvp"] = max(1, (args.nproc or 1) // fields.get("tpa", 1))
    args.kvp = args.tpa = args.ep = args.tpf = args.layout = None
    return convert(model, Layout(**fields), out, progress=False, source=source)
