"""Triton kernel for ``helix::partial_attention`` on GPU (decode and short queries): split-S flash decoding.

Each program takes one query row (batch b, query head h, query position l) and one split of the rank's local
KV slots; it streams BLOCK_N slots at a time through an online softmax, masking by *global* position
(slot -> position as in ``ops.slot_positions``; visible when position <= the query's position). It writes the
split's running max m, sum l and unnormalised output acc in fp32. The splits are then merged exactly
(lse_s = m_s + ln l_s; lse = logsumexp_s lse_s; o = sum_s exp(m_s - lse) acc_s), with -inf rows giving o = 0.
Natural-log LSE, as the merge after the all-to-all expects.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _split_kernel(
    Q, K, V, POS, M_OUT, L_OUT, ACC_OUT,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    HQ, LQ, GROUP, CAPACITY, SPLIT_LEN, NUM_SPLITS,
    kvp_rank, kvp, kv_block, scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)  # (b, h, l) flattened
    split = tl.program_id(1)
    l_idx = row % LQ
    h = (row // LQ) % HQ
    b = row // (LQ * HQ)
    kh = h // GROUP
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    q = tl.load(Q + b * stride_qb + h * stride_qh + l_idx * stride_ql + d, mask=d_mask, other=0.0).to(tl.float32)
    q_pos = tl.load(POS + l_idx)
    m_i = tl.full((), float("-inf"), tl.float32)
    l_i = tl.zeros((), tl.float32)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    start = split * SPLIT_LEN
    stop = tl.minimum(start + SPLIT_LEN, CAPACITY)
    k_base = K + b * stride_kb + kh * stride_kh
    v_base = V + b * stride_vb + kh * stride_vh
    for n0 in range(start, stop, BLOCK_N):
        slots = n0 + tl.arange(0, BLOCK_N)
        in_range = slots < stop
        key_pos = (slots // kv_block) * (kv_block * kvp) + kvp_rank * kv_block + slots % kv_block
        visible = in_range & (key_pos <= q_pos)
        k = tl.load(k_base + slots[:, None] * stride_ks + d[None, :], mask=in_range[:, None] & d_mask[None, :], other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scale
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe)
        alpha = tl.exp(m_i - m_safe)
        v = tl.load(v_base + slots[:, None] * stride_vs + d[None, :], mask=in_range[:, None] & d_mask[None, :], other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    out = row * NUM_SPLITS + split
    tl.store(M_OUT + out, m_i)
    tl.store(L_OUT + out, l_i)
    tl.store(ACC_OUT + out * D + d, acc, mask=d_mask)


def partial_attention(q, k_shard, v_shard, pos, kvp_rank, kvp, kv_block, scale, block_n=64, split_len=None):
    """Same contract as the reference ``helix::partial_attention`` (packed (Hq, B, L, D + e) output)."""
    from .ops import _lse_dtype

    b, hq, length, d = q.shape
    hk, capacity = k_shard.shape[1], k_shard.shape[2] - 1
    q = q.contiguous()
    k, v = k_shard, v_shard
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    rows = b * hq * length
    if split_len is None:  # enough programs to fill the GPU: about 4 per SM over all rows
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 8
        splits = max(1, min(triton.cdiv(capacity, block_n), triton.cdiv(4 * sms, rows)))
        split_len = triton.cdiv(triton.cdiv(capacity, splits), block_n) * block_n
    splits = max(1, triton.cdiv(capacity, split_len))
    m = torch.empty((rows, splits), device=q.device, dtype=torch.float32)
    l_sum = torch.empty_like(m)
    acc = torch.empty((rows, splits, d), device=q.device, dtype=torch.float32)
    _split_kernel[(rows, splits)](
        q, k, v, pos, m, l_sum, acc,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        hq, length, hq // hk, capacity, split_len, splits,
        kvp_rank, kvp, kv_block, scale,
        D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_N=block_n,
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
