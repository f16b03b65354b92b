"""Rendering: a rich table of layouts, the Pareto PNG, and short layout labels."""
from __future__ import annotations

COLORS = {"helix": "tab:red", "tp": "tab:blue", "tp_ep": "tab:cyan", "dp_ep": "tab:green", "medha": "tab:purple"}


def label(e) -> str:
    c = e.candidate
    if c.strategy == "helix":
        s = f"helix kvp={c.kvp} tpa={c.tpa} tpf={c.tpf} ep={c.ep}"
    elif c.strategy == "dp_ep":
        s = f"dp_ep dp={c.dp} tpa={c.tpa} ep={c.ep}"
    elif c.strategy == "medha":
        s = f"medha kvp={c.kvp} tpa={c.tpa} ffn tpf={c.tpf} ep={c.ep}"
    else:
        s = f"{c.strategy} tp={c.tpa} tpf={c.tpf} ep={c.ep}"
    if c.strategy == "tp" and not getattr(e, "backend_runs", True):
        s += " [latent duplicated: paper baseline, not run]"
    return s


def table(evals, title: str, limit: int | None = None):
    """A rich Table of evaluations (one row each)."""
    from rich.table import Table

    t = Table(title=title, show_lines=False)
    for col in ("layout", "GPUs", "batch", "hopb", "TTL ms", "tok/s/user", "tok/s/GPU", "GB/GPU",
                "kv", "weights", "compute", "comm", "layer ms"):
        t.add_column(col, justify="left" if col == "layout" else "right")
    for e in evals[:limit]:
        p = {k: v * 1e3 for k, v in e.per_layer.items()}
        t.add_row(label(e), f"{e.candidate.gpus}" + (f"x{e.replicas}" if e.replicas > 1 else ""),
                  str(e.candidate.batch), str(e.hopb_chunks), f"{e.ttl_s * 1e3:.3f}", f"{e.tokens_per_s_per_user:.1f}",
                  f"{e.tokens_per_s_per_gpu:.2f}", f"{e.memory_gb:.1f}", f"{p['kv_read']:.4f}",
                  f"{p['weight_read']:.4f}", f"{p['compute']:.4f}", f"{p['comm']:.4f}", f"{p['total']:.4f}")
    return t


def print_table(evals, title: str, limit: int | None = None, file=None):
    from rich.console import Console

    Console(file=file, width=200).print(table(evals, title, limit))


def plot_pareto(plan, path: str, title: str | None = None, frontiers: dict | None = None):
    """Scatter every feasible layout by strategy and draw the frontiers; write a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .pareto import frontier

    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    feas = [e for e in plan.evaluations if e.feasible]
    for s, color in COLORS.items():
        pts = [e for e in feas if e.candidate.strategy == s]
        if pts:
            ax.scatter([e.tokens_per_s_per_user for e in pts], [e.tokens_per_s_per_gpu for e in pts], s=6,
                       alpha=0.25, color=color)
            f = frontier(pts)
            ax.plot([e.tokens_per_s_per_user for e in f], [e.tokens_per_s_per_gpu for e in f], "-o", ms=3,
                    color=color, label=s)
    for name, (f, style) in (frontiers or {}).items():
        ax.plot([e.tokens_per_s_per_user for e in f], [e.tokens_per_s_per_gpu for e in f], style, lw=2.2,
                label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens/s/user (interactivity)")
    ax.set_ylabel("tokens/s/GPU (throughput)")
    ax.set_title(title or f"{plan.model.name}, S={plan.context:,}, {plan.dtype}, {plan.hw.name}, <= {plan.gpus} GPUs")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
