"""Pareto frontier of (tokens/s/user, tokens/s/GPU) and the paper's two headline ratios."""
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


def _interp_gpu(front: list, user: float):
    """Baseline tokens/s/GPU at interactivity `user`, log-log interpolated along its frontier; None beyond it."""
    pts = sorted((e.tokens_per_s_per_user, e.tokens_per_s_per_gpu) for e in front)
    if user > pts[-1][0]:
        return None
    if user <= pts[0][0]:
        return max(g for _, g in pts)
    for (u0, g0), (u1, g1) in zip(pts, pts[1:]):
        if u0 <= user <= u1:
            t = 0.0 if u1 == u0 else (math.log(user) - math.log(u0)) / (math.log(u1) - math.log(u0))
            return math.exp(math.log(g0) + t * (math.log(g1) - math.log(g0)))
    return None


def headline(helix: list, baseline: list) -> dict:
    """Ratios the paper reports, from two frontiers (lists of Evaluation).

    interactivity: best tokens/s/user of Helix over the best of the baselines (the paper's "up to 1.5x").
    throughput:    max over Helix frontier points of its tokens/s/GPU over the baseline frontier's tokens/s/GPU
                   at the same tokens/s/user (log-log interpolated; the paper's "up to 32x at the same latency").
    batch:         max over Helix frontier points of its batch over the largest batch of any baseline frontier
                   point at least as interactive.
    """
    if not helix or not baseline:
        return {}
    u_h = max(e.tokens_per_s_per_user for e in helix)
    u_b = max(e.tokens_per_s_per_user for e in baseline)
    out = {"interactivity_ratio": u_h / u_b, "helix_max_tokens_per_s_per_user": u_h,
           "baseline_max_tokens_per_s_per_user": u_b}
    thr, bat = [], []
    for e in helix:
        g = _interp_gpu(baseline, e.tokens_per_s_per_user)
        if g:
            thr.append((e.tokens_per_s_per_gpu / g, e))
        rivals = [b for b in baseline if b.tokens_per_s_per_user >= e.tokens_per_s_per_user]
        if rivals:
            bat.append((e.candidate.batch / max(b.candidate.batch for b in rivals), e))
    if thr:
        r, e = max(thr, key=lambda t: t[0])
        out.update(throughput_ratio=r, throughput_ratio_at_user=e.tokens_per_s_per_user)
    if bat:
        r, e = max(bat, key=lambda t: t[0])
        out.update(batch_ratio=r, batch_ratio_at_user=e.tokens_per_s_per_user)
    return out
