"""Pareto frontier of (tokens/s/user, tokens/s/GPU), the paper's headline ratios and its HOP-B ablation."""
from __future__ import annotations

import math


def frontier(evals: list) -> list:
    """The points no other point beats on both axes, ordered by falling interactivity.

    Greedy rule: walk the points from the most interactive down; keep a point iff its tokens/s/GPU beats every
    point kept so far (ties on interactivity resolve to the higher throughput).
    """
    pts = sorted(evals, key=lambda e: (-e.tokens_per_s_per_user, -e.tokens_per_s_per_gpu))
    out, best = [], float("-inf")
    for e in pts:
        if e.tokens_per_s_per_gpu > best:
            out.append(e)
            best = e.tokens_per_s_per_gpu
    return out


def best_within(evals: list, ttl_s: float):
    """The configuration with the most tokens/s/GPU among those with TTL <= ttl_s (None if none)."""
    ok = [e for e in evals if e.ttl_s <= ttl_s * (1 + 1e-12)]
    return max(ok, key=lambda e: (e.tokens_per_s_per_gpu, -e.ttl_s)) if ok else None


def batch_per_gpu(e) -> float:
    """Concurrent requests per GPU of one instance (the paper's "users")."""
    return e.candidate.batch / e.candidate.gpus


def headline(helix: list, baseline: list) -> dict:
    """The paper's ratios from the feasible configurations of each side (lists of Evaluation).

    interactivity: the lowest TTL of Helix over the lowest of the baselines (the paper's "up to 1.5x").
    throughput:    for every TTL budget T, each side's best configuration within T (most tokens/s/GPU); the ratio
                   of their tokens/s/GPU, maximised over T (the paper's "up to 32x higher tokens/s/GPU"). The
                   budgets are the TTLs the baseline reaches ("at the baseline's latency"): a budget between two
                   baseline configurations would credit Helix with slack the baseline cannot use because batches
                   are whole requests. No interpolation: both sides are real configurations.
    batch:         at the same budgets, the ratio of those configurations' batch per GPU ("32x more users").
    Each "up to" figure comes with the budget where it is taken and both configurations; ``*_any_budget`` is
    the same maximum over every budget either side reaches (an upper bound, for reference).
    """
    if not helix or not baseline:
        return {}
    u_h = max(e.tokens_per_s_per_user for e in helix)
    u_b = max(e.tokens_per_s_per_user for e in baseline)
    out = {"interactivity_ratio": u_h / u_b, "helix_max_tokens_per_s_per_user": u_h,
           "baseline_max_tokens_per_s_per_user": u_b}
    thr, bat = _best_ratios(helix, baseline, sorted({e.ttl_s for e in baseline}))
    any_thr, any_bat = _best_ratios(helix, baseline, sorted({e.ttl_s for e in helix} | {e.ttl_s for e in baseline}))
    if any_thr:
        out.update(throughput_ratio_any_budget=any_thr[0], batch_ratio_any_budget=any_bat[0])
    if thr:
        r, t, h, b = thr
        out.update(throughput_ratio=r, throughput_budget_ms=t * 1e3, throughput_helix=h, throughput_baseline=b,
                   throughput_ratio_at_user=1.0 / t)
    if bat:
        r, t, h, b = bat
        out.update(batch_ratio=r, batch_budget_ms=t * 1e3, batch_helix=h, batch_baseline=b,
                   batch_ratio_at_user=1.0 / t)
    return out


def _user_at(front: list, g: float):
    """tokens/s/user of a frontier at tokens/s/GPU = g, log-log between its two neighbouring points; None outside."""
    pts = sorted((e.tokens_per_s_per_gpu, e.tokens_per_s_per_user) for e in front)
    if not pts or g < pts[0][0] or g > pts[-1][0]:
        return None
    for (g0, u0), (g1, u1) in zip(pts, pts[1:]):
        if g0 <= g <= g1:
            t = 0.0 if g1 == g0 else (math.log(g) - math.log(g0)) / (math.log(g1) - math.log(g0))
            return math.exp(math.log(u0) + t * (math.log(u1) - math.log(u0)))
    return pts[-1][1] if g == pts[-1][0] else None


def _best_ratios(helix: list, baseline: list, budgets: list):
    """(throughput ratio, budget, helix config, baseline config) and the same for batch per GPU, maximised."""
    thr, bat = None, None
    for t in budgets:
        h, b = best_within(helix, t), best_within(baseline, t)
        if h is None or b is None:
            continue
        r = h.tokens_per_s_per_gpu / b.tokens_per_s_per_gpu
        if thr is None or r > thr[0]:
            thr = (r, t, h, b)
        rb = batch_per_gpu(h) / batch_per_gpu(b)
        if bat is None or rb > bat[0]:
            bat = (rb, t, h, b)
    return thr, bat


def hopb_ablation(on: list, off: list) -> dict:
    """The paper's Figure 7: tokens/s/user lost without HOP-B at fixed tokens/s/GPU.

    The two curves are compared as the figure plots them: at each point g of the HOP-B frontier, the frontier
    without HOP-B is read at the same tokens/s/GPU (log-log between its neighbouring configurations, within its
    range only, so that a jump of the batch grid is not counted as a loss); loss = 1 - user_off / user_on,
    maximised over g (the paper: "up to 12%" for Llama-405B, "about 1%" for DeepSeek-R1).
    """
    best = None
    for e in on:
        g, u_on = e.tokens_per_s_per_gpu, e.tokens_per_s_per_user
        u_off = _user_at(off, g)
        if u_off is None:
            continue
        loss = 1.0 - u_off / u_on
        if best is None or loss > best[0]:
            best = (loss, g, u_on, u_off)
    if best is None:
        return {}
    loss, g, u_on, u_off = best
    return {"loss": loss, "at_tokens_per_s_per_gpu": g, "user_on": u_on, "user_off": u_off}


def fixed_batch(helix: list, baseline: list) -> dict:
    """The abstract's reading, "TTL up to 1.5x lower at fixed batch sizes": for every batch both sides run, the
    lowest baseline TTL over the lowest Helix TTL at that batch (any layout, any GPU count); the maximum over the
    batches, with the batch and both configurations, and the ratio at batch 1."""
    best_h, best_b = {}, {}
    for side, pts in ((best_h, helix), (best_b, baseline)):
        for e in pts:
            b = e.candidate.batch
            if b not in side or e.ttl_s < side[b].ttl_s:
                side[b] = e
    common = sorted(set(best_h) & set(best_b))
    if not common:
        return {}
    ratio = {b: best_b[b].ttl_s / best_h[b].ttl_s for b in common}
    b = max(common, key=lambda x: (ratio[x], -x))
    return {"ratio": ratio[b], "batch": b, "helix": best_h[b], "baseline": best_b[b], "at_batch_1": ratio.get(1)}
