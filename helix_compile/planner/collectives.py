"""Collective cost: `t(op, n, bytes) = alpha + alpha_peer*(n-1) + coef(op, n) * bytes / bw`, and its fit.

`bytes` is the payload per rank: the buffer each rank passes to all_reduce / all_to_all, or the chunk each rank
contributes to all_gather. coef is the data each rank must move per byte of payload (NCCL "bus bandwidth"
convention): all_reduce 2(n-1)/n, all_to_all (n-1)/n, all_gather (n-1). A group of one GPU costs nothing.

The fit is a weighted linear least squares on relative error (a 20%-accurate model is the goal, so a 50 us
call and a 500 us call count the same), with bandwidth capped at the NVLink spec and alphas kept >= 0.
"""
from __future__ import annotations

import numpy as np

from .hardware import Collective

OPS = ("all_to_all", "all_reduce", "all_gather")


def volume_coef(op: str, n: int) -> float:
    if op == "all_reduce":
        return 2.0 * (n - 1) / n
    if op == "all_to_all":
        return (n - 1) / n
    if op == "all_gather":
        return float(n - 1)
    raise ValueError(f"unknown collective {op!r}; known: {', '.join(OPS)}")


def collective_us(c: Collective, op: str, n: int, nbytes: float) -> float:
    """Time of one collective in microseconds (0 for a group of one)."""
    if n <= 1:
        return 0.0
    return c.alpha_us + c.alpha_peer_us * (n - 1) + volume_coef(op, n) * nbytes / (c.bw_gbs * 1e3)


def _solve(A, y, fixed):
    """Least squares with some unknowns fixed: fixed maps column -> value."""
    free = [j for j in range(A.shape[1]) if j not in fixed]
    rhs = y - sum(A[:, j] * v for j, v in fixed.items()) if fixed else y.copy()
    x = np.zeros(A.shape[1])
    for j, v in fixed.items():
        x[j] = v
    if free:
        sol, *_ = np.linalg.lstsq(A[:, free], rhs, rcond=None)
        x[free] = sol
    return x


def fit_op(rows: list, op: str, link_bw_gbs: float) -> Collective:
    """Fit (alpha, alpha_peer, bw) for one op from rows {group_size, bytes_per_rank, us}."""
    rows = [r for r in rows if r["op"] == op and r["group_size"] > 1]
    if not rows:
        raise ValueError(f"no {op} rows with group_size > 1 to fit")
    sizes = {r["group_size"] for r in rows}
    y = np.array([r["us"] for r in rows], dtype=float)
    cols = [np.ones(len(rows))]
    if len(sizes) > 1:
        cols.append(np.array([r["group_size"] - 1 for r in rows], dtype=float))
    cols.append(np.array([volume_coef(op, r["group_size"]) * r["bytes_per_rank"] for r in rows], dtype=float))
    A = np.stack(cols, axis=1)
    w = 1.0 / y  # relative error
    Aw, yw = A * w[:, None], y * w
    slope = A.shape[1] - 1
    min_slope = 1.0 / (link_bw_gbs * 1e3)  # us per byte at the spec bandwidth
    fixed: dict = {}
    x = _solve(Aw, yw, fixed)
    if x[slope] < min_slope:  # faster than the wire (or negative): the data are latency-bound; cap at spec
        fixed[slope] = min_slope
        x = _solve(Aw, yw, fixed)
    for j in range(slope):
        if x[j] < 0:
            fixed[j] = 0.0
            x = _solve(Aw, yw, fixed)
    alpha_peer = x[1] if len(sizes) > 1 else 0.0
    note = " (bandwidth capped at NVLink spec)" if slope in fixed and fixed[slope] == min_slope else ""
    return Collective(alpha_us=float(x[0]), bw_gbs=float(1.0 / (x[slope] * 1e3)), alpha_peer_us=float(alpha_peer),
                      source=f"fit of {len(rows)} measurements{note}")


def fit_collectives(rows: list, link_bw_gbs: float, base: dict | None = None) -> dict:
    """Fit every op present in `rows`; ops without rows come from `base`, or from the all_reduce fit."""
    out = dict(base or {})
    for op in OPS:
        if any(r["op"] == op for r in rows):
            out[op] = fit_op(rows, op, link_bw_gbs)
    for op in OPS:
        if op not in out:
            ref = out.get("all_reduce") or next(iter(out.values()))
            out[op] = Collective(ref.alpha_us, ref.bw_gbs, ref.alpha_peer_us, "assumed (= all_reduce fit)")
    return out
