"""`helix bench`: decode and prefill timed on GPUs against TP = N, one GPU and the floor.

The work is ``helix_compile.bench`` (``bench/suite.py``); this module reads the flags.
"""

from __future__ import annotations

import argparse
import sys

from . import args as shared

DESCRIPTION = ("time decode (and prefill) on N GPUs: every Helix layout kvp x tpa of N, the tensor-parallel baseline "
               "TP = N, optionally one GPU with unmodified transformers; each with its memory-bandwidth floor")
EPILOG = """examples:
  helix bench --nproc-per-node 4 --models mqa,gqa2,gqa8 --contexts 32K,128K,256K --batches 1,8,32 --out bench-out
  helix bench --nproc-per-node 1 --models mqa --contexts 256K --batches 8 --baseline --prefill 32K
  helix bench --nproc-per-node 2 --layout kvp=2,tpa=1 --layout kvp=1,tpa=2 --contexts 1M
"""


def add_parser(subparsers):
    p = shared.subparser(subparsers, "bench", "time decode/prefill on GPUs: Helix layouts vs TP vs one GPU, with floors",
                         DESCRIPTION, EPILOG)
    shared.add_ranks(p, "N GPUs (default: all visible)")
    p.add_argument("--models", default="mqa,gqa8", help="comma list of mqa (K=1), gqa2 (K=2), gqa8 (K=8)")
    p.add_argument("--layers", type=shared.positive, default=8, help="decoder layers (8B-class widths, fewer layers)")
    shared.add_tokens(p, "--contexts", "comma list of cached lengths", default="32K,256K", many=True)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--steps", type=shared.positive, default=20)
    p.add_argument("--layout", action="append", type=shared.layout_text, metavar="LAYOUT",
                   help="time only this Helix layout, kvp=..,tpa=.. (repeat for several; default: every layout of N "
                        "and TP = N)")
    p.add_argument("--layouts", help=argparse.SUPPRESS)  # the ';'-separated list of earlier commands
    p.add_argument("--no-hopb", action="store_true")
    p.add_argument("--baseline", action="store_true", help="also one GPU with unmodified transformers")
    shared.add_tokens(p, "--prefill", "also time a prefill of this many tokens")
    shared.add_kv_dtype(p)
    p.add_argument("--profile", action="store_true",
                   help="also profile 5 steps of each helix row (torch.profiler): GPU busy vs exposed time, top "
                        "kernels in bench.json, a Chrome trace per row under --out")
    p.add_argument("--out", default="bench-out")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from pathlib import Path

    import torch

    from ..bench.suite import run_bench

    layouts = list(args.layout or [])
    if args.layouts and args.layouts != "all":
        layouts += [shared.layout_text.parse(entry) for entry in args.layouts.split(";") if entry.strip()]
    spec = dict(
        models=args.models.split(","), layers=args.layers, contexts=sorted(args.contexts),
        batches=[int(b) for b in args.batches.split(",")], steps=args.steps, layouts=layouts or "all",
        hopb=not args.no_hopb, baseline=args.baseline, prefill=args.prefill,
        profile=str(Path(args.out).resolve()) if args.profile else None, kv_dtype=args.kv_dtype,
    )
    n = args.nproc or torch.cuda.device_count()
    run_bench(n, spec, args.out, command="helix bench " + " ".join(sys.argv[2:]))
    return 0
