"""ALiBi (BLOOM) on real gloo ranks against single-device transformers with its own StaticCache.

BLOOM adds slope_h * (position of the key) to its scores through ``baddbmm``; with a 2-D attention_mask the
position is the key's rank among the unmasked keys, ``(cumsum(mask) - 1) * mask``, which a hole inside a row makes
differ from the global position by more than a constant (so helix must take it from the mask: ``alibi_pos``).
transformers' BLOOM needs that mask as long as the static cache (its ALiBi tensor has the mask's length), so the
mask here covers max_cache_len positions, zeros beyond the tokens so far. Prefill + 5 decode steps; logits within
1e-5 relative, greedy tokens identical, the same on every rank.
"""

import os

import pytest
import torch

from distributed import run_ranks
from helix_compile import Layout, StaticCache
from models import model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

MAX_LEN, KV_BLOCK = 16, 4


def _body(rank, cases):
    from transformers import StaticCache as HFStaticCache

    out = []
    for layout_args, hopb, hole in cases:
        torch._dynamo.reset()
        m = model("bloom")
        layout = Layout(*layout_args, kv_block=KV_BLOCK, hopb_chunks=hopb)
        compiled = torch.compile(m, backend="helix", options={"layout": layout, "executor": "eager"}, fullgraph=True)
        ids = torch.randint(3, 97, (4, 7), generator=torch.Generator().manual_seed(2))
        mask = torch.zeros(4, MAX_LEN, dtype=torch.long)
        mask[:, :7] = 1
        mask[1, :3] = 0  # left padding
        if hole:
            mask[0, 2] = mask[2, 4] = 0  # holes: the ALiBi positions after them are not the global ones
        cache, ref_cache = StaticCache(m, 4, MAX_LEN, layout), HFStaticCache(m.config, max_cache_len=MAX_LEN)
        worst, length = 0.0, 7
        with torch.no_grad():
            for _ in range(6):
                got = compiled(input_ids=ids, attention_mask=mask, past_key_values=cache).logits[:, -1]
                ref = m(input_ids=ids, attention_mask=mask, past_key_values=ref_cache).logits[:, -1]
                worst = max(worst, ((got - ref).abs().max() / ref.abs().max()).item())
                ids = ref.argmax(-1, keepdim=True)
                assert torch.equal(got.argmax(-1, keepdim=True), ids)
                mask[:, length] = 1
                length += 1
        out.append((worst, got.tolist()))
    return out


def test_bloom_alibi_one_rank():
    """In-process (CI): the matcher, BLOOM's mask-derived ALiBi positions with holes, and the no-mask form."""
    for worst, _ in _body(0, [((1, 1), 1, True), ((1, 1), 1, False)]):
        assert worst < 1e-5, worst


@pytest.mark.skipif(os.environ.get("HELIX_FULL_MATRIX") != "1", reason="full layout matrix: HELIX_FULL_MATRIX=1")
def test_bloom_alibi_two_ranks():
    """kvp = 2 (with HOP-B, which narrows alibi_pos per batch chunk) and tpa = 2 (each rank the slopes of its
    heads), with and without holes."""
    cases = [((2, 1), 2, True), ((1, 2), 1, True), ((2, 1), 1, False), ((1, 2), 1, False)]
    per_rank = run_ranks(2, _body, cases)
    for i, case in enumerate(cases):
        worst, logits = per_rank[0][i]
        print(f"bloom {case}: max rel err {worst:.2e}")
        assert worst < 1e-5, (case, worst)
        assert all(r[i][1] == logits for r in per_rank[1:]), "ranks disagree"
