"""Causal prefill on CUDA through PyTorch's own attention kernels (cuDNN, FlashAttention-2), with the LSE returned.

A prefill's partial attention is compute-bound: L queries against up to L keys. PyTorch ships two kernels that
return the fp32 natural-log LSE the Helix merge needs, ``aten._scaled_dot_product_cudnn_attention`` and
``aten._scaled_dot_product_flash_attention``; this module runs a rank's prefill block through them where the keys
the queries see are contiguous slots of the rank's shard, and leaves every other case to the Triton kernel.

Contract
    in:  the arguments of ``helix::partial_attention`` (``ops.py``) for a CUDA call with more than one query
         position.
    out: ``eligible(...)``: whether the call's static arguments allow this path (one KVP rank, so local slot s holds
         global position s; no soft-cap, window, ALiBi, chunk or second key part; 16-bit dtype; keys and values of
         the same head dim, at most 256 wide, a multiple of 8; shards in q's dtype: an FP8 cache's prefill runs
         the Triton kernel, which folds each head's scale into its fp32 math).
         ``helix::prefill_attention(q, k_shard, v_shard, pos, scale, key_mask)``: the packed output of
         ``partial_attention`` (o in q's dtype, the fp32 LSE bit-cast into the tail).
    refuses: nothing; a call it cannot take runs the Triton kernel instead, with the same result contract.

What it computes. The queries sit at positions pos = p0 .. p0 + L - 1; with one KVP rank their keys are slots
[0, p0 + L) of the shard, already written by ``kv_write_local``. Slots [p0, p0 + L) against the queries are the
causal square (``is_causal``: query l sees slots p0 .. p0 + l); slots [0, p0), written by earlier calls, are seen
by every query (no mask). With p0 = 0 (a prompt into an empty cache) the square is the whole answer; otherwise the
two parts' outputs merge exactly by their LSEs, as the KVP partials do (``lse_merge``).

The host decides. ``p0``, whether ``pos`` is consecutive, and whether the 2-D ``key_mask`` (generate always passes
one) hides no key below p0 + L are read in one device-to-host copy, once per layer per prefill. That is why the op
is opaque (a ``custom_op``: Python runs when it is called) and why a step of more than one query position is never
captured in a CUDA graph (``compile.py``); under capture the op takes the Triton kernel, which needs no host read.
A call whose positions or mask do not fit (gaps, a padded row) runs the Triton kernel.

Kernel choice: cuDNN for head dims up to 128 (about 600 TFLOP/s causal on an H100 at head dim 128, against
320-350 for FlashAttention-2), FlashAttention-2 above it. Query heads that share a KV head are given the KV head
expanded when a kernel does not take grouped heads itself (a copy of the keys read: small beside the L^2 work).
"""

from __future__ import annotations

from typing import Optional

import torch

from .common import lse_dtype, lse_elems, pack_lse

CUDNN_MAX_HEAD_DIM = 128
FLASH_MAX_HEAD_DIM = 256


def eligible(q, k_shard, v_shard, kvp, softcap, window, alibi_slopes, alibi_pos, k_rope, chunk) -> bool:
    """Whether a CUDA prefill call may take this path (static facts only; the host checks the rest per call). FP8
    shards do not: their dtype is not q's."""
    d = q.shape[-1]
    return (q.is_cuda and kvp == 1 and softcap == 0 and window == 0 and chunk == 0 and alibi_slopes is None
            and alibi_pos is None and k_rope is None and v_shard is not k_shard
            and q.dtype in (torch.bfloat16, torch.float16) and k_shard.dtype == q.dtype and v_shard.dtype == q.dtype
            and k_shard.shape[-1] == d and v_shard.shape[-1] == d and d % 8 == 0 and d <= FLASH_MAX_HEAD_DIM
            and q.shape[1] % k_shard.shape[1] == 0)


@torch.library.custom_op("helix::prefill_attention", mutates_args=())
def prefill_attention(q: torch.Tensor, k_shard: torch.Tensor, v_shard: torch.Tensor, pos: torch.Tensor, scale: float,
                      key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    b, hq, length, d = q.shape
    start = _contiguous_start(pos, key_mask, k_shard.shape[2] - 1)
    if start is None:
        from .triton_attention import partial_attention as triton_partial_attention

        return triton_partial_attention(q, k_shard, v_shard, pos, 0, 1, 1, scale, key_mask=key_mask)
    o, lse = attend(q, k_shard[:, :, start:start + length], v_shard[:, :, start:start + length], True, scale)
    if start > 0:
        o_seen, lse_seen = attend(q, k_shard[:, :, :start], v_shard[:, :, :start], False, scale)
        o, lse = merge(o, lse, o_seen, lse_seen)
    packed = torch.empty((hq, b, length, d + lse_elems(q.dtype)), device=q.device, dtype=q.dtype)
    packed[..., :d] = o.transpose(0, 1)
    packed[..., d:] = pack_lse(lse.transpose(0, 1).to(lse_dtype(q.dtype)), q.dtype)
    return packed


@prefill_attention.register_fake
def _(q, k_shard, v_shard, pos, scale, key_mask=None):
    b, hq, length, d = q.shape
    return q.new_empty((hq, b, length, d + lse_elems(q.dtype)))


def _contiguous_start(pos: torch.Tensor, key_mask: Optional[torch.Tensor], capacity: int) -> Optional[int]:
    """p0 when the queries sit at p0 .. p0 + L - 1 inside the cache and the key mask hides none of [0, p0 + L);
    None otherwise (or while a CUDA graph is being captured: no host read is allowed then)."""
    if pos.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    length = pos.shape[0]
    facts = [pos[0], pos[-1], (pos[1:] - pos[:-1] == 1).all()]
    if key_mask is not None:
        facts.append((key_mask != 0).all(dim=0).cumprod(0).sum())  # leading columns with no hidden key
    facts = torch.stack([f.to(torch.int64) for f in facts]).tolist()
    first, last, consecutive = facts[:3]
    end = first + length
    if not consecutive or last != end - 1 or first < 0 or end > capacity:
        return None
    if key_mask is not None and facts[3] < end:
        return None
    return first


def attend(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(o (B, Hq, L, D) in q's dtype, lse (B, Hq, L) fp32) of q over k, v (B, Hk, S, D), S >= 1; causal: the
    square's top-left triangle (S == L)."""
    b, hq, length, d = q.shape
    if d <= CUDNN_MAX_HEAD_DIM:  # cuDNN reads grouped KV heads itself (checked bitwise against expanded heads)
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    else:
        if k.shape[1] != hq:  # each KV head read by its group, as one head per query head
            group = hq // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    o, lse = out[0], out[1]
    return o, lse.reshape(b, hq, length).float()


def merge(o1, lse1, o2, lse2) -> tuple[torch.Tensor, torch.Tensor]:
    """Two partials of the same queries over disjoint keys, merged exactly by their LSEs (in fp32, or wider)."""
    wide = torch.promote_types(o1.dtype, torch.float32)
    lse = torch.logaddexp(lse1, lse2)
    finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w1, w2 = torch.exp(lse1 - finite).unsqueeze(-1), torch.exp(lse2 - finite).unsqueeze(-1)
    return (o1.to(wide) * w1 + o2.to(wide) * w2).to(o1.dtype), lse
