"""Evaluate every candidate layout and batch, keep the feasible ones, and pick a recommendation."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .cost import BACKEND, BACKEND_STRATEGIES, STRATEGIES, Candidate, Costing, evaluate
from .enumerate import backend_error, candidates, helix_layouts, layout_error, strategy_layouts
from .hardware import DTYPE_BYTES, Hardware, get_hardware
from .model import ModelSpec, get_model
from .pareto import frontier
from ..parse import parse_layout, parse_tokens

def batch_sweep(max_batch: int) -> list:
    """Every batch 1..64, then 8 points per doubling (72, 80, ..., 128, 144, ...) up to max_batch, max_batch
    included. Fine enough that neither the "up to" ratios nor Figure 7's curves are artefacts of the grid (with
    only powers of two above 64, a jump from batch 256 to 512 read as a 40% HOP-B loss)."""
    out = set(range(1, min(64, max_batch) + 1))
    base = 64
    while base < max_batch:
        out |= {base * (8 + j) // 8 for j in range(1, 9) if base * (8 + j) // 8 <= max_batch}
        base *= 2
    return sorted(out | {max_batch})


@dataclass
class Plan:
    model: ModelSpec
    hw: Hardware
    gpus: int
    context: int
    dtype: str
    ttl_ms: float | None
    evaluations: list
    frontier: list = field(default_factory=list)
    best: object = None
    kv_dtype: str | None = None  # the KV cache's element type when it differs from dtype

    def to_dict(self) -> dict:
        on_front = {id(e) for e in self.frontier}
        return {
            "model": self.model.name, "hardware": self.hw.name, "gpus": self.gpus, "context": self.context,
            "dtype": self.dtype, **({"kv_dtype": self.kv_dtype} if self.kv_dtype else {}), "ttl_ms_limit": self.ttl_ms,
            "best": self.best.to_dict() if self.best else None,
            "layouts": [{**e.to_dict(), "pareto": id(e) in on_front} for e in self.evaluations],
        }


def _check_inputs(m: ModelSpec, hw: Hardware, gpus: int, dtype: str):
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPE_BYTES)}")
    hw.flops(dtype)  # raises if the card lacks this dtype
    if gpus < 1:
        raise ValueError(f"--gpus must be at least 1, got {gpus}")
    if gpus > hw.max_gpus:
        raise ValueError(f"{gpus} GPUs exceed one NVLink domain of {hw.name} ({hw.max_gpus} GPUs); "
                         f"the planner models a single NVLink domain (use --hw gb200 for up to 72)")


def plan(model, gpus: int, context, batch: int | None = None, dtype: str = "bf16", hw="h200", layout=None,
         ttl_ms: float | None = None, strategies=STRATEGIES, replicas: bool = True, max_batch: int = 4096,
         hopb: bool = True, costing: Costing = BACKEND, backend_only: bool = False, kv_dtype: str | None = None) -> Plan:
    """Evaluate layouts x batches for `model` on up to `gpus` GPUs at `context` tokens; return a Plan.

    batch None sweeps 1..64 then powers of two up to max_batch (stopping per layout once memory runs out).
    costing: BACKEND (what helix_compile runs) or cost.PAPER (the paper's target system). layout (a dict or a
    'kvp=..,tpa=..' string) restricts the search to that Helix layout on exactly `gpus` GPUs. ttl_ms keeps only
    layouts whose time per token is within it. best: the highest tokens/s/GPU within ttl_ms if given, else the
    lowest TTL. hopb False runs Helix without HOP-B (one exchange per layer, fully exposed). backend_only leaves out
    the layouts the backend does not run (the MLA TP baseline, whose latent is duplicated on every GPU). kv_dtype
    (a planner name or torch dtype; None: ``dtype``) costs the KV cache's bytes, read and held, in that type: "fp8"
    for ``StaticCache(kv_dtype=torch.float8_e4m3fn)``, one byte per element.
    """
    m, hw = get_model(model), get_hardware(hw)
    S = parse_tokens(context, "context")
    _check_inputs(m, hw, gpus, dtype)
    kv_dtype = planner_dtype(kv_dtype) if kv_dtype is not None and kv_dtype != "auto" else None
    kv_dtype = None if kv_dtype == dtype else kv_dtype
    if batch is not None and batch < 1:
        raise ValueError(f"--batch must be at least 1, got {batch}")
    batches = [batch] if batch else batch_sweep(max_batch)
    if layout is not None:
        lay = parse_layout(layout)
        if "kvp" not in lay and "tpa" not in lay:
            raise ValueError(f"invalid layout {layout!r}: give at least kvp or tpa")
        cands = list(_layout_candidates(m, gpus, lay, batches))
    else:
        cands = list(candidates(m, gpus, batches, strategies, replicas, backend_only=backend_only))
    evals, dead = [], set()
    if not hopb:
        cands = [(replace(c, hopb_chunks=1), r) for c, r in cands]
    for c, reps in cands:
        key = (c.strategy, c.gpus, c.kvp, c.tpa, c.dp, c.tpf, c.ep)
        if key in dead:  # memory grows with batch: once a batch does not fit, larger ones do not either
            continue
        e = evaluate(m, hw, c, S, dtype, reps, costing, kv_dtype)
        if not e.feasible and batch is None:
            dead.add(key)
        evals.append(e)
    ok = [e for e in evals if e.feasible and (ttl_ms is None or e.ttl_s * 1e3 <= ttl_ms)]
    best = None
    if ok:
        best = max(ok, key=lambda e: e.tokens_per_s_per_gpu) if ttl_ms else min(ok, key=lambda e: e.ttl_s)
    return Plan(model=m, hw=hw, gpus=gpus, context=S, dtype=dtype, ttl_ms=ttl_ms, evaluations=evals,
                frontier=frontier(ok), best=best, kv_dtype=kv_dtype)


def _layout_candidates(m: ModelSpec, gpus: int, lay: dict, batches):
    kvp, tpa = lay.get("kvp"), lay.get("tpa")
    for name, v in (("kvp", kvp), ("tpa", tpa)):
        if v is not None and gpus % v:
            raise ValueError(f"--layout {name}={v} does not divide --gpus {gpus}: kvp*tpa must equal N")
    kvp = gpus // tpa if kvp is None else kvp
    tpa = gpus // kvp if tpa is None else tpa
    if kvp * tpa != gpus:
        raise ValueError(f"--layout kvp={kvp}, tpa={tpa} covers kvp*tpa = {kvp * tpa} GPUs but --gpus is {gpus}: "
                         f"kvp*tpa must equal N")
    if "tpf" in lay or "ep" in lay:
        tpf, ep = lay.get("tpf"), lay.get("ep")
        for name, v in (("tpf", tpf), ("ep", ep)):
            if v is not None and gpus % v:
                raise ValueError(f"--layout {name}={v} does not divide --gpus {gpus}: tpf*ep must equal N")
        ffn = [(gpus // ep if tpf is None else tpf, gpus // tpf if ep is None else ep)]
    else:
        ffn = sorted({(f, e) for k, t, f, e in helix_layouts(m, gpus) if (k, t) == (kvp, tpa)}) or [(gpus, 1)]
    for tpf, ep in ffn:
        err = layout_error(m, gpus, kvp, tpa, tpf, ep)
        if err:
            raise ValueError(f"invalid --layout for {m.name} on {gpus} GPUs: {err}")
        for b in sorted(batches):
            yield Candidate("helix", gpus, kvp, tpa, tpf, ep, b, hopb_chunks=lay.get("hopb_chunks", 0),
                            kv_block=lay.get("kv_block", 16)), 1


_TORCH_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "bf16", "float8_e4m3fn": "fp8",
                 "float8_e5m2": "fp8"}


def planner_dtype(dtype) -> str:
    """'fp32' | 'bf16' | 'fp8' | 'fp4' from a planner name or a torch dtype (float16 costs as bf16: same bytes)."""
    name = str(dtype).removeprefix("torch.")
    name = _TORCH_DTYPES.get(name, name)
    if name not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPE_BYTES)} or a torch dtype "
                         f"({', '.join(_TORCH_DTYPES)})")
    return name


def choose_layout(config, world_size: int, context_len, batch_size: int | None = None, dtype="bf16",
                  hw="h200", kv_dtype=None) -> dict:
    """The layout the backend should run: the lowest predicted time per token on exactly world_size GPUs.

    config: an HF PretrainedConfig, a config dict, a preset name or a config.json path. dtype: the weights' and
    the cache's dtype (a planner name or a torch dtype; ``StaticCache(layout="auto")`` passes its own); kv_dtype:
    the cache's when it differs (an FP8 cache).
    Candidates are Helix layouts (kvp x tpa, tpa dividing K) and the tensor-parallel baseline (kvp=1, tpa=N),
    each accepted by the backend's ``Layout.validate`` and costed as the backend runs it (replicated LM head, all
    collectives exposed, MLA absorbed). MoE models get their expert split too (ep > 1 when it is faster); MLA models
    get tpa = 1. Returns plain ints {kvp, tpa, tpf, ep} with kvp*tpa = tpf*ep = world_size. batch_size None plans
    for one request. Raises ValueError naming the reason when no layout is valid or none fits in memory.
    """
    m, hwo = get_model(config), get_hardware(hw)
    dtype = planner_dtype(dtype)
    _check_inputs(m, hwo, world_size, dtype)
    if not any(strategy_layouts(m, s, world_size, backend_only=True) for s in BACKEND_STRATEGIES):
        reasons = {backend_error(m, world_size // t, t, world_size) for t in range(1, world_size + 1)
                   if world_size % t == 0}
        raise ValueError(f"no layout of {m.name} runs on {world_size} GPUs: " + "; ".join(sorted(r for r in reasons if r)))
    # hopb=False: the returned layout carries no hopb_chunks, so the backend runs it with HOP-B off
    p = plan(m, world_size, context_len, batch=batch_size or 1, dtype=dtype, hw=hwo, strategies=BACKEND_STRATEGIES,
             replicas=False, hopb=False, backend_only=True, kv_dtype=kv_dtype)
    fits = [e for e in p.evaluations if e.feasible]
    if not fits:
        least = min(p.evaluations, key=lambda e: e.memory_gb)
        raise ValueError(f"no layout of {m.name} fits on {world_size} x {hwo.name} at context {p.context} and "
                         f"batch {batch_size or 1}: the smallest needs {least.memory_gb:.1f} GB per GPU "
                         f"(of {hwo.memory_gb:.0f} GB); use more GPUs, a smaller batch/context or a narrower dtype")
    # Ties (e.g. kvp=1 Helix and TP when N <= K: the same program) go to less KV sharding, then to Helix.
    c = min(fits, key=lambda e: (round(e.ttl_s, 12), e.candidate.kvp, e.candidate.strategy != "helix")).candidate
    return {"kvp": int(c.kvp), "tpa": int(c.tpa), "tpf": int(c.tpf), "ep": int(c.ep)}
