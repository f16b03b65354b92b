"""The Triton partial-attention kernels against the reference op, in Triton's interpreter (CPU).

The same kernels run compiled on a GPU (tests/gpu/smoke.py and benchmarks/attention.py check them
there). Each case fixes the launch configuration (rows per program, keys per tile, splits) so that both the
single-split path (prefill, written straight to the packed output) and the split + combine path (decode) run.
"""

import pytest
import torch

from helix_compile.lowering import ops
from helix_compile.lowering.triton_attention import partial_attention as triton_partial_attention

CASES = [  # batch, query heads, kv heads, query len, head dim, local capacity, kvp, kvp_rank, kv_block, dtype, config
    (2, 4, 2, 1, 16, 40, 2, 1, 4, torch.float32, (16, 16, 3, 4, 1)),  # decode, 3 splits + combine
    (1, 8, 1, 3, 24, 100, 4, 3, 8, torch.float32, (16, 16, 1, 4, 1)),  # MQA, head dim not a power of 2, 3 positions
    (2, 2, 2, 1, 8, 12, 3, 2, 4, torch.bfloat16, (16, 16, 2, 4, 1)),  # bf16: LSE bits split over two elements
    (1, 4, 2, 9, 16, 30, 2, 0, 4, torch.float32, (16, 16, 1, 4, 1)),  # prefill: several row blocks per KV head
]


def _check(case, first_pos, softcap=0.0, window=0, key_mask=None, dv=None, v_of_k=False, alibi=False, alibi_pos=None,
           chunk=0):
    b, hq, hk, length, dk, capacity, kvp, rank, block, dtype, config = case
    d = dv or dk
    g = torch.Generator().manual_seed(first_pos)
    q = torch.randn(b, hq, length, dk, generator=g).to(dtype)
    k = torch.randn(b, hk, capacity + 1, dk, generator=g).to(dtype)
    v = k[..., :d] if v_of_k else torch.randn(b, hk, capacity + 1, d, generator=g).to(dtype)
    pos = torch.arange(length) + first_pos
    slopes = 2.0 ** -torch.arange(1, hq + 1, dtype=torch.float32) if alibi else None
    want = ops.partial_attention_reference(q, k, v, pos, rank, kvp, block, 0.3, softcap, window, key_mask, slopes,
                                           alibi_pos, chunk=chunk)
    got = triton_partial_attention(q, k, v, pos, rank, kvp, block, 0.3, softcap, window, key_mask, config=config,
                                   alibi_slopes=slopes, alibi_pos=alibi_pos, chunk=chunk)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got[..., :d].float(), want[..., :d].float(), rtol=tol, atol=tol)
    lse_want = want[..., d:].contiguous().view(torch.float32)
    lse_got = got[..., d:].contiguous().view(torch.float32)
    assert torch.equal(torch.isinf(lse_got), torch.isinf(lse_want))
    torch.testing.assert_close(lse_got, lse_want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("first_pos", [0, 5, 37])  # 0: some rows see no key at all (lse = -inf, o = 0)
def test_matches_reference(case, first_pos):
    _check(case, first_pos)


@pytest.mark.parametrize("case", [CASES[0], CASES[3]])
def test_softcap_window_and_key_mask(case):
    """Gemma 2's logit soft-capping, a sliding window shorter than the keys, and a left-padded key mask."""
    b = case[0]
    mask = torch.ones(b, 40, dtype=torch.long)
    mask[0, :6] = 0  # row 0 is left-padded by 6 positions
    _check(case, 30, softcap=2.0)
    _check(case, 30, window=7)
    _check(case, 30, key_mask=mask)
    _check(case, 30, softcap=2.0, window=5, key_mask=mask)


@pytest.mark.parametrize("case", [CASES[0], CASES[3]])
def test_value_head_dim_differs(case):
    """MLA: keys of dn + dr = 24 dims, values of 16 (decode with splits, and prefill); MiMo-V2-Flash: GQA keys of 16
    dims and values of 8 in a sliding window."""
    _check(case[:4] + (24,) + case[5:], 9, dv=16)
    _check(case, 30, window=7, dv=8)


def test_absorbed_mla_values_are_a_view_of_the_keys():
    """Absorbed MLA: one KV head [latent (32) | rotary key (8)], the values the latent part of the same tensor."""
    mqa = (2, 8, 1, 1, 40, 40, 2, 1, 4, torch.float32, (16, 16, 3, 4, 1))
    _check(mqa, 9, dv=32, v_of_k=True)


@pytest.mark.parametrize("case", [CASES[0], CASES[3]])
def test_head_dim_split_into_two_tiles(case):
    """A head dim of 80 runs as a 64-column and a 16-column tile (``head_dim_tiles``), not padded to 128."""
    from helix_compile.lowering.triton_attention import head_dim_tiles

    assert head_dim_tiles(80) == (64, 16) and head_dim_tiles(576) == (512, 64) and head_dim_tiles(128) == (128, 0)
    assert head_dim_tiles(24) == (32, 0)  # 16 + 16 pads as much as 32
    _check(case[:4] + (80,) + case[5:], 9)


@pytest.mark.parametrize("config,length,padded", [((16, 16, 3, 4, 1), 1, False), ((16, 16, 1, 4, 1), 5, False),
                                                   ((16, 16, 3, 4, 1), 1, True), ((16, 16, 1, 4, 1), 5, True)])
def test_keys_in_two_parts_values_the_first(config, length, padded):
    """Absorbed MLA as the MLA pass calls it: keys [latent (32) | rotary key (8)] read in place from two tensors
    (``k_rope``), the latent passed as the values too (read once, from the key tile); decode with splits, and
    prefill; with a left-padded key mask (a padded batch), row 1 padded up to position 23."""
    g = torch.Generator().manual_seed(3)
    b, hq, capacity, rank, kvp, block = 2, 8, 40, 1, 2, 4
    q = torch.randn(b, hq, length, 40, generator=g)
    latent = torch.randn(b, 1, capacity + 1, 32, generator=g)
    rope = torch.randn(b, 1, capacity + 1, 8, generator=g)
    pos = torch.arange(length) + 20
    mask = None
    if padded:
        mask = torch.ones(b, 40, dtype=torch.long)
        mask[0, :6], mask[1, :23] = 0, 0
    want = ops.partial_attention_reference(q, torch.cat([latent, rope], -1), latent, pos, rank, kvp, block, 0.3,
                                           key_mask=mask)
    got = triton_partial_attention(q, latent, latent, pos, rank, kvp, block, 0.3, key_mask=mask, config=config,
                                   k_rope=rope)
    assert torch.equal(ops.partial_attention_reference(q, latent, latent, pos, rank, kvp, block, 0.3, key_mask=mask,
                                                       k_rope=rope), want)
    if padded:  # the mask hides keys: the result differs from the unmasked one
        assert not torch.allclose(want, ops.partial_attention_reference(q, latent, latent, pos, rank, kvp, block, 0.3,
                                                                        k_rope=rope))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3]])
