"""`helix bench`: the command line. Launches one process per GPU (NCCL), gathers rank 0's rows, writes the report.

    helix bench --gpus 4 --models mqa,gqa8 --contexts 32K,256K --batches 1,8,32 --out docs/perf

For N GPUs it times: every Helix layout kvp x tpa of N (each with HOP-B off, and on with 2 chunks where kvp > 1
and the batch allows), the tensor-parallel baseline TP = N (``Layout(kvp=1, tpa=N)``, KV heads duplicated when
N > K), and with ``--baseline`` one GPU running unmodified transformers + torch.compile. With N = 1 the Helix
row is helix's own single-GPU program.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

EPILOG = """examples:
  helix bench --gpus 4 --models mqa,gqa2,gqa8 --contexts 32K,128K,256K --batches 1,8,32 --out docs/perf
  helix bench --gpus 1 --models mqa --contexts 256K --batches 8 --baseline --prefill 32K
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="time decode/prefill on GPUs: Helix layouts vs TP vs one GPU, with floors",
                              description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=None, help="N GPUs (default: all visible)")
    p.add_argument("--models", default="mqa,gqa8", help="comma list of mqa (K=1), gqa2 (K=2), gqa8 (K=8)")
    p.add_argument("--layers", type=int, default=8, help="decoder layers (8B-class widths, fewer layers)")
    p.add_argument("--contexts", default="32K,256K", help="comma list; K = 1024 tokens here")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--layouts", default="all", help="'all' or ';'-separated kvp=..,tpa=.. entries")
    p.add_argument("--no-hopb", action="store_true")
    p.add_argument("--baseline", action="store_true", help="also one GPU with unmodified transformers")
    p.add_argument("--prefill", default=None, help="also time a prefill of this many tokens (e.g. 32K)")
    p.add_argument("--profile", action="store_true",
                   help="also profile 5 steps of each helix row (torch.profiler): GPU busy vs exposed time, top "
                        "kernels in bench.json, a Chrome trace per row under --out")
    p.add_argument("--out", default="bench-out")
    p.set_defaults(func=run)
    return p


def tokens(text: str) -> int:
    text = text.strip().upper()
    scale = 1 << 20 if text.endswith("M") else 1 << 10 if text.endswith("K") else 1
    return int(float(text.rstrip("MK")) * scale)


def run(args) -> int:
    import torch

    n = args.gpus or torch.cuda.device_count()
    if n < 1 or torch.cuda.device_count() < n:
        raise ValueError(f"--gpus {n}: this machine has {torch.cuda.device_count()} CUDA devices")
    for var in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        os.environ.setdefault(var, "0" if var == "NCCL_NVLS_ENABLE" else "1")  # NVLink multicast stays off
    spec = dict(
        models=args.models.split(","), layers=args.layers, contexts=sorted(tokens(c) for c in args.contexts.split(",")),
        batches=[int(b) for b in args.batches.split(",")], steps=args.steps, layouts=args.layouts,
        hopb=not args.no_hopb, baseline=args.baseline, prefill=tokens(args.prefill) if args.prefill else None,
        profile=str(Path(args.out).resolve()) if args.profile else None,
    )
    from ..launch import run_ranks

    start = time.time()
    results = run_ranks(n, _rank_main, spec, backend="nccl")
    from .report import write

    write(Path(args.out), results[0], n, spec, command="helix bench " + " ".join(_argv()), seconds=time.time() - start)
    return 0


def _argv():
    import sys

    return sys.argv[2:] if len(sys.argv) > 2 else []


def layouts_for(n: int, kv_heads: int, q_heads: int, spec) -> list[tuple[str, object]]:
    from ..layout import Layout

    if spec["layouts"] != "all":
        out = []
        for entry in spec["layouts"].split(";"):
            fields = dict(kv.split("=") for kv in entry.split(","))
            out.append(("helix", Layout(**{k: int(v) for k, v in fields.items()}, kv_block=16)))
        return out
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
                                               bw, coll, n, profile_dir)
                    _log(rank, rows[-len(spec["contexts"]):])
            if spec["baseline"] and rank == 0:
                base = measure.transformers_rows(model, name, cfg, batch, spec["contexts"], spec["steps"], bw)
                rows += base
                _log(rank, base)
            torch.distributed.barrier()
        if spec["prefill"]:
            for strategy, layout in layouts_for(n, cfg.num_key_value_heads, cfg.num_attention_heads, spec)[:1]:
                prefill.append(measure.prefill_row(model, name, cfg, layout, strategy, spec["prefill"], n))
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
