"""Layouts of a world size, and exactness runs over (family, layout) cases on real gloo ranks (MoE and MLA tests)."""

from __future__ import annotations

import torch

from helix_compile import Layout
from helix_compile.testing import compare
from distributed import run_ranks
from models import config, model, prompt, runs_here

STEPS, MAX_LEN, KV_BLOCK = 41, 50, 4  # 12 KV blocks: every KVP rank owns several; decode crosses blocks and ranks


def valid_layouts(family: str, world: int) -> list[dict]:
    """Every (kvp, tpa, ep) of ``world`` ranks that ``Layout.validate`` accepts for this family."""
    cfg, out = config(family), []
    for tpa in (t for t in range(1, world + 1) if world % t == 0):
        for ep in (e for e in range(1, world + 1) if world % e == 0):
            fields = dict(kvp=world // tpa, tpa=tpa, ep=ep)
            try:
                Layout(kv_block=KV_BLOCK, **fields).validate(cfg, world_size=world)
            except ValueError:
                continue
            out.append(fields)
    return out


def _body(rank, cases):
    reports = []
    for family, fields, experts in cases:
        torch._dynamo.reset()
        m = model(family, experts=experts)
        reports.append(compare(m, Layout(kv_block=KV_BLOCK, **fields), prompt(batch=2), STEPS, MAX_LEN))
    return reports


def check(world: int, cases: list[tuple]) -> None:
    """cases: (family, Layout fields, experts implementation or None). Logits within 1e-5 relative of
    single-device transformers at every step, greedy tokens identical, every rank the same logits. A family the
    installed transformers lacks or helix refuses on it is left out (``models.runs_here``)."""
    cases = [case for case in cases if runs_here(case[0])]
    per_rank = run_ranks(world, _body, cases)
    for i, (family, fields, experts) in enumerate(cases):
        r0 = per_rank[0][i]
        print(f"{family} world={world} {r0.layout} experts={experts or 'grouped_mm'}: max rel err {r0.max_rel_err:.2e}, "
              f"cache bytes/rank {r0.cache_bytes} (transformers {r0.reference_cache_bytes})")
        assert r0.max_rel_err < 1e-5, (family, fields, r0.max_rel_err)
        assert r0.tokens_equal, (family, fields, r0.tokens, r0.reference_tokens)
        for r in per_rank[1:]:
            assert r[i].logits == r0.logits, f"ranks disagree: {family} {fields}"
            assert r[i].tokens == r0.tokens
