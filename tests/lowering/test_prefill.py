"""lowering/prefill.py on CPU: the host's decision (which calls may take PyTorch's kernels) and the LSE merge of the
two parts of a continued prompt. The kernels themselves run on a GPU (tests/gpu/test_prefill_kernels.py)."""

import pytest
import torch

from helix_compile.lowering import prefill


@pytest.mark.parametrize("positions,mask,capacity,want", [
    (range(0, 9), None, 16, 0),                      # a prompt into an empty cache
    (range(5, 9), None, 16, 5),                      # the next chunk of a prompt: keys 0..4 written before
    (range(0, 9), [[1] * 12, [1] * 12], 16, 0),      # generate's mask, hiding nothing
    (range(0, 9), [[1] * 12, [0] + [1] * 11], 16, None),  # a left-padded row: the Triton kernel masks it
    (range(0, 9), [[1] * 8], 16, None),              # a mask shorter than the keys read
    ([0, 1, 3, 4], None, 16, None),                  # positions with a gap
    (range(10, 20), None, 16, None),                 # past the cache's slots
])
def test_which_calls_take_the_kernels(positions, mask, capacity, want):
    pos = torch.tensor(list(positions))
    key_mask = torch.tensor(mask) if mask is not None else None
    assert prefill._contiguous_start(pos, key_mask, capacity) == want


def test_two_parts_merge_to_the_whole():
    """Queries at positions 5..8 over keys 0..8: the causal square over keys 5..8 and the unmasked keys 0..4,
    merged by their LSEs, equal attention over all nine keys."""
    torch.manual_seed(0)
    b, h, d, start, length = 2, 3, 8, 5, 4
    q = torch.randn(b, h, length, d, dtype=torch.float64)
    k = torch.randn(b, h, start + length, d, dtype=torch.float64)
    v = torch.randn(b, h, start + length, d, dtype=torch.float64)
    scale = d ** -0.5

    def attend(keys, values, first):  # the queries at positions start.. over keys at positions first..
        scores = q @ keys.transpose(-1, -2) * scale
        key_pos = torch.arange(first, first + keys.shape[2])
        scores = scores.masked_fill(key_pos[None, :] > torch.arange(start, start + length)[:, None], float("-inf"))
        lse = scores.logsumexp(-1)
        return torch.exp(scores - lse[..., None]) @ values, lse

    o, lse = prefill.merge(*attend(k[:, :, start:], v[:, :, start:], start), *attend(k[:, :, :start], v[:, :, :start], 0))
    whole_o, whole_lse = attend(k, v, 0)
    assert torch.allclose(o, whole_o, rtol=0, atol=1e-14) and torch.allclose(lse, whole_lse, rtol=0, atol=1e-14)


def test_only_calls_without_masks_beyond_causal_are_eligible():
    q = torch.zeros(1, 4, 8, 64, dtype=torch.bfloat16)
    k = torch.zeros(1, 2, 17, 64, dtype=torch.bfloat16)
    assert not prefill.eligible(q, k, k.clone(), 1, 0.0, 0, None, None, None, 0)  # on the CPU: the reference
    cuda = type("Q", (), {"is_cuda": True, "shape": q.shape, "dtype": q.dtype})()
    assert prefill.eligible(cuda, k, k.clone(), 1, 0.0, 0, None, None, None, 0)
    for kvp, softcap, window, chunk in ((2, 0.0, 0, 0), (1, 30.0, 0, 0), (1, 0.0, 4, 0), (1, 0.0, 0, 8)):
        assert not prefill.eligible(cuda, k, k.clone(), kvp, softcap, window, None, None, None, chunk)
    assert not prefill.eligible(cuda, k, k, 1, 0.0, 0, None, None, None, 0)  # MLA: the latent as keys and values
    fp8 = k.to(torch.float8_e4m3fn)
    assert not prefill.eligible(cuda, fp8, fp8.clone(), 1, 0.0, 0, None, None, None, 0)
