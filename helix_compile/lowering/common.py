"""What partial attention's torch reference (``ops.py``) and its Triton kernels (``triton_attention.py``) compute
alike: the LSE packed after each output row, and a key mask's left padding.

Contract
    lse_dtype(dtype)     the dtype an LSE is kept in for outputs of ``dtype``: fp32, or ``dtype`` when wider
    lse_elems(dtype)     the elements of ``dtype`` one LSE takes in the packed output
    left_padding(mask)   (B,) the leading zeros of each row of a 2-D attention mask
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
