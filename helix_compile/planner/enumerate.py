"""Enumerate the layouts of each strategy that are valid for a model, over GPU counts and batch sizes.

Validity is the backend's own: the attention rules come from ``Layout.validate`` (tpa divides K, or for the TP
baseline is a multiple of K; tpa divides Q; every rank holds at least one query head after the all-to-all, the
split being ``Layout.head_split``, uneven when kvp does not divide Q/tpa), and so do the dense FFN rules (tpf
divides the intermediate size), MLA's tpa = 1 for Helix, and the rules of heads in parts (DiffLLaMA:
``ModelSpec.head_parts``). MoE layouts add: experts divisible by ep, expert intermediate size divisible by tpf, dense
layers of a MoE model TP over the whole FFN group. Helix proper keeps tpa <= K (no KV duplicated); the "tp" strategy
is ``Layout(kvp=1, tpa=n)``.

The paper's TP baseline for MLA (every GPU holds the whole latent cache and a 1/n share of the query heads) is
enumerated as "tp" too, so that DeepSeek-R1 is compared against TP as the paper compares it; the backend does not
run it (``Layout.validate`` keeps MLA at tpa = 1), so ``backend_runs`` is False for it and ``choose_layout`` never
returns it.
With replicas, a layout on n GPUs (n dividing the GPU budget) runs budget/n times; tokens/s/GPU is unchanged.
"""
from __future__ import annotations

from ..layout import Layout
from .cost import STRATEGIES, Candidate, backend_runs  # noqa: F401  (backend_runs: re-exported)
from .model import ModelSpec


def _config(m: ModelSpec):
    """The HF config fields Layout.validate reads, in an object named after the model (for its messages)."""
    fields = {"num_attention_heads": m.q_heads, "num_key_value_heads": m.kv_heads, "head_parts": m.head_parts}
    if not m.is_moe:
        fields["intermediate_size"] = m.ffn
    if m.is_mla:  # the backend runs MLA with tpa = 1 only (the latent is one KV head)
        fields.update(kv_lora_rank=m.kv_lora, qk_rope_head_dim=m.rope_dim)
    return type(m.name, (), fields)()


def backend_error(m: ModelSpec, kvp: int, tpa: int, tpf: int | None = None) -> str | None:
    """Why ``Layout.validate`` refuses (kvp, tpa[, tpf]) for m, or None. MoE FFN splits are checked elsewhere."""
    try:
        Layout(kvp, tpa, tpf=tpf if not m.is_moe else None).validate(_config(m))
    except ValueError as e:
        return str(e)
    return None


def divisors(n: int) -> list:
    return [d for d in range(1, n + 1) if n % d == 0]


def _ffn_ok(m: ModelSpec, group: int, tpf: int, ep: int) -> bool:
    if tpf * ep != group:
        return False
    has_dense = not m.is_moe or m.dense_layers > 0
    if has_dense and m.ffn % group:
        return False
    if m.is_moe and (m.experts % ep or m.expert_ffn % tpf or m.shared_ffn % group):
        return False
    return True


