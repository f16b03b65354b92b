"""What partial attention's torch reference (``ops.py``) and its Triton kernels (``triton_attention.py``) compute
alike: the LSE packed after each output row, and a key mask's left padding.

Contract
    lse_dtype(dtype)     the dtype an LSE is kept in for outputs of ``dtype``: fp32, or ``dtype`` when wider
    lse_elems(dtype)     the elements of ``dtype`` one LSE takes in the packed output
    left_padding(mask)   (B,) the leading zeros of each row of a 2-D attention mask
    pack_lse(lse, dtype) an LSE's bits as elements of ``dtype``, the packed output's tail
"""

from __future__ import annotations

import torch


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype.itemsize <= 4 else dtype


def lse_elems(dtype: torch.dtype) -> int:
    """Elements of ``dtype`` that hold one LSE value in the packed partial-attention output."""
    return lse_dtype(dtype).itemsize // dtype.itemsize


def left_padding(key_mask: torch.Tensor) -> torch.Tensor:
    """(B,) the leading zeros of each row of the 2-D attention mask (transformers' ``left_padding_tokens``)."""
    return (key_mask.cumsum(dim=-1) == 0).sum(dim=-1)


def pack_lse(lse: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(..., e): the bits of ``lse`` (in ``lse_dtype(dtype)``) as ``e = lse_elems(dtype)`` elements of ``dtype``,
    low part first: what ``lse.unsqueeze(-1).contiguous().view(dtype)`` reads on a little-endian machine, and what
    ``lse_merge`` views back. Built from same-size bit casts and integer ops only: a view to a narrower dtype
    needs a last stride of 1, which a compiler may not give the size-1 dim of ``unsqueeze(-1)``."""
    e = lse_elems(dtype)
    if e == 1:
        return lse.unsqueeze(-1)
    nbits = dtype.itemsize * 8
    full = 1 << nbits
    bits = lse.view(torch.int32)
    parts = []
    for k in range(e):
        part = torch.bitwise_and(torch.bitwise_right_shift(bits, nbits * k), full - 1)
        part = torch.where(part >= full // 2, part - full, part)  # the same bits as a signed nbits-bit integer
        parts.append(part.to(torch.int16 if nbits == 16 else torch.int8))
    return torch.stack(parts, dim=-1).view(dtype)
