"""Reproduce the Helix paper: Figure 1 (Appendix A roofline) and the 1M-context headline comparisons.

`helix plan --paper DIR` runs everything here and writes the PNGs and a markdown summary into DIR.
"""
from __future__ import annotations

import os

from .collectives import collective_us
from .cost import BASELINES, appendix_a
from .hardware import MEASURED_H200, get_hardware
from .model import FIGURE1_MODEL
from .pareto import frontier, headline
from .search import plan

# Figure 1 / Appendix A constants: Llama-405B-like, B = 8, S = 10^6, FP4, 8000 GB/s.
FIG1 = dict(B=8, Q=128, K=8, Hsz=128, S=1_000_000, F=FIGURE1_MODEL.ffn, bytes_per_elem=0.5, mem_bw_gbs=8000)
WIDTHS = (1, 2, 4, 8, 16, 32, 64)


def figure1() -> list:
    """Rows of Figure 1: per-layer DRAM read time (ms) vs TP width (TPA = TPF = w), and KVP on top of TPA = 8."""
    rows = []
    for w in WIDTHS:
        r = appendix_a(**FIG1, tpa=w, tpf=w)
        rows.append({"series": "TP", "tpa": w, "tpf": w, "kvp": 1, "t_kv_ms": r["t_kv"] * 1e3, "t_w_ms": r["t_w"] * 1e3})
    for kvp in (1, 2, 4, 8):
        r = appendix_a(**FIG1, tpa=8, tpf=8 * kvp, kvp=kvp)
        rows.append({"series": "KVP x TPA=8", "tpa": 8, "tpf": 8 * kvp, "kvp": kvp, "t_kv_ms": r["t_kv"] * 1e3,
                     "t_w_ms": r["t_w"] * 1e3})
    return rows


