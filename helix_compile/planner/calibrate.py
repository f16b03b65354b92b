"""Calibrate a hardware preset from `helix bench` results and compare predicted with measured TTL.

Results file (JSON, schema "helix-bench/1"; every section optional except "hardware"):

    {"schema": "helix-bench/1",
     "hardware": {"preset": "h200", "card": "NVIDIA H200", "gpus": 4, "torch": "2.11.0+cu130",
                  "nccl": "2.28.9", "date": "2026-11-27", "command": "helix bench ..."},
     "memory": {"hbm_read_gbs": 4190},                       # achieved HBM bandwidth (GB/s)
     "matmul": {"bf16": 782},                                # achieved dense TFLOP/s per dtype
     "collectives": [{"op": "all_to_all", "group_size": 4, "bytes_per_rank": 4096, "us": 41.0}, ...],
     "decode": [{"model": "llama-3.1-8b" | {HF config dict}, "context": 131072, "batch": 8, "dtype": "bf16",
                 "layout": {"strategy": "helix", "kvp": 2, "tpa": 2, "tpf": 4, "ep": 1, "hopb_chunks": 1},
                 "ttl_ms": 9.8}, ...]}

Fit: memory and matmul numbers replace the preset's; each collective op gets (alpha, bw) by least squares
(collectives.fit_op); then one per-layer fixed overhead (kernel launches, synchronisation) is fitted to the
decode rows by least squares on relative error. The table lists every decode row: measured, predicted, error.
"""
from __future__ import annotations

import json

from .collectives import fit_collectives
from .cost import STRATEGIES, Candidate, evaluate
from .hardware import Hardware, get_hardware
from .model import get_model
from ..parse import parse_tokens

SCHEMA = "helix-bench/1"
TOLERANCE = 0.20


