"""The Triton partial-attention kernel against the reference op, in Triton's interpreter (CPU).

The same kernel runs compiled on the GPU machines (tests/gpu/smoke.py checks it there end to end).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the triton import

import pytest  # noqa: E402
import torch  # noqa: E402

from helix_compile.lowering import ops  # noqa: E402
from helix_compile.lowering.triton_attention import partial_attention as triton_partial_attention  # noqa: E402

CASES = [  # batch, query heads, kv heads, query len, head dim, local capacity, kvp, kvp_rank, kv_block, dtype
    (2, 4, 2, 1, 16, 40, 2, 1, 4, torch.float32),
    (1, 8, 1, 3, 24, 100, 4, 3, 8, torch.float32),  # MQA, head dim not a power of 2, 3 query positions
    (2, 2, 2, 1, 8, 12, 3, 2, 4, torch.bfloat16),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("first_pos", [0, 5, 37])  # 0: some rows see no key at all (lse = -inf, o = 0)
def test_matches_reference(case, first_pos):
    b, hq, hk, length, d, capacity, kvp, rank, block, dtype = case
    g = torch.Generator().manual_seed(first_pos)
    q = torch.randn(b, hq, length, d, generator=g).to(dtype)
    k = torch.randn(b, hk, capacity + 1, d, generator=g).to(dtype)
    v = torch.randn(b, hk, capacity + 1, d, generator=g).to(dtype)
    pos = torch.arange(length) + first_pos
    want = ops.partial_attention(q, k, v, pos, rank, kvp, block, 0.3)
    got = triton_partial_attention(q, k, v, pos, rank, kvp, block, 0.3, block_n=8, split_len=16)
    torch.testing.assert_close(got[..., :d].float(), want[..., :d].float(), rtol=1e-5, atol=1e-5)
    lse_want = want[..., d:].contiguous().view(torch.float32)
    lse_got = got[..., d:].contiguous().view(torch.float32)
    assert torch.equal(torch.isinf(lse_got), torch.isinf(lse_want))
    torch.testing.assert_close(lse_got, lse_want, rtol=1e-5, atol=1e-5)