def plot_figure1(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    tp = [r for r in rows if r["series"] == "TP"]
    ax = axes[0]
    ax.plot([r["tpa"] for r in tp], [r["t_kv_ms"] for r in tp], "-o", label="KV read (t_KV)")
    ax.plot([r["tpa"] for r in tp], [r["t_w_ms"] for r in tp], "-s", label="weight read (t_W)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("TP width (TPA = TPF)")
    ax.set_ylabel("ms per layer")
    ax.set_title("TP: KV read stops falling at TPA = K = 8")
    ax.legend()
    ax.grid(alpha=0.3)
    kv = [r for r in rows if r["series"] != "TP"]
    ax = axes[1]
    ax.plot([8 * r["kvp"] for r in kv], [r["t_kv_ms"] for r in kv], "-o", label="KV read (t_KV)")
    ax.plot([8 * r["kvp"] for r in kv], [r["t_w_ms"] for r in kv], "-s", label="weight read (t_W, TPF = N)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("GPUs N = KVP x 8")
    ax.set_title("Helix: KVP keeps cutting the KV read")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.suptitle("Figure 1 (Appendix A): Llama-405B-like, B=8, S=1M, FP4, 8000 GB/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def comparison(model: str, gpus: int = 64, context=1_000_000, dtype: str = "fp4", hw="gb200") -> dict:
    """Helix vs the best baseline (TP, TP x EP, DP-attention + EP, Medha) on 1..gpus GPUs; and Helix w/o HOP-B."""
    p = plan(model, gpus, context, dtype=dtype, hw=hw)
    ok = [e for e in p.evaluations if e.feasible]
    hel = frontier([e for e in ok if e.candidate.strategy == "helix"])
    base = frontier([e for e in ok if e.candidate.strategy in BASELINES])
    no_hopb = plan(model, gpus, context, dtype=dtype, hw=hw, strategies=("helix",), hopb=False)
    nh = frontier([e for e in no_hopb.evaluations if e.feasible])
    # HOP-B gain: TTL without HOP-B over TTL with it, same layout and batch, over the Helix frontier.
    key = lambda e: (e.candidate.gpus, e.candidate.kvp, e.candidate.tpa, e.candidate.tpf, e.candidate.ep,  # noqa: E731
                     e.candidate.batch)
    ttl_off = {key(e): e.ttl_s for e in no_hopb.evaluations}
    gains = [ttl_off[key(e)] / e.ttl_s for e in hel if key(e) in ttl_off]
    best_per = {}
    for s in ("helix",) + BASELINES:
        pts = [e for e in ok if e.candidate.strategy == s]
        if pts:
            best_per[s] = max(pts, key=lambda e: e.tokens_per_s_per_user)
    return {"plan": p, "helix": hel, "baseline": base, "no_hopb": nh, "ratios": headline(hel, base),
            "hopb_gain": max(gains) if gains else None, "most_interactive": best_per}


def run(out_dir: str, echo=print) -> dict:
    """Figure 1 and both comparisons; PNGs and summary.md into out_dir; returns the numbers."""
    from .report import label, plot_pareto

    os.makedirs(out_dir, exist_ok=True)
    rows = figure1()
    plot_figure1(rows, os.path.join(out_dir, "figure1.png"))
    lines = ["## Figure 1 (Appendix A roofline, per layer)", "", "| series | TPA | TPF | KVP | t_KV ms | t_W ms |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['series']} | {r['tpa']} | {r['tpf']} | {r['kvp']} | {r['t_kv_ms']:.4f} | {r['t_w_ms']:.4f} |"
              for r in rows]
    results = {"figure1": rows}
    for model, short in (("deepseek-r1", "deepseek-r1-1m"), ("llama-3.1-405b", "llama-405b-1m")):
        r = comparison(model)
        plot_pareto(r["plan"], os.path.join(out_dir, f"{short}.png"),
                    title=f"{model}, S=1M, FP4, GB200 NVL72, 1..64 GPUs",
                    frontiers={"Helix frontier": (r["helix"], "k--"), "best baseline": (r["baseline"], "k:")})
        q = r["ratios"]
        lines += ["", f"## {model}, S = 1M, FP4, GB200 NVL72, 1..64 GPUs", "",
                  f"- layouts evaluated: {len(r['plan'].evaluations)} "
                  f"(feasible: {sum(e.feasible for e in r['plan'].evaluations)})",
                  f"- interactivity: Helix {q['helix_max_tokens_per_s_per_user']:.1f} vs best baseline "
                  f"{q['baseline_max_tokens_per_s_per_user']:.1f} tokens/s/user = **{q['interactivity_ratio']:.2f}x**",
                  f"- throughput at equal interactivity (baseline frontier interpolated): up to **{q.get('throughput_ratio', float('nan')):.1f}x** "
                  f"tokens/s/GPU (at {q.get('throughput_ratio_at_user', float('nan')):.0f} tokens/s/user); "
                  f"batch up to **{q.get('batch_ratio', float('nan')):.1f}x**",
                  f"- HOP-B: TTL without it / TTL with it, same layout and batch, over the Helix frontier: up to "
                  f"**{(r['hopb_gain'] or 1) * 100 - 100:.1f}%**", "",
                  "| strategy | most interactive layout | GPUs | batch | TTL ms | tok/s/user | tok/s/GPU |",
                  "|---|---|---|---|---|---|---|"]
        for s, e in r["most_interactive"].items():
            lines.append(f"| {s} | {label(e)} | {e.candidate.gpus} | {e.candidate.batch} | {e.ttl_s * 1e3:.3f} | "
                         f"{e.tokens_per_s_per_user:.1f} | {e.tokens_per_s_per_gpu:.2f} |")
        results[model] = {k: v for k, v in q.items()} | {"hopb_gain": r["hopb_gain"]}
    lines += ["", "## Sensitivity to the assumed GB200 collective latency (alpha, every op)", "",
              "| alpha us | R1 interactivity | R1 throughput | Llama interactivity | Llama throughput |",
              "|---|---|---|---|---|"]
    for alpha in (1.0, 5.0, 10.0, 20.0):
        hw = get_hardware("gb200")
        for c in hw.collectives.values():
            c.alpha_us = alpha
        qs = [comparison(m, hw=hw)["ratios"] for m in ("deepseek-r1", "llama-3.1-405b")]
        lines.append(f"| {alpha:g} | " + " | ".join(f"{q['interactivity_ratio']:.2f}x | {q.get('throughput_ratio', 0):.1f}x"
                                                      for q in qs) + " |")
    lines += ["", "## H200 collective model seeded from DESIGN.md measurements (4 x H200)", "",
              "| op | bytes/rank | measured us | model us |", "|---|---|---|---|"]
    h200 = get_hardware("h200")
    for r in MEASURED_H200["collectives"]:
        pred = collective_us(h200.collectives[r["op"]], r["op"], r["group_size"], r["bytes_per_rank"])
        lines.append(f"| {r['op']} | {r['bytes_per_rank']} | {r['us']:.0f} | {pred:.1f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(text)
    echo(text)
    return results
