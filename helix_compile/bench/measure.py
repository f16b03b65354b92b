"""What one rank of `helix bench` runs: build the model, fill the cache, time decode steps; the floor of each row.

Models: Llama-shaped with 8B-class dimensions (hidden 4096, 32 query heads of 128, intermediate 14336, vocab
128256) and K = 1, 2 or 8 KV heads; the layer count is reduced (``--layers``) so that long contexts fit. Weights
are random bf16: decode time does not depend on their values.

Cache. The helix StaticCache is sized for the longest context; its local shards are filled with random keys and
values once, and each context is then set by its position counters (``cumulative_length`` on the device,
``host_length`` on the host). The partial-attention kernel reads only the filled slots, so one compiled program
serves every context. The transformers baseline's StaticCache reads its whole length each step, so it is sized to
each context (a compile per context). With ``kv_dtype="fp8"`` the helix cache holds float8_e4m3fn (random normal
keys/values rounded to fp8, every scale 1) and the floor counts one byte per KV element.

Timing. Per configuration: the first call compiles (``compile_s``), two more warm up and capture the CUDA graph,
then ``steps`` decode steps run back to back with one synchronisation at the end (``ttl_ms``, the time per output
token when the host never waits), and ``steps`` more each timed to the return of the call (``host_ms``, the host
time per step, launch to launch).

Profile (``--profile``): after the timing, ``profile_steps`` records ``steps`` more steps under torch.profiler
(CPU + CUDA activities; kernels replayed from a CUDA graph are traced too) and keeps, per step: the wall time, the
time some kernel runs on the GPU (the union of kernel intervals: ``gpu_busy_ms``), what is left exposed
(``exposed_ms`` = wall - busy: launches, host work, gaps), and the kernels by GPU time. The Chrome trace of the
first rank goes next to bench.json.

Floor of a row: (local KV bytes + local weight bytes read per step) / measured HBM read bandwidth, plus the
step's collectives at their measured in-graph latency (per layer one all-to-all over the KVP group when kvp > 1
and two all-reduces over all N ranks when N > 1).
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.distributed as dist

MODELS = {"mqa": 1, "gqa2": 2, "gqa8": 8}  # name -> KV heads
DIMS = dict(hidden_size=4096, num_attention_heads=32, head_dim=128, intermediate_size=14336, vocab_size=128256)


def model_config(name: str, layers: int):
    from transformers import LlamaConfig

    if name not in MODELS:
        raise ValueError(f"unknown bench model {name!r}; choose from {', '.join(MODELS)}")
    return LlamaConfig(**DIMS, num_key_value_heads=MODELS[name], num_hidden_layers=layers,
                       max_position_embeddings=1 << 21, tie_word_embeddings=False)


def local_weight_bytes(cfg, tpa: int, n: int, batch: int, itemsize: int = 2) -> int:
    """Bytes of weights one rank reads per decode step: its q/k/v/o and FFN shards, the replicated LM head and
    norms, and only the batch's rows of the embedding table."""
    h, d, q, k, i = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    kv_local = max(1, k // tpa)  # tpa > K (the TP baseline) keeps one KV head per rank
    per_layer = h * (q // tpa) * d + 2 * h * kv_local * d + (q * d // n) * h + 3 * h * (i // n) + 2 * h
    return itemsize * (cfg.num_hidden_layers * per_layer + cfg.vocab_size * h + h + batch * h)


def local_kv_bytes(cfg, layout, context: int, batch: int, itemsize: int = 2) -> int:
    """Bytes of K and V one rank reads per decode step at this context (its filled local slots)."""
    cycle = layout.kv_block * layout.kvp
    rank = 0  # KVP rank 0 holds the most slots (ranks differ by at most one block)
    slots = (context // cycle) * layout.kv_block + min(max(context % cycle - rank * layout.kv_block, 0), layout.kv_block)
    kv_local = max(1, cfg.num_key_value_heads // layout.tpa)
    return 2 * itemsize * cfg.num_hidden_layers * batch * kv_local * slots * cfg.head_dim


def graphed_us(fn, reps=20) -> float:
    """Microseconds per call of fn, replayed back to back from one CUDA graph (no launch overhead)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / (5 * reps) * 1e6


def hbm_read_gbs() -> float:
    x = torch.empty(4 << 30, dtype=torch.uint8, device="cuda").view(torch.bfloat16).normal_()
    us = graphed_us(lambda: x.sum(dtype=torch.float32), reps=10)
    gbs = x.nbytes / (us * 1e-6) / 1e9
    del x
    torch.cuda.empty_cache()
    return gbs


def collective_us(n: int, group=None) -> dict:
    """In-graph latency of the step's collectives at decode payloads (4 KiB .. 4 MiB per rank)."""
    from torch.distributed import _functional_collectives as funcol

    out = []
    for nbytes in (4096, 65536, 1 << 20, 4 << 20):
        x = torch.ones(nbytes // 2, dtype=torch.bfloat16, device="cuda")
        name = dist.group.WORLD.group_name
        for op, fn in (("all_reduce", lambda: funcol.wait_tensor(funcol.all_reduce(x, "sum", name))),
                       ("all_to_all", lambda: funcol.wait_tensor(funcol.all_to_all_single(x, None, None, name)))):
            out.append(dict(op=op, group_size=n, bytes_per_rank=nbytes, us=graphed_us(fn, reps=10)))
    return out


def fill_cache(cache, context: int) -> None:
    """Set every layer's position counters to ``context`` (the shards hold random keys/values already)."""
    for layer in cache.layers:
        layer.cumulative_length.fill_(context)
    cache.host_length = context


@dataclasses.dataclass
class Row:
    model: str
    kv_heads: int
    layers: int
    gpus: int
    strategy: str  # helix | tp | single-transformers
    kvp: int
    tpa: int
    hopb_chunks: int
    batch: int
    context: int
    ttl_ms: float = math.nan
    host_ms: float = math.nan
    floor_ms: float = math.nan
    kv_gb: float = 0.0
    weight_gb: float = 0.0
    mem_gb: float = 0.0
    compile_s: float = math.nan
    error: str | None = None
    profile: dict | None = None
    kv_dtype: str = "bf16"  # the helix cache's elements: bf16 or fp8


@torch.no_grad()
def time_steps(step, steps: int):
    """(ttl_ms back to back, host_ms per call) over ``steps`` decode steps each; step() runs one decode step."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    ttl = (time.perf_counter() - t) / steps * 1e3
    host = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        host.append(time.perf_counter() - t)
        torch.cuda.synchronize()
    host.sort()
    return ttl, host[len(host) // 2] * 1e3


def busy_us(intervals) -> float:
    """Length of the union of (start, end) intervals: the time at least one of them runs."""
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


@torch.no_grad()
def profile_steps(step, steps: int, trace=None) -> dict:
    """Per-step wall time, GPU-busy time, exposed time and the top kernels over ``steps`` profiled steps."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t) / steps * 1e3
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    busy_ms = busy_us([(e.time_range.start, e.time_range.end) for e in kernels]) / steps / 1e3
    by_name: dict[str, list] = {}
    for e in kernels:
        acc = by_name.setdefault(e.name, [0.0, 0])
        acc[0] += e.time_range.elapsed_us()
        acc[1] += 1
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:12]
    return dict(steps=steps, wall_ms=wall_ms, gpu_busy_ms=busy_ms, exposed_ms=wall_ms - busy_ms,
                kernels_per_step=len(kernels) / steps,
                top=[dict(kernel=k[:120], ms_per_step=v[0] / steps / 1e3, calls_per_step=v[1] / steps) for k, v in top])


def fill_random(cache) -> None:
    """Random normal keys and values in every layer's shards (rounded to fp8 for an FP8 cache, with scales 1)."""
    for layer in cache.layers:
        for shard in (layer.local_keys, layer.local_values):
            if shard.dtype == torch.float8_e4m3fn:
                for b in range(shard.shape[0]):  # one batch row at a time: a bf16 copy of the whole shard is 2x it
                    shard[b].copy_(torch.randn(shard[b].shape, dtype=torch.bfloat16, device=shard.device))
            else:
                shard.normal_()
        if layer.k_scale is not None:
            layer.k_scale.fill_(1.0)
            layer.v_scale.fill_(1.0)


def helix_rows(model, name, cfg, layout, strategy, batch, contexts, steps, bw, coll, n, profile_dir=None,
               kv_dtype: str = "auto") -> list[Row]:
    from .. import StaticCache

    torch._dynamo.reset()
    torch.cuda.reset_peak_memory_stats()  # mem_gb is this configuration's peak
    max_len = max(contexts) + 8 * steps
    rows = [Row(name, cfg.num_key_value_heads, cfg.num_hidden_layers, n, strategy, layout.kvp, layout.tpa,
                layout.hopb_chunks, batch, c, kv_dtype="fp8" if kv_dtype == "fp8" else "bf16") for c in contexts]
    try:
        cache = StaticCache(cfg, batch, max_len, layout, dtype=torch.bfloat16, device="cuda", kv_dtype=kv_dtype)
        fill_random(cache)
        compiled = torch.compile(model, backend="helix", options={"layout": layout}, fullgraph=True)
        tok = torch.zeros(batch, 1, dtype=torch.long, device="cuda")

        def step():
            return compiled(input_ids=tok, past_key_values=cache, logits_to_keep=1).logits

        for row in rows:
            fill_cache(cache, row.context)
            if math.isnan(rows[0].compile_s):
                t = time.perf_counter()
                step()
                torch.cuda.synchronize()
                rows[0].compile_s = time.perf_counter() - t
            row.ttl_ms, row.host_ms = time_steps(step, steps)
            _floor(row, cfg, layout, bw, coll, n, batch)
            if profile_dir is not None:
                trace = None
                if dist.get_rank() == 0:
                    trace = profile_dir / (f"trace-{name}-{strategy}-kvp{layout.kvp}-tpa{layout.tpa}-hopb"
                                           f"{layout.hopb_chunks}-b{batch}-ctx{row.context}.json")
                row.profile = profile_steps(step, min(steps, 5), trace)
            row.mem_gb = torch.cuda.max_memory_allocated() / 1e9
    except Exception as e:  # a configuration that does not fit or is refused: recorded, the sweep goes on
        for row in rows:
            if math.isnan(row.ttl_ms):
                row.error = f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        cache = compiled = None
        torch.cuda.empty_cache()
    return rows


def _floor(row: Row, cfg, layout, bw, coll, n, batch):
    kv = local_kv_bytes(cfg, layout, row.context, batch, itemsize=1 if row.kv_dtype == "fp8" else 2)
    w = local_weight_bytes(cfg, layout.tpa, n, batch)
    row.kv_gb, row.weight_gb = kv / 1e9, w / 1e9
    us = 0.0
    if n > 1:
        hd = cfg.head_dim
        a2a = batch * cfg.num_attention_heads // layout.tpa * (hd + 2) * 2  # packed partials per rank
        ar = batch * cfg.hidden_size * 2
        us = cfg.num_hidden_layers * ((_lookup(coll, "all_to_all", a2a) if layout.kvp > 1 else 0.0)
                                      + 2 * _lookup(coll, "all_reduce", ar))
    row.floor_ms = (kv + w) / (bw * 1e9) * 1e3 + us / 1e3


def _lookup(coll, op, nbytes) -> float:
    """Measured latency of ``op`` at the smallest measured payload >= nbytes (the largest if none)."""
    rows = sorted((r for r in coll if r["op"] == op), key=lambda r: r["bytes_per_rank"])
    for r in rows:
        if r["bytes_per_rank"] >= nbytes:
            return r["us"]
    return rows[-1]["us"]


def transformers_rows(model, name, cfg, batch, contexts, steps, bw) -> list[Row]:
    """One GPU, unmodified transformers + torch.compile(mode="reduce-overhead") with transformers' StaticCache."""
    from transformers import StaticCache as HFStaticCache

    from ..layout import Layout

    rows = []
    for context in contexts:
        row = Row(name, cfg.num_key_value_heads, cfg.num_hidden_layers, 1, "single-transformers", 1, 1, 1, batch, context)
        rows.append(row)
        torch._dynamo.reset()
        torch.cuda.reset_peak_memory_stats()
        try:
            cache = HFStaticCache(cfg, max_cache_len=context + 8 * steps)
            cache.early_initialization(batch, cfg.num_key_value_heads, cfg.head_dim, torch.bfloat16, torch.device("cuda"))
            for layer in cache.layers:
                layer.keys.normal_()
                layer.values.normal_()
                layer.cumulative_length.fill_(context)
            compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
            tok = torch.zeros(batch, 1, dtype=torch.long, device="cuda")
            pos = torch.tensor([context], device="cuda")

            def step():
                return compiled(input_ids=tok, past_key_values=cache, cache_position=pos, logits_to_keep=1).logits.clone()

            t = time.perf_counter()
            step()
            torch.cuda.synchronize()
            row.compile_s = time.perf_counter() - t
            row.ttl_ms, row.host_ms = time_steps(step, steps)
            # transformers reads its whole static cache every step
            full = Layout(1, 1, kv_block=16)
            row.kv_gb = local_kv_bytes(cfg, full, context + 8 * steps, batch) / 1e9
            row.weight_gb = local_weight_bytes(cfg, 1, 1, batch) / 1e9
            row.floor_ms = (row.kv_gb + row.weight_gb) / bw * 1e3
            row.mem_gb = torch.cuda.max_memory_allocated() / 1e9
        except Exception as e:
            row.error = f"{type(e).__name__}: {str(e)[:300]}"
        finally:
            cache = compiled = None
            torch.cuda.empty_cache()
    return rows


def prefill_row(model, name, cfg, layout, strategy, length: int, n: int, kv_dtype: str = "auto") -> dict:
    """Time one prefill of ``length`` tokens (batch 1) through helix: compile call, then a timed second call."""
    from .. import StaticCache

    torch._dynamo.reset()
    out = dict(model=name, strategy=strategy, kvp=layout.kvp, tpa=layout.tpa, gpus=n, prompt=length,
               kv_dtype="fp8" if kv_dtype == "fp8" else "bf16")
    try:
        cache = StaticCache(cfg, 1, length + 16, layout, dtype=torch.bfloat16, device="cuda", kv_dtype=kv_dtype)
        compiled = torch.compile(model, backend="helix", options={"layout": layout, "cudagraphs": False},
                                 fullgraph=True)
        ids = torch.randint(0, cfg.vocab_size, (1, length), device="cuda")
        t = time.perf_counter()
        compiled(input_ids=ids, past_key_values=cache, logits_to_keep=1)
        torch.cuda.synchronize()
        out["compile_s"] = time.perf_counter() - t
        cache.reset()
        t = time.perf_counter()
        compiled(input_ids=ids, past_key_values=cache, logits_to_keep=1)
        torch.cuda.synchronize()
        out["ms"] = (time.perf_counter() - t) * 1e3
        out["tokens_per_s"] = length / out["ms"] * 1e3
        out["mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    torch.cuda.empty_cache()
    return out


@torch.no_grad()
def sdpa_prefill_row(model, name, length: int) -> dict:
    """The same prefill on one GPU with unmodified transformers (SDPA), no cache: the single-GPU yardstick."""
    out = dict(model=name, strategy="single-transformers-sdpa", gpus=1, prompt=length)
    try:
        ids = torch.randint(0, model.config.vocab_size, (1, length), device="cuda")
        model(input_ids=ids, logits_to_keep=1, use_cache=False)
        torch.cuda.synchronize()
        t = time.perf_counter()
        model(input_ids=ids, logits_to_keep=1, use_cache=False)
        torch.cuda.synchronize()
        out["ms"] = (time.perf_counter() - t) * 1e3
        out["tokens_per_s"] = length / out["ms"] * 1e3
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    torch.cuda.empty_cache()
    return out