def load_results(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"bench results file {path!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"bench results file {path!r} is not valid JSON: {e}") from None
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema is {data.get('schema')!r}, expected {SCHEMA!r} (see docs/planner.md)")
    if "hardware" not in data or "preset" not in data["hardware"]:
        raise ValueError(f"{path}: missing hardware.preset (one of h100, h200, b200, gb200)")
    for i, r in enumerate(data.get("collectives", [])):
        missing = {"op", "group_size", "bytes_per_rank", "us"} - set(r)
        if missing:
            raise ValueError(f"{path}: collectives[{i}] lacks {', '.join(sorted(missing))}")
    for i, r in enumerate(data.get("decode", [])):
        missing = {"model", "context", "batch", "dtype", "layout", "ttl_ms"} - set(r)
        if missing and not r.get("error"):
            raise ValueError(f"{path}: decode[{i}] lacks {', '.join(sorted(missing))}")
    # rows that failed (out of memory, ...) carry an error and no time: nothing to fit
    data["decode"] = [r for r in data.get("decode", []) if not r.get("error") and r.get("ttl_ms") is not None]
    return data


def _candidate(row: dict) -> Candidate:
    """The cost model's Candidate for a decode row. A one-GPU row of another program (``single-transformers``:
    transformers + torch.compile) is costed as helix on one GPU: the same reads, no collectives."""
    lay = dict(row["layout"])
    strategy = lay.pop("strategy", "helix")
    kvp, tpa, dp = lay.get("kvp", 1), lay.get("tpa", 1), lay.get("dp", 1)
    gpus = kvp * tpa * dp
    if strategy not in STRATEGIES:
        if gpus != 1:
            raise ValueError(f"decode row with strategy {strategy!r} on {gpus} GPUs: the cost model knows "
                             f"{', '.join(STRATEGIES)} (and any one-GPU program)")
        strategy = "helix"
    return Candidate(strategy, gpus, kvp, tpa, lay.get("tpf", gpus), lay.get("ep", 1), int(row["batch"]), dp=dp,
                     hopb_chunks=lay.get("hopb_chunks", 0), kv_block=lay.get("kv_block", 16))


def predict(rows: list, hw: Hardware) -> list:
    """[(row, Evaluation)] for the decode rows under hw."""
    out = []
    for r in rows:
        e = evaluate(get_model(r["model"]), hw, _candidate(r), parse_tokens(r["context"], "context"), r["dtype"],
                     kv_dtype=r.get("kv_dtype"))
        out.append((r, e))
    return out


def _modelled(row: dict) -> bool:
    return row["layout"].get("strategy", "helix") in STRATEGIES


def calibrate(data: dict, hw=None, fit_overhead: bool = True) -> tuple:
    """(calibrated Hardware, table rows) from a loaded results dict. Each row has the prediction of the preset
    before calibration (``preset_ms``) and after (``predicted_ms``); ``fitted`` says whether it took part in the
    fit (rows of programs the cost model does not describe are only tabulated)."""
    hw_in = hw or data["hardware"]["preset"]
    hw = get_hardware(hw_in)
    tag = f"measured ({data['hardware'].get('card', hw.name)}, {data['hardware'].get('date', 'undated')})"
    if "hbm_read_gbs" in data.get("memory", {}):
        hw.mem_bw_gbs = float(data["memory"]["hbm_read_gbs"])
        hw.sources["mem_bw_gbs"] = tag
    for dtype, tflops in data.get("matmul", {}).items():
        hw.flops_tflops[dtype] = float(tflops)
        hw.sources[f"flops_tflops.{dtype}"] = tag
    if data.get("collectives"):
        hw.collectives = fit_collectives(data["collectives"], hw.link_bw_gbs, base=hw.collectives)
        hw.sources["collectives"] = "fit of " + tag
    decode = data.get("decode", [])
    before = {id(r): e.ttl_s * 1e3 for r, e in predict(decode, get_hardware(hw_in))}
    # Only rows of programs the cost model describes are fitted: a one-GPU transformers run (HF attention over the
    # whole static cache, GQA heads repeated in memory) is tabulated for comparison but would bias the fit.
    fitted = [r for r in decode if _modelled(r)]
    if fitted and fit_overhead:
        hw.per_layer_overhead_us = 0.0
        preds = predict(fitted, hw)
        # minimise sum(((pred + L*o) - meas) / meas)^2 over o >= 0
        num = sum(get_model(r["model"]).layers / r["ttl_ms"] * (r["ttl_ms"] - e.ttl_s * 1e3) / r["ttl_ms"]
                  for r, e in preds)
        den = sum((get_model(r["model"]).layers / r["ttl_ms"]) ** 2 for r, _ in preds)
        hw.per_layer_overhead_us = max(0.0, num / den * 1e3) if den else 0.0
        hw.sources["per_layer_overhead_us"] = "fit of " + tag
    table = []
    for r, e in predict(decode, hw):
        pred = e.ttl_s * 1e3
        err = (pred - r["ttl_ms"]) / r["ttl_ms"]
        table.append({"model": get_model(r["model"]).name, "context": parse_tokens(r["context"], "context"), "batch": r["batch"],
                      "dtype": r["dtype"], "layout": r["layout"], "measured_ms": r["ttl_ms"], "predicted_ms": pred,
                      "error": err, "within_20pct": abs(err) <= TOLERANCE, "fitted": _modelled(r),
                      "preset_ms": before[id(r)], "preset_error": (before[id(r)] - r["ttl_ms"]) / r["ttl_ms"]})
    return hw, table


def table_markdown(hw: Hardware, rows: list) -> str:
    lines = ["| op | alpha us | alpha/peer us | bw GB/s | source |", "|---|---|---|---|---|"]
    for op, c in hw.collectives.items():
        lines.append(f"| {op} | {c.alpha_us:.1f} | {c.alpha_peer_us:.2f} | {c.bw_gbs:.0f} | {c.source} |")
    lines += ["", f"HBM {hw.mem_bw_gbs:.0f} GB/s, matmul {hw.flops_tflops} TFLOP/s, "
                  f"per-layer overhead {hw.per_layer_overhead_us:.1f} us", ""]
    lines += ["| model | context | batch | dtype | layout | measured ms | preset ms (error) | calibrated ms | error | "
              "within 20% |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lay = ",".join(f"{k}={v}" for k, v in r["layout"].items())
        ok = ("yes" if r["within_20pct"] else "NO") if r["fitted"] else "not fitted"
        lines.append(f"| {r['model']} | {r['context']} | {r['batch']} | {r['dtype']} | {lay} | {r['measured_ms']:.3f} | "
                     f"{r['preset_ms']:.3f} ({r['preset_error'] * 100:+.1f}%) | {r['predicted_ms']:.3f} | "
                     f"{r['error'] * 100:+.1f}% | {ok} |")
    return "\n".join(lines) + "\n"