def _ffn_splits(m: ModelSpec, group: int, ep_required: bool = False) -> list:
    """(tpf, ep) pairs for an FFN group of `group` GPUs."""
    eps = divisors(group) if m.is_moe else [1]
    out = [(group // ep, ep) for ep in eps if _ffn_ok(m, group, group // ep, ep)]
    return [p for p in out if p[1] > 1] if ep_required else out


def layout_error(m: ModelSpec, n: int, kvp: int, tpa: int, tpf: int, ep: int) -> str | None:
    """Why a Helix layout is invalid for model m on n GPUs, or None if it is valid."""
    if kvp * tpa != n:
        return f"kvp*tpa = {kvp}*{tpa} = {kvp * tpa} but the layout must cover {n} GPUs"
    if tpf * ep != n:
        return f"tpf*ep = {tpf}*{ep} = {tpf * ep} but the layout must cover {n} GPUs"
    if m.kv_heads % tpa:  # Helix proper: no KV head duplicated (tpa > K is the "tp" strategy)
        return (f"tpa = {tpa} does not divide the {m.kv_heads} KV heads of {m.name}"
                + (" (MLA caches one latent head, so tpa must be 1)" if m.is_mla else ""))
    err = backend_error(m, kvp, tpa, tpf if not m.is_moe else None)
    if err:
        return err
    if (not m.is_moe or m.dense_layers) and m.ffn % n:
        return f"intermediate size {m.ffn} is not divisible by N = {n} (dense FFN is TP over all GPUs)"
    if not m.is_moe and ep != 1:
        return f"ep = {ep} but {m.name} is dense (no experts); use ep = 1, tpf = {n}"
    if m.is_moe:
        if m.experts % ep:
            return f"{m.experts} experts are not divisible by ep = {ep}"
        if m.expert_ffn % tpf:
            return f"expert intermediate size {m.expert_ffn} is not divisible by tpf = {tpf}"
        if m.shared_ffn % n:
            return f"shared-expert intermediate size {m.shared_ffn} is not divisible by N = {n}"
    return None


def helix_layouts(m: ModelSpec, n: int) -> list:
    """Valid (kvp, tpa, tpf, ep) on exactly n GPUs."""
    out = []
    for tpa in divisors(m.kv_heads):
        if n % tpa:
            continue
        for tpf, ep in _ffn_splits(m, n):
            if layout_error(m, n, n // tpa, tpa, tpf, ep) is None:
                out.append((n // tpa, tpa, tpf, ep))
    return out


def mla_tp_error(m: ModelSpec, n: int) -> str | None:
    """Why the paper's TP baseline for MLA (latent duplicated on every GPU, query heads split n ways) is invalid on
    n GPUs, or None."""
    if m.q_heads % n:
        return f"tp = {n} does not divide the {m.q_heads} query heads of {m.name}"
    return None


def strategy_layouts(m: ModelSpec, strategy: str, n: int, backend_only: bool = False) -> list:
    """(kvp, tpa, dp, tpf, ep) tuples of one strategy on n GPUs. backend_only: only layouts the backend runs (the
    MLA TP baseline, with its latent duplicated n-fold, is left out)."""
    if strategy == "helix":
        return [(kvp, tpa, 1, tpf, ep) for kvp, tpa, tpf, ep in helix_layouts(m, n)]
    if strategy == "tp":  # Layout(kvp=1, tpa=n): KV heads duplicated once n > K
        if m.is_mla and n > 1:  # the paper's baseline: the latent duplicated on every GPU
            if backend_only or mla_tp_error(m, n):
                return []
        elif backend_error(m, 1, n, n if not m.is_moe else None):
            return []
        splits = [(n, 1)] if _ffn_ok(m, n, n, 1) else []
        return [(1, n, 1, tpf, ep) for tpf, ep in splits]
    if strategy == "tp_ep":
        if not m.is_moe or m.q_heads % n:
            return []
        return [(1, n, 1, tpf, ep) for tpf, ep in _ffn_splits(m, n, ep_required=True)]
    if strategy == "dp_ep":
        if not m.is_moe or m.experts % n:
            return []
        return [(1, tpa, n // tpa, 1, n) for tpa in divisors(m.kv_heads)
                if n % tpa == 0 and m.q_heads % tpa == 0]
    if strategy == "medha":
        out = []
        for tpa in divisors(m.kv_heads):
            if n % tpa or n == tpa or m.q_heads % tpa:
                continue
            out += [(n // tpa, tpa, 1, tpf, ep) for tpf, ep in _ffn_splits(m, tpa)]
        return out
    raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")


def candidates(m: ModelSpec, gpus: int, batches, strategies=STRATEGIES, replicas: bool = True, kv_block: int = 16,
               backend_only: bool = False):
    """Yield (candidate, replicas) for every strategy, GPU count and batch, batches in increasing order."""
    for n in (divisors(gpus) if replicas else [gpus]):
        for s in strategies:
            for kvp, tpa, dp, tpf, ep in strategy_layouts(m, s, n, backend_only):
                for b in sorted(batches):
                    yield Candidate(strategy=s, gpus=n, kvp=kvp, tpa=tpa, dp=dp, tpf=tpf, ep=ep, batch=b,
                                    kv_block=kv_block), gpus // n
