"""Pareto frontier of (tokens/s/user, tokens/s/GPU) and the paper's two headline ratios."""
from __future__ import annotations


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


def headline(helix: list, baseline: list) -> dict:
    """Ratios the paper reports, from two frontiers (lists of Evaluation).

    interactivity: best tokens/s/user of Helix over the best of the baselines (the paper's "up to 1.5x").
    throughput:    max over Helix frontier points of tokens/s/GPU over the best baseline point that is at
                   least as interactive (the paper's "up to 32x at the same latency").
    batch:         the same, comparing the concurrent batch (users served by the model instance).
    """
    if not helix or not baseline:
        return {}
    u_h = max(e.tokens_per_s_per_user for e in helix)
    u_b = max(e.tokens_per_s_per_user for e in baseline)
    thr, bat = [], []
    for e in helix:
        rivals = [b for b in baseline if b.tokens_per_s_per_user >= e.tokens_per_s_per_user]
        if rivals:
            thr.append((e.tokens_per_s_per_gpu / max(b.tokens_per_s_per_gpu for b in rivals), e))
            bat.append((e.candidate.batch / max(b.candidate.batch for b in rivals), e))
    out = {"interactivity_ratio": u_h / u_b, "helix_max_tokens_per_s_per_user": u_h,
           "baseline_max_tokens_per_s_per_user": u_b}
    if thr:
        r, e = max(thr, key=lambda t: t[0])
        out.update(throughput_ratio=r, throughput_ratio_at_user=e.tokens_per_s_per_user)
        r, e = max(bat, key=lambda t: t[0])
        out.update(batch_ratio=r, batch_ratio_at_user=e.tokens_per_s_per_user)
    return out
