"""lowering/ops.py: the LSE packed into a low-precision partial-attention output."""

import pytest
import torch

from helix_compile.lowering.ops import pack_lse


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_lse_is_the_fp32_bits(dtype):
    """pack_lse holds the fp32 LSE's bits, low half first, as ``view(dtype)`` reads them, so that lse_merge's
    ``view(float32)`` reads the LSE back bit for bit (-inf, a rank with no visible key, included); compiled on CPU
    with a size-1 last dim (decode: one query) it packs the same bits."""
    lse = torch.randn(4, 2, 1) * 30
    lse[0, 0, 0], lse[1, 1, 0] = float("-inf"), -0.0
    packed = pack_lse(lse, dtype)
    assert packed.shape == (4, 2, 1, 2) and packed.dtype == dtype
    assert torch.equal(packed.view(torch.int16), lse.unsqueeze(-1).contiguous().view(dtype).view(torch.int16))
    assert torch.equal(packed.contiguous().view(torch.float32).squeeze(-1).view(torch.int32), lse.view(torch.int32))
    compiled = torch.compile(pack_lse, backend="inductor", fullgraph=True)(lse, dtype)
    assert torch.equal(compiled.view(torch.int16), packed.view(torch.int16))