def test_alibi(case):
    """ALiBi: slope[h] * (key position - query position) on the global positions of the local slots (decode with
    splits, MQA with several positions, prefill), and BLOOM's positions among the unmasked keys of a mask with
    holes (alibi_pos = (cumsum(mask) - 1) * mask)."""
    b = case[0]
    mask = torch.ones(b, 40, dtype=torch.long)
    mask[0, :6] = 0  # left padding
    mask[-1, 10:13] = 0  # a hole: the ALiBi positions after it are not the global ones
    _check(case, 30, alibi=True)
    _check(case, 5, alibi=True)
    _check(case, 30, key_mask=mask, alibi=True, alibi_pos=(mask.cumsum(-1) - 1) * mask)


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3]])
def test_chunked(case):
    """Llama 4's chunked attention: a query sees the keys of its own chunk of positions only (chunk starts that fall
    inside the shard, before it and on a row block's rows; decode with splits, MQA with several positions, prefill),
    and chunks counted from a left-padded row's first real token (transformers' chunked_overlay)."""
    b = case[0]
    mask = torch.ones(b, 40, dtype=torch.long)
    mask[0, :6] = 0  # row 0 is left-padded by 6 positions: its chunks start at 6, 6 + chunk, ...
    _check(case, 30, chunk=8)
    _check(case, 5, chunk=3)
    _check(case, 30, chunk=8, key_mask=mask)
    _check(case, 3, chunk=4, key_mask=mask)  # row 0's queries at 3..: padding rows, no visible key before 6
    _check(case, 30, chunk=6, window=4)
