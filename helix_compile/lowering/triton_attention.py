"""Triton kernel for ``helix::partial_attention`` on GPU (decode and short queries): split-S flash decoding.

Each program takes the query heads that share one KV head (batch b, KV head kh, query position l) and one split
of the rank's local KV slots, so each K/V tile is read once per group (``tl.dot`` over the group, in
3-pass TF32, "tf32x3": about fp32 accuracy on tensor cores, exact products for bf16 inputs); it streams
BLOCK_N slots at a time through an online softmax, masking by *global* position
(slot -> position as in ``ops.slot_positions``; visible when position <= the query's position). It writes the
split's running max m, sum l and unnormalised output acc in fp32. The splits are then merged exactly
(lse_s = m_s + ln l_s; lse = logsumexp_s lse_s; o = sum_s exp(m_s - lse) acc_s), with -inf rows giving o = 0.
Natural-log LSE, as the merge after the all-to-all expects.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _split_kernel(
    Q, K, V, POS, M_OUT, L_OUT, ACC_OUT,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    HK, LQ, GROUP, CAPACITY, SPLIT_LEN, NUM_SPLITS,
    kvp_rank, kvp, kv_block, scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program: the GROUP query heads that share KV head kh, at query position l of batch row b, over one
    # split of the local slots. K/V tiles are read once for the whole group (tl.dot over the group).
    pid = tl.program_id(0)  # (b, kh, l) flattened
    split = tl.program_id(1)
    l_idx = pid % LQ
    kh = (pid // LQ) % HK
    b = pid // (LQ * HK)
    g = tl.arange(0, BLOCK_G)
    g_mask = g < GROUP
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    heads = kh * GROUP + g
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + l_idx * stride_ql + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    q_pos = tl.load(POS + l_idx)
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    start = split * SPLIT_LEN
    stop = tl.minimum(start + SPLIT_LEN, CAPACITY)
    k_base = K + b * stride_kb + kh * stride_kh
    v_base = V + b * stride_vb + kh * stride_vh
    for n0 in range(start, stop, BLOCK_N):
        slots = n0 + tl.arange(0, BLOCK_N)
        in_range = slots < stop
        key_pos = (slots // kv_block) * (kv_block * kvp) + kvp_rank * kv_block + slots % kv_block
        visible = in_range & (key_pos <= q_pos)
        k = tl.load(k_base + slots[None, :] * stride_ks + d[:, None], mask=in_range[None, :] & d_mask[:, None], other=0.0)
        # fp32 operands and IEEE products (no TF32): the same scores as the reference's fp32 math
        s = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="tf32x3") * scale
        s = tl.where(visible[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        v = tl.load(v_base + slots[:, None] * stride_vs + d[None, :], mask=in_range[:, None] & d_mask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="tf32x3")
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    rows = (b * HK * GROUP + heads) * LQ + l_idx  # (b, h, l) row index of each query head
    out = rows * NUM_SPLITS + split
    tl.store(M_OUT + out, m_i, mask=g_mask)
    tl.store(L_OUT + out, l_i, mask=g_mask)
    tl.store(ACC_OUT + out[:, None] * D + d[None, :], acc, mask=g_mask[:, None] & d_mask[None, :])


@functools.lru_cache(maxsize=None)
def _sm_count(device_index) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def partial_attention(q, k_shard, v_shard, pos, kvp_rank, kvp, kv_block, scale, block_n=64, split_len=None):
    """Same contract as the reference ``helix::partial_attention`` (packed (Hq, B, L, D + e) output)."""
    from .ops import _lse_dtype

    b, hq, length, d = q.shape
    hk, capacity = k_shard.shape[1], k_shard.shape[2] - 1
    q = q.contiguous()
    k, v = k_shard, v_shard
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    rows, programs = b * hq * length, b * hk * length
    if split_len is None:  # enough programs to fill the GPU: about 4 per SM
        sms = _sm_count(q.device.index) if q.is_cuda else 8
        splits = max(1, min(triton.cdiv(capacity, block_n), triton.cdiv(4 * sms, programs)))
        split_len = triton.cdiv(triton.cdiv(capacity, splits), block_n) * block_n
    splits = max(1, triton.cdiv(capacity, split_len))
    m = torch.empty((rows, splits), device=q.device, dtype=torch.float32)
    l_sum = torch.empty_like(m)
    acc = torch.empty((rows, splits, d), device=q.device, dtype=torch.float32)
    _split_kernel[(programs, splits)](
        q, k, v, pos, m, l_sum, acc,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        hk, length, hq // hk, capacity, split_len, splits,
        kvp_rank, kvp, kv_block, scale,
        D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_G=max(16, triton.next_power_of_2(hq // hk)),
        BLOCK_N=block_n,
    )
    peak = m.amax(dim=1, keepdim=True)
    peak_safe = torch.where(torch.isinf(peak), torch.zeros_like(peak), peak)
    weight = torch.exp(m - peak_safe)  # 0 for empty splits
    total = (weight * l_sum).sum(dim=1)
    o = (weight.unsqueeze(-1) * acc).sum(dim=1) / torch.where(total == 0, torch.ones_like(total), total).unsqueeze(-1)
    lse = torch.where(total == 0, torch.full_like(total, float("-inf")), peak_safe.squeeze(1) + torch.log(total))
    o = o.reshape(b, hq, length, d).permute(1, 0, 2, 3)
    lse = lse.reshape(b, hq, length).permute(1, 0, 2).to(_lse_dtype(q.dtype))
    return torch.cat([o.to(q.dtype), lse.unsqueeze(-1).contiguous().view(q.dtype)], dim=-1)
