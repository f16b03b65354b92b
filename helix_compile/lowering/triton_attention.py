"""Triton kernels for ``helix::partial_attention`` on CUDA: flash decoding (split-KV) and flash prefill, one code.

Rows. For batch row b and local KV head kh the kernel attends the GROUP = Hq/Hk query heads that read kh at every
query position: row r = l * GROUP + g (query position l, head kh * GROUP + g). A program takes BLOCK_R rows of one
(b, kh), so each K/V tile is read once for all the query heads that share it (MQA/GQA packing) and, in prefill,
for BLOCK_R / GROUP query positions at once.

Keys. Local slot s holds global position key_pos(s) = (s // kv_block) * kv_block * kvp + kvp_rank * kv_block
+ s % kv_block (``ops.slot_positions``). Slots are filled in order, so the keys any row of the program can see
are
the slots [lo, hi): hi counts the slots below the block's last query position + 1 (and below the key mask's
length), lo the slots that every row's sliding window (or chunk) has left. Both come from the positions on the device, so a
half-empty cache is never read and the host never syncs. A program with NUM_SPLITS > 1 takes one of NUM_SPLITS
equal parts of [lo, hi) (flash decoding: at batch 1 the splits fill the SMs).

Math. Per row: scores = q.k * scale (then softcap * tanh(score / softcap) if softcap > 0; then ALiBi's
slope[head] * (a(key) - q_pos) with a(key) the key's global position, or ALIBI_POS[b, key position]), masked by global
position (causal, window, key mask, chunk: keys from the query's chunk start q_pos - (q_pos - LP[b]) mod chunk on,
LP[b] the row's left padding), online softmax in fp32 with natural exp. Products run on tensor cores:
exact for 16-bit inputs (fp32 accumulation, as SDPA), "tf32x3" (about fp32 accuracy) for fp32 inputs. One split:
the program writes o = acc / l and lse = m + ln l straight into the packed output. Several: it writes (m, l, acc)
and ``_combine`` merges the splits exactly (lse = logsumexp_s lse_s, o = sum_s exp(lse_s - lse) o_s). A row with
no visible key gets lse = -inf and o = 0. The LSE is natural-log, bit-cast into the packed tail as ``ops`` says.

FP8 shards (KV_FP8, float8_e4m3fn with fp32 scales per KV head): each tile is loaded as fp8 and converted to the
query's dtype; the head's key scale is folded into the score scale (q.(k * ks) = (q.k) * ks) and its value scale
into the output (sum_j p_j (v_j * vs) = vs * sum_j p_j v_j, applied to the fp32 accumulator), so the products and
the softmax run as for 16-bit shards, accumulated in fp32.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .common import left_padding, lse_elems


@triton.jit
def _local_count(p, kvp_rank, kvp, kv_block):
    """Local slots whose global position is < p (p may be a tensor)."""
    cycle = kv_block * kvp
    rem = p % cycle - kvp_rank * kv_block
    return (p // cycle) * kv_block + tl.minimum(tl.maximum(rem, 0), kv_block)


@triton.jit
def _store_packed(OUT, out_row, o, lse, D, d, d_mask, r_mask, lse_mask, LSE_ELEMS: tl.constexpr):
    """Write o (BLOCK_R, BLOCK_D: the columns d) and lse (BLOCK_R,) to packed rows: o in the output dtype, lse's
    fp32 bits after (where lse_mask)."""
    base = OUT + out_row * (D + LSE_ELEMS)
    tl.store(base[:, None] + d[None, :], o.to(OUT.dtype.element_ty), mask=r_mask[:, None] & d_mask[None, :])
    if LSE_ELEMS == 1:
        tl.store(base + D, lse.to(OUT.dtype.element_ty), mask=lse_mask)
    else:  # two 16-bit halves of the fp32 bits, low half first (little-endian, as Tensor.view(float32) reads them)
        bits = lse.to(tl.int32, bitcast=True)
        lo = (bits & 0xFFFF).to(tl.uint16).to(OUT.dtype.element_ty, bitcast=True)
        hi = ((bits >> 16) & 0xFFFF).to(tl.uint16).to(OUT.dtype.element_ty, bitcast=True)
        tl.store(base + D, lo, mask=lse_mask)
        tl.store(base + D + 1, hi, mask=lse_mask)


@triton.jit
def _tile(q, q2, k_base, k2_base, v_base, stride_ks, stride_k2s, stride_vs, n0, stop, q_pos, MASK, mask_row, MASK_LEN, slope, APOS,
          apos_row, kvp_rank, kvp, kv_block, scale, softcap, window, m_i, l_i, acc, d, d_mask, d2, d2_mask, dv, dv_mask,
          q_first, MASKED: tl.constexpr, HAS_MASK: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
          ALIBI: tl.constexpr, HAS_APOS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
          TAIL: tl.constexpr, V_FROM_K: tl.constexpr, CHUNK: tl.constexpr, KV_FP8: tl.constexpr):
    """One key tile [n0, n0 + BLOCK_N) of the online softmax. MASKED = False: every slot of the tile is below
    ``stop`` and visible to every row (no bounds, causal, window, chunk or key-mask test is needed; ``stop`` is below
    the ALiBi positions' length, so their load needs no bound either). ``q_first``: each row's chunk start (CHUNK).
    TAIL: the key's dims [BLOCK_D, D) are a second tile (q2 . k2). V_FROM_K: the values are the key tile's first
    BLOCK_D = DV dims (absorbed MLA), not loaded. KV_FP8: the key and value tiles are float8, converted to q's
    dtype (their scales are applied by the caller)."""
    slots = n0 + tl.arange(0, BLOCK_N)
    if MASKED:
        in_range = slots < stop
        k = tl.load(k_base + slots[None, :] * stride_ks + d[:, None], mask=in_range[None, :] & d_mask[:, None],
                    other=0.0)
    else:
        k = tl.load(k_base + slots[None, :] * stride_ks + d[:, None], mask=d_mask[:, None], other=0.0)
    if KV_FP8:
        k = k.to(q.dtype)
    if PRECISION == "tf32x3":
        s = tl.dot(q, k.to(tl.float32), input_precision="tf32x3")
    else:
        s = tl.dot(q, k)
    if TAIL:
        if MASKED:
            k2 = tl.load(k2_base + slots[None, :] * stride_k2s + d2[:, None],
                         mask=in_range[None, :] & d2_mask[:, None], other=0.0)
        else:
            k2 = tl.load(k2_base + slots[None, :] * stride_k2s + d2[:, None], mask=d2_mask[:, None], other=0.0)
        if KV_FP8:
            k2 = k2.to(q.dtype)
        if PRECISION == "tf32x3":
            s += tl.dot(q2, k2.to(tl.float32), input_precision="tf32x3")
        else:
            s += tl.dot(q2, k2)
    s = (s * scale).to(tl.float32)  # Inductor may pass Python floats as fp64 scalars
    if SOFTCAP:  # softcap * tanh(s / softcap), tanh(x) = 1 - 2 / (exp(2x) + 1)
        s = (softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))).to(tl.float32)
    if MASKED or ALIBI:
        key_pos = (slots // kv_block) * (kv_block * kvp) + kvp_rank * kv_block + slots % kv_block
    if ALIBI:  # slope * (a(key) - q_pos): a constant per row besides the key's (ALiBi) position
        if HAS_APOS:
            if MASKED:
                a = tl.load(APOS + apos_row + key_pos, mask=in_range, other=0)
            else:
                a = tl.load(APOS + apos_row + key_pos)
        else:
            a = key_pos
        s = s + slope[:, None] * (a.to(tl.float32)[None, :] - q_pos.to(tl.float32)[:, None])
    if MASKED:
        visible = in_range[None, :] & (key_pos[None, :] <= q_pos[:, None])
        if WINDOW:
            visible = visible & (q_pos[:, None] - key_pos[None, :] < window)
        if CHUNK:
            visible = visible & (key_pos[None, :] >= q_first[:, None])
        if HAS_MASK:
            allowed = tl.load(MASK + mask_row + key_pos, mask=in_range & (key_pos < MASK_LEN), other=0)
            visible = visible & (allowed != 0)[None, :]
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    if V_FROM_K:
        v = tl.trans(k)
    elif MASKED:
        v = tl.load(v_base + slots[:, None] * stride_vs + dv[None, :], mask=in_range[:, None] & dv_mask[None, :],
                    other=0.0)
    else:
        v = tl.load(v_base + slots[:, None] * stride_vs + dv[None, :], mask=dv_mask[None, :], other=0.0)
    if KV_FP8 and not V_FROM_K:
        v = v.to(q.dtype)
    if PRECISION == "tf32x3":
        pv = tl.dot(p, v.to(tl.float32), input_precision="tf32x3")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    l_i = l_i * alpha + tl.sum(p, axis=1)
    return m_new, l_i, acc


@triton.jit
def _attention(
    Q, K, K2, V, POS, MASK, SLOPES, APOS, LP, K_SCALE, V_SCALE, OUT, M_PART, L_PART, ACC_PART,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_ks,
    stride_k2b, stride_k2h, stride_k2s, k2_col,
    stride_vb, stride_vh, stride_vs,
    stride_mb, stride_ab,
    HQ, HK, LQ, GROUP, CAPACITY, MASK_LEN, APOS_LEN, ROW_BLOCKS, B,
    kvp_rank, kvp, kv_block, scale, softcap, window, chunk,
    D: tl.constexpr, DV: tl.constexpr,
    NUM_SPLITS: tl.constexpr, HAS_MASK: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
    ALIBI: tl.constexpr, HAS_APOS: tl.constexpr, CHUNK: tl.constexpr, LSE_ELEMS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
    BLOCK_DV: tl.constexpr, V_FROM_K: tl.constexpr, KV_FP8: tl.constexpr,
):
    pid = tl.program_id(0)  # (b, kh, row block)
    split = tl.program_id(1)
    rb = pid % ROW_BLOCKS
    kh = ((pid // ROW_BLOCKS) % HK).to(tl.int64)  # int64: a shard can exceed 2**31 elements
    b = (pid // (ROW_BLOCKS * HK)).to(tl.int64)
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < GROUP * LQ
    l_idx = r // GROUP
    head = kh * GROUP + r % GROUP
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    dv = tl.arange(0, BLOCK_DV)  # the value head dim (MLA: DV != D)
    dv_mask = dv < DV
    q_row = Q + b * stride_qb + head[:, None] * stride_qh + l_idx[:, None] * stride_ql
    q = tl.load(q_row + d[None, :], mask=r_mask[:, None] & d_mask[None, :], other=0.0)
    # a head dim that is no power of two, as absorbed MLA's 512 + 64: BLOCK_D = the largest power of two below D
    # and a second tile of BLOCK_D2 for the rest (instead of padding D to 1024)
    TAIL: tl.constexpr = BLOCK_D2 > 0
    d2 = tl.arange(0, BLOCK_D2 if BLOCK_D2 > 0 else 16)
    d2_mask = d2 < D - BLOCK_D
    q2 = q
    if TAIL:
        q2 = tl.load(q_row + BLOCK_D + d2[None, :], mask=r_mask[:, None] & d2_mask[None, :], other=0.0)
    if PRECISION == "tf32x3":
        q = q.to(tl.float32)
        q2 = q2.to(tl.float32)
    q_pos = tl.load(POS + l_idx, mask=r_mask, other=-1)
    slope = q_pos  # unused without ALiBi
    if ALIBI:
        slope = tl.load(SLOPES + head, mask=r_mask, other=0.0).to(tl.float32)
    # the slots [lo, hi) that some row of this program may see
    hi = _local_count(tl.max(q_pos) + 1, kvp_rank, kvp, kv_block)
    hi = tl.minimum(hi, CAPACITY)
    if HAS_MASK:
        hi = tl.minimum(hi, _local_count(MASK_LEN, kvp_rank, kvp, kv_block))
    if HAS_APOS:
        hi = tl.minimum(hi, _local_count(APOS_LEN, kvp_rank, kvp, kv_block))
    lo = 0
    if WINDOW:
        lowest = tl.min(tl.where(r_mask, q_pos, 2147483647))
        lo = _local_count(tl.maximum(lowest - window + 1, 0), kvp_rank, kvp, kv_block)
    q_first = q_pos  # unused without CHUNK
    if CHUNK:  # each row's chunk start t - (t - lp) mod chunk (a floor modulo: t < lp on padding rows)
        rel = (q_pos - tl.load(LP + b)) % chunk
        q_first = q_pos - tl.where(rel < 0, rel + chunk, rel)
        lo = tl.maximum(lo, _local_count(tl.maximum(tl.min(tl.where(r_mask, q_first, 2147483647)), 0), kvp_rank,
                                          kvp, kv_block))
    if NUM_SPLITS > 1:
        part = tl.cdiv(tl.maximum(hi - lo, 0), NUM_SPLITS * BLOCK_N) * BLOCK_N
        start = lo + split * part
        stop = tl.minimum(start + part, hi)
    else:
        start = lo
        stop = hi
    # [start, bulk): whole tiles that every row sees (below the lowest row's position; no window or key mask),
    # run without any mask; [bulk, stop): the masked tail (in decode, one partial tile)
    bulk = start
    if not WINDOW and not HAS_MASK and not CHUNK:
        seen_by_all = _local_count(tl.min(tl.where(r_mask, q_pos, 2147483647)) + 1, kvp_rank, kvp, kv_block)
        bulk = start + tl.maximum(tl.minimum(stop, seen_by_all) - start, 0) // BLOCK_N * BLOCK_N
    if KV_FP8:  # the head's key scale folded into the score scale
        scale = scale * tl.load(K_SCALE + kh)
    m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_DV), tl.float32)
    k_base = K + b * stride_kb + kh * stride_kh
    k2_base = K2 + b * stride_k2b + kh * stride_k2h + k2_col  # the key tail: k_rope, or K's own columns [BLOCK_D, D)
    v_base = V + b * stride_vb + kh * stride_vh
    mask_row = b * stride_mb
    apos_row = b * stride_ab
    for n0 in range(start, bulk, BLOCK_N):
        m_i, l_i, acc = _tile(q, q2, k_base, k2_base, v_base, stride_ks, stride_k2s, stride_vs, n0, stop, q_pos, MASK, mask_row, MASK_LEN,
                              slope, APOS, apos_row, kvp_rank, kvp, kv_block, scale, softcap, window, m_i, l_i, acc, d, d_mask, d2, d2_mask,
                              dv, dv_mask, q_first, False, HAS_MASK, SOFTCAP, WINDOW, ALIBI, HAS_APOS, PRECISION, BLOCK_N,
                              TAIL, V_FROM_K, CHUNK, KV_FP8)
    for n0 in range(bulk, stop, BLOCK_N):
        m_i, l_i, acc = _tile(q, q2, k_base, k2_base, v_base, stride_ks, stride_k2s, stride_vs, n0, stop, q_pos, MASK, mask_row, MASK_LEN,
                              slope, APOS, apos_row, kvp_rank, kvp, kv_block, scale, softcap, window, m_i, l_i, acc, d, d_mask, d2, d2_mask,
                              dv, dv_mask, q_first, True, HAS_MASK, SOFTCAP, WINDOW, ALIBI, HAS_APOS, PRECISION, BLOCK_N,
                              TAIL, V_FROM_K, CHUNK, KV_FP8)
    # packed output row of (head, b, l); partial buffers are indexed the same way
    out_row = (head * B + b) * LQ + l_idx
    if KV_FP8:  # the head's value scale, on the fp32 sum of p * v (splits combine linearly)
        acc = acc * tl.load(V_SCALE + kh)
    if NUM_SPLITS == 1:
        empty = l_i == 0.0
        o = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
        _store_packed(OUT, out_row, o, lse, DV, dv, dv_mask, r_mask, r_mask, LSE_ELEMS)
    else:
        part_row = out_row * NUM_SPLITS + split
        tl.store(M_PART + part_row, m_i, mask=r_mask)
        tl.store(L_PART + part_row, l_i, mask=r_mask)
        tl.store(ACC_PART + part_row[:, None] * BLOCK_DV + dv[None, :], acc, mask=r_mask[:, None] & dv_mask[None, :])


@triton.jit
def _combine(
    M_PART, L_PART, ACC_PART, OUT, D,
    NUM_SPLITS: tl.constexpr, LSE_ELEMS: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK_S: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DC: tl.constexpr,
):
    """Merge the NUM_SPLITS partial results of one row into the packed output, for the BLOCK_DC output columns of
    this program (axis 1): the peak and the total over all splits in one load (m and l: BLOCK_S >= NUM_SPLITS),
    then the weighted sum of the accumulators, CHUNK_S splits at a time (loads independent of each other, so they
    pipeline). The program of the first column block also writes the row's LSE."""
    row = tl.program_id(0)
    dc = tl.program_id(1)
    base = row.to(tl.int64) * NUM_SPLITS
    s_all = tl.arange(0, BLOCK_S)
    m_all = tl.load(M_PART + base + s_all, mask=s_all < NUM_SPLITS, other=float("-inf"))
    l_all = tl.load(L_PART + base + s_all, mask=s_all < NUM_SPLITS, other=0.0)
    top = tl.max(m_all, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(tl.exp(m_all - top) * l_all, axis=0)  # exp(-inf) = 0 for empty splits
    d = dc * BLOCK_DC + tl.arange(0, BLOCK_DC)
    d_mask = d < D
    c = tl.arange(0, CHUNK_S)
    acc = tl.zeros((BLOCK_DC,), tl.float32)
    for s0 in range(0, NUM_SPLITS, CHUNK_S):
        inside = s0 + c < NUM_SPLITS
        w = tl.exp(tl.load(M_PART + base + s0 + c, mask=inside, other=float("-inf")) - top)
        a = tl.load(ACC_PART + (base + s0 + c)[:, None] * BLOCK_D + d[None, :], mask=inside[:, None] & d_mask[None, :],
                    other=0.0)
        acc += tl.sum(w[:, None] * a, axis=0)
    empty = total == 0.0
    o = acc / tl.where(empty, 1.0, total)
    lse = tl.where(empty, float("-inf"), top + tl.log(tl.where(empty, 1.0, total)))
    one = tl.arange(0, 1)
    _store_packed(OUT, row + one, o[None, :], lse + tl.zeros((1,), tl.float32), D, d, d_mask, one < 1,
                  one + dc < 1, LSE_ELEMS)


# Triton's CPU interpreter (3.9) multiplies 16-bit dot operands wrongly; there the kernel takes its fp32 path.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _sm_count(device_index) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch_config(batch: int, hk: int, group: int, length, capacity: int, sms: int, dtype, width: int = 256):
    """(BLOCK_R, BLOCK_N, NUM_SPLITS, num_warps, num_stages) for one call.

    Decode (one query position) packs the group's heads into one row block and splits the keys so that about
    two programs run per SM, each over 512 slots or more, with at most one split per SM; prefill takes 128-row
    blocks (64 in fp32) (enough programs already) and no split. A prefill length is symbolic under dynamic shapes: only ``length == 1`` is
    asked of it, which needs no guard. ``width`` = the key and value columns one key tile loads: heads wider than 512
    (absorbed MLA: 512 + 64 key columns, the values the first 512 of them) get key tiles of at most 64 KB per stage
    and 32-row prefill blocks, so that a program fits the shared memory and registers.
    """
    most = max(16, triton.next_power_of_2(65536 // (width * dtype.itemsize) + 1) // 2)  # key tiles <= 64 KB
    if length == 1:
        block_r = max(16, min(64, triton.next_power_of_2(group)))
        programs = batch * hk * triton.cdiv(group, block_r)
        # at most one split per SM: at batch 1 with one KV head (32 rows per program), 264 splits ran 49.7 us
        # against 47.8 us for 128 at 256K slots, the combine growing with the splits (one H200:
        # results/perf/attention-bench-2026-11-29-h200-mla-alibi-k1b1.json, rows k1-b1-sweep)
        splits = max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(capacity, 512), sms))
        # measured on one H200 (results/perf/attention-ab-2026-11-29-h200.json, the k1_grid launch-configuration
        # grids, and the k1-b1-sweep rows above): 128-key tiles pay when 32+ rows share a KV head
        # and either 64+ programs fill the SMs (MQA at batch 64: 91% of HBM against 68% with 64) or all programs
        # and splits fit in one wave (MQA at batch 1, 256K: 73% against 66%); 4 stages without splits
        one_wave = programs * splits <= sms
        block_n = 32 if dtype.itemsize == 4 else 128 if block_r >= 32 and (programs >= 64 or one_wave) else 64
        if width > 512:
            return block_r, min(block_n, most), splits, 4, 2
        return block_r, block_n, splits, 4, 3 if splits > 1 else 4
    if width > 512:
        return 32, min(64, most), 1, 4, 2
    if dtype.itemsize < 4:  # head dim 256 (512 key and value columns): 3 stages need 257 KB of shared memory
        return 128, 64, 1, 8, 3 if width < 512 else 2
    return 64, 32, 1, 4, 2


def head_dim_tiles(d: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_D2): a head dim that is a power of two is one tile; otherwise the largest power of two below
    it and a second, smaller tile for the rest when that pads less (576 = 512 + 64, 96 = 64 + 32, 80 = 64 + 16)."""
    whole = max(16, triton.next_power_of_2(d))
    main = 1 << (d.bit_length() - 1)
    if main == d or main < 16:
        return whole, 0
    tail = max(16, triton.next_power_of_2(d - main))
    return (main, tail) if main + tail < whole else (whole, 0)


def partial_attention(q, k_shard, v_shard, pos, kvp_rank, kvp, kv_block, scale, softcap=0.0, window=0, key_mask=None,
                      config=None, alibi_slopes=None, alibi_pos=None, k_rope=None, chunk=0, k_scale=None, v_scale=None):
    """Same contract as ``ops.partial_attention`` (packed (Hq, B, L, D + e) output). Called inside the op's
    ``triton_op`` body, so under Inductor the two kernels are emitted into the generated code."""
    fp8 = k_scale is not None
    if fp8 and (v_scale is None or k_rope is not None):
        raise ValueError("partial_attention: FP8 shards take both k_scale and v_scale, and no k_rope")
    b, hq, length, d = q.shape
    hk, capacity = k_shard.shape[1], k_shard.shape[2] - 1
    group = hq // hk
    if q.stride(-1) != 1:
        q = q.contiguous()
    values_are_keys = v_shard is k_shard  # absorbed MLA passes the latent as both
    k, v = k_shard, v_shard
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
        if values_are_keys:
            v = k
    sms = _sm_count(q.device.index) if q.is_cuda else 8
    e = lse_elems(q.dtype)
    dv = v_shard.shape[-1]  # MLA: the value head dim differs from the query/key one
    if k_rope is not None:  # the keys' second part, where it is cached: the tail tile reads it
        dk = k_shard.shape[-1]
        if dk != triton.next_power_of_2(dk) or dk < 16 or dk + k_rope.shape[-1] != d:
            raise ValueError(f"k_rope: the keys' first part must be a power of two >= 16 wide and the two parts "
                             f"{dk} + {k_rope.shape[-1]} must make the query's {d}")
        k2 = k_rope if k_rope.stride(-1) == 1 else k_rope.contiguous()
        block_d, block_d2 = dk, max(16, triton.next_power_of_2(d - dk))
    else:
        k2 = k  # the tail (if any) is the same tensor at column BLOCK_D
        block_d, block_d2 = head_dim_tiles(d)
    block_dv = max(16, triton.next_power_of_2(dv))
    # values read from the key tile already loaded: the same tensor, and the whole first key tile is the value
    v_from_k = values_are_keys and dv == block_d and (block_d2 > 0 or dv == d)
    width = block_d + block_d2 + (0 if v_from_k else block_dv)
    block_r, block_n, splits, warps, stages = config or launch_config(b, hk, group, length, capacity, sms, q.dtype,
                                                                      width)
    out = torch.empty((hq, b, length, dv + e), device=q.device, dtype=q.dtype)
    rows = hq * b * length
    if splits > 1:
        m = torch.empty((rows * splits,), device=q.device, dtype=torch.float32)
        l_sum = torch.empty_like(m)
        acc = torch.empty((rows * splits * block_dv,), device=q.device, dtype=torch.float32)
    else:
        m = l_sum = acc = out  # unused
    mask = key_mask if key_mask is not None else pos
    slopes = alibi_slopes.float().contiguous() if alibi_slopes is not None else pos  # pos: an unused pointer
    apos = alibi_pos.contiguous() if alibi_pos is not None else pos
    lp = pos  # an unused pointer without chunks
    if chunk > 0:  # each row's left padding: its chunks start at its first real token
        lp = (left_padding(key_mask) if key_mask is not None else torch.zeros(b, dtype=torch.int64, device=q.device))
        lp = lp.to(pos.dtype).contiguous()
    k_scales = k_scale.float().contiguous() if fp8 else pos  # pos: an unused pointer
    v_scales = v_scale.float().contiguous() if fp8 else pos
    row_blocks = triton.cdiv(group * length, block_r)
    wrap_triton(_attention)[(b * hk * row_blocks, splits)](
        q, k, k2, v, pos, mask, slopes, apos, lp, k_scales, v_scales, out, m, l_sum, acc,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        k2.stride(0), k2.stride(1), k2.stride(2), 0 if k_rope is not None else block_d,
        v.stride(0), v.stride(1), v.stride(2),
        mask.stride(0) if key_mask is not None else 0, apos.stride(0) if alibi_pos is not None else 0,
        hq, hk, length, group, capacity, key_mask.shape[1] if key_mask is not None else 0,
        alibi_pos.shape[1] if alibi_pos is not None else 0, row_blocks, b,
        kvp_rank, kvp, kv_block, scale, softcap, window, chunk, D=d, DV=dv,
        NUM_SPLITS=splits, HAS_MASK=key_mask is not None, SOFTCAP=softcap > 0, WINDOW=window > 0,
        ALIBI=alibi_slopes is not None, HAS_APOS=alibi_pos is not None, CHUNK=chunk > 0,
        LSE_ELEMS=e, PRECISION="tf32x3" if q.dtype == torch.float32 or _INTERPRETED else "native",
        BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_D2=block_d2, BLOCK_DV=block_dv, V_FROM_K=v_from_k,
        KV_FP8=fp8, num_warps=warps, num_stages=stages,
    )
    if splits > 1:
        block_dc = min(block_dv, 64)  # column blocks: at batch 1 the rows alone leave most SMs idle
        wrap_triton(_combine)[(rows, triton.cdiv(dv, block_dc))](
            m, l_sum, acc, out, dv, NUM_SPLITS=splits, LSE_ELEMS=e, BLOCK_S=max(16, triton.next_power_of_2(splits)),
            CHUNK_S=32, BLOCK_D=block_dv, BLOCK_DC=block_dc, num_warps=4,
        )
    return out
