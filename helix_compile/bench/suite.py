"""`helix bench`'s work: one process per GPU (NCCL, through ``helix_compile.launch``), rank 0's rows, the report.

For N GPUs it times: every Helix layout kvp x tpa of N (each with HOP-B off, and on with 2 chunks where kvp > 1
and the batch allows), the tensor-parallel baseline TP = N (``Layout(kvp=1, tpa=N)``, KV heads duplicated when
N > K), and with ``baseline`` one GPU running unmodified transformers + torch.compile. With N = 1 the Helix
row is helix's own single-GPU program.

    spec = dict(models=["mqa"], layers=8, contexts=[32768], batches=[1, 8], steps=20, layouts="all", hopb=True,
                baseline=False, prefill=None, profile=None)
    run_bench(4, spec, "bench-out", command="...")       # bench-out/bench.json (helix-bench/1) and the plots
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def run_bench(n: int, spec: dict, out, command: str) -> dict:
    """Time ``spec`` on ``n`` GPUs (rank r on cuda:r) and write the report into ``out``; returns rank 0's data.
    ``spec["layouts"]``: "all", or a list of layout dicts (``parse.parse_layout``) to time instead."""
    import torch

    from ..launch import run_ranks
    from .report import write

    if n < 1 or torch.cuda.device_count() < n:
        raise ValueError(f"--nproc-per-node {n}: this machine has {torch.cuda.device_count()} CUDA devices")
    start = time.time()
    results = run_ranks(n, _rank_main, spec, backend="nccl")
    write(Path(out), results[0], n, spec, command=command, seconds=time.time() - start)
    return results[0]


def layouts_for(n: int, kv_heads: int, q_heads: int, spec) -> list[tuple[str, object]]:
    from ..layout import Layout

    if spec["layouts"] != "all":
        return [("helix", Layout(**{"kv_block": 16, **fields})) for fields in spec["layouts"]]
    out = []
    for tpa in (t for t in range(1, n + 1) if n % t == 0 and t <= kv_heads and kv_heads % t == 0):
        out.append(("helix", Layout(n // tpa, tpa, kv_block=16)))
    if n > 1:
        out.append(("tp", Layout(1, n, kv_block=16)))  # the TP baseline: KV heads duplicated when N > K
    return out


def _rank_main(rank: int, spec: dict):
    import torch
    from transformers import AutoModelForCausalLM

    from . import measure
    from ..layout import Layout

    n = torch.distributed.get_world_size()
    bw = measure.hbm_read_gbs()
    coll = measure.collective_us(n) if n > 1 else []
    rows, prefill = [], []
    profile_dir = None
    if spec.get("profile"):
        profile_dir = Path(spec["profile"])
        profile_dir.mkdir(parents=True, exist_ok=True)
    for name in spec["models"]:
        cfg = measure.model_config(name, spec["layers"])
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
        for p in model.parameters():
            p.requires_grad_(False)
        seen = set()
        for batch in spec["batches"]:
            for strategy, layout in layouts_for(n, cfg.num_key_value_heads, cfg.num_attention_heads, spec):
                if (strategy, layout) in seen and strategy == "tp":
                    continue
                seen.add((strategy, layout))
                chunks = [1] + ([2] if spec["hopb"] and layout.kvp > 1 and batch % 2 == 0 and strategy == "helix" else [])
                for c in chunks:
                    lay = Layout(layout.kvp, layout.tpa, kv_block=layout.kv_block, hopb_chunks=c)
                    rows += measure.helix_rows(model, name, cfg, lay, strategy, batch, spec["contexts"], spec["steps"],
                                               bw, coll, n, profile_dir, spec.get("kv_dtype", "auto"))
                    _log(rank, rows[-len(spec["contexts"]):])
            if spec["baseline"] and rank == 0:
                base = measure.transformers_rows(model, name, cfg, batch, spec["contexts"], spec["steps"], bw)
                rows += base
                _log(rank, base)
            torch.distributed.barrier()
        if spec["prefill"]:
            for strategy, layout in layouts_for(n, cfg.num_key_value_heads, cfg.num_attention_heads, spec)[:1]:
                prefill.append(measure.prefill_row(model, name, cfg, layout, strategy, spec["prefill"], n,
                                                   spec.get("kv_dtype", "auto")))
            if rank == 0:
                prefill.append(measure.sdpa_prefill_row(model, name, spec["prefill"]))
            _log(rank, prefill[-2:])
            torch.distributed.barrier()
        del model
        torch.cuda.empty_cache()
    import dataclasses

    return dict(hbm_read_gbs=bw, collectives=coll, rows=[dataclasses.asdict(r) for r in rows], prefill=prefill,
                device=torch.cuda.get_device_name(0), torch=torch.__version__,
                nccl=".".join(map(str, torch.cuda.nccl.version())), triton=__import__("triton").__version__,
                transformers=__import__("transformers").__version__)


def _log(rank, rows):
    if rank != 0:
        return
    import dataclasses

    for r in rows:
        print(json.dumps(dataclasses.asdict(r) if dataclasses.is_dataclass(r) else r), flush=True)
