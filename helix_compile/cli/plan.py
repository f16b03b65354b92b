"""`helix plan`: the layout search and its Pareto frontier. The work is ``helix_compile.planner``."""
from __future__ import annotations

import json
import sys

from ..planner.cost import BACKEND, PAPER, STRATEGIES, payload_precision
from ..planner.hardware import HARDWARE_NAMES
from ..planner.model import PRESETS
from . import args as shared

EPILOG = """examples:
  helix plan --model llama-3.1-405b --nproc-per-node 64 --context 1000000 --dtype fp4 --hw gb200 --png pareto.png
  helix plan --model path/to/config.json --nproc-per-node 4 --context 128K --batch 8 --layout kvp=2,tpa=2 --json
  helix plan --model deepseek-r1 --nproc-per-node 64 --context 1e6 --dtype fp4 --hw gb200 --ttl-ms 5 --costing paper
  helix plan --paper planner-out/          # Figure 1 and the paper's comparisons at S = 10^6 tokens
  helix plan --calibrate bench.json --save-hw h200-calibrated.json
"""
DTYPES = ("bfloat16", "float16", "float32", "fp8", "fp4")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = shared.subparser(subparsers, "plan", "pick kvp/tpa/tpf/ep and batch from a decode cost model",
                         "Evaluate Helix and baseline layouts with a roofline + collective cost model; print the "
                         "Pareto frontier (tokens/s/user vs tokens/s/GPU).", EPILOG)
    p.add_argument("--model", help=f"preset ({', '.join(PRESETS)}) or path to an HF config.json / its directory")
    shared.add_ranks(p, "GPU budget N (layouts on divisors of N run as replicas)")
    shared.add_tokens(p, "--context", "KV length S")
    p.add_argument("--batch", type=int, help="batch size (concurrent requests); default: sweep 1..--max-batch")
    p.add_argument("--max-batch", type=int, default=4096)
    shared.add_dtype(p, DTYPES, default="bfloat16", help_text="weights, KV, math and collective payloads")
    shared.add_kv_dtype(p)
    p.add_argument("--hw", default="h200", help=f"hardware preset ({', '.join(HARDWARE_NAMES)}) or a calibrated JSON")
    lay = p.add_argument_group("layout (evaluate only this Helix layout on all N GPUs; tpf and ep left out: every "
                               "valid split)")
    shared.add_layout(lay, fields=("kvp", "tpa", "tpf", "ep", "kv_block", "hopb_chunks"))
    p.add_argument("--ttl-ms", type=float, help="keep layouts with time per output token <= X ms; best = most "
                                                "tokens/s/GPU among them")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma list of " + ", ".join(STRATEGIES))
    p.add_argument("--no-replicas", action="store_true", help="use all N GPUs for one model instance")
    p.add_argument("--no-hopb", action="store_true", help="Helix without HOP-B overlap")
    p.add_argument("--costing", choices=("backend", "paper"), default="backend",
                   help="backend: the program helix_compile runs today (replicated LM head, absorbed MLA, "
                        "exposed collectives; default); paper: the paper's target (absorbed MLA, vocab-parallel "
                        "head, Helix and TP hiding their all-reduces' bandwidth under the GEMMs)")
    p.add_argument("--json", action="store_true", help="print every evaluated layout as JSON on stdout")
    p.add_argument("--png", help="write the Pareto plot here")
    p.add_argument("--top", type=int, default=25, help="rows of the frontier table (default 25)")
    p.add_argument("--paper", metavar="DIR", help="reproduce Figure 1, the paper's comparisons and Figure 7 into DIR")
    p.add_argument("--fit", action="store_true", help="with --paper: also fit (alpha, per-layer fixed cost) to the "
                                                       "paper's four headline ratios into DIR/fit.md (minutes)")
    p.add_argument("--calibrate", metavar="RESULTS", help="fit the hardware model to a helix-bench/1 results file")
    p.add_argument("--save-hw", metavar="FILE", help="with --calibrate: write the calibrated hardware JSON")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    if args.paper:
        from ..planner.paper import run as run_paper

        run_paper(args.paper, fit_grid=args.fit)
        return 0
    if args.calibrate:
        return _calibrate(args)
    missing = [flag for flag, k in (("--model", "model"), ("--nproc-per-node", "nproc"), ("--context", "context"))
               if getattr(args, k) is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} required (or use --paper DIR / --calibrate FILE)")
    from ..planner.search import planner_dtype, plan

    strategies = tuple(s.strip() for s in args.strategies.split(",") if s.strip())
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise ValueError(f"unknown strategy {', '.join(bad)}: use a comma list of {', '.join(STRATEGIES)}")
    p = plan(args.model, args.nproc, args.context, batch=args.batch, dtype=planner_dtype(args.dtype), hw=args.hw,
             layout=shared.layout_fields(args) or None, ttl_ms=args.ttl_ms, strategies=strategies, replicas=not args.no_replicas,
             max_batch=args.max_batch, hopb=not args.no_hopb, costing=BACKEND if args.costing == "backend" else PAPER,
             kv_dtype=None if args.kv_dtype == "auto" else args.kv_dtype)
    if args.png:
        from ..planner.report import plot_pareto

        plot_pareto(p, args.png)
    if args.json:
        json.dump(p.to_dict(), sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0 if p.best else 1
    from ..planner.report import print_table

    feasible = sum(e.feasible for e in p.evaluations)
    print(f"{p.model.name}: {p.model.params / 1e9:.1f}B params, S={p.context:,}, {p.dtype}"
          + (f" (KV cache {p.kv_dtype})" if p.kv_dtype else "") + f", {p.hw.name} "
          f"({p.hw.description}); {len(p.evaluations)} layouts evaluated, {feasible} fit in "
          f"{p.hw.memory_gb:.0f} GB/GPU" + (f", TTL <= {p.ttl_ms} ms" if p.ttl_ms else ""))
    print(payload_precision(p.dtype))
    if not p.best:
        print("no layout is feasible" + (" within the TTL limit" if p.ttl_ms else " (memory)") +
              "; try more GPUs, a smaller batch/context, a narrower --dtype or a larger --ttl-ms")
        return 1
    print_table(p.frontier, "Pareto frontier (most interactive first)", args.top)
    b = p.best.candidate
    why = f"most tokens/s/GPU within {p.ttl_ms} ms" if p.ttl_ms else "lowest TTL"
    print(f"best ({why}): {b.strategy} on {b.gpus} GPUs x{p.best.replicas}: kvp={b.kvp} tpa={b.tpa} tpf={b.tpf} "
          f"ep={b.ep} batch={b.batch} hopb_chunks={p.best.hopb_chunks}; TTL {p.best.ttl_s * 1e3:.3f} ms, "
          f"{p.best.tokens_per_s_per_user:.1f} tok/s/user, {p.best.tokens_per_s_per_gpu:.2f} tok/s/GPU, "
          f"{p.best.memory_gb:.1f} GB/GPU" + ("" if p.best.backend_runs else
                                              "; a paper baseline (MLA latent on every GPU), not run by the backend"))
    if args.png:
        print(f"wrote {args.png}")
    return 0


def _calibrate(args) -> int:
    from ..planner.calibrate import calibrate, load_results, table_markdown

    data = load_results(args.calibrate)
    hw, rows = calibrate(data, hw=args.hw if args.hw != "h200" else None)
    if args.save_hw:
        with open(args.save_hw, "w") as f:
            json.dump(hw.to_dict(), f, indent=1)
    if args.json:
        json.dump({"hardware": hw.to_dict(), "decode": rows}, sys.stdout, indent=1, default=str)
        sys.stdout.write("\n")
    else:
        print(table_markdown(hw, rows))
        if args.save_hw:
            print(f"wrote {args.save_hw} (use it with --hw {args.save_hw})")
    return 0 if all(r["within_20pct"] for r in rows if r["fitted"]) else 1
