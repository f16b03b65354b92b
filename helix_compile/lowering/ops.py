"""Helix ops (``torch.library``): what the partitioned program calls, and how each one lowers.

Global ops (what the user-visible program calls; the partition pass replaces them):
    helix::kv_write(keys, values, k, v, pos)                      write new K/V at global positions ``pos``
    helix::grouped_mm(input, weight, offs)                        ``torch._grouped_mm(input, weight, offs=offs)``
        where ``weight`` is a virtual (stride-0, ``shards.py``) expert weight, which ``_grouped_mm``'s stride check
        refuses while tracing: transformers' grouped_mm experts reach it through ``shards.route_virtual_experts``;
        the MoE rewrite turns it back into ``torch._grouped_mm`` over the rank's contiguous shard.

Rank-local ops (what the partitioned program calls):
    helix::kv_write_local(k_shard, v_shard, k, v, pos, kvp_rank, kvp, kv_block)
        owner-only write: position p goes to slot (p // kv_block // kvp) * kv_block + p % kv_block of the rank
        with kvp_rank == (p // kv_block) % kvp; every other rank writes it to its spare last slot (never read),
        so the op needs no data-dependent shapes and no host sync.
    helix::kv_write_local_fp8(k_shard, v_shard, k_scale, v_scale, k, v, pos, kvp_rank, kvp, kv_block)
        the same write into float8_e4m3fn shards: a scale still 0 (the first write after a reset) becomes
        ``fp8_scale`` of this call's keys (values), then each element is stored as x / scale clamped to +-448.
    helix::partial_attention(q, k_shard, v_shard, pos, kvp_rank, kvp, kv_block, scale,
                             softcap=0.0, window=0, key_mask=None, alibi_slopes=None, alibi_pos=None,
                             k_rope=None, chunk=0, k_scale=None, v_scale=None) -> packed
        attention of the local query heads over the local keys. Key at global position p is visible to the query
        at position t when p <= t, and t - p < window (window > 0: sliding window), and key_mask[b, p] != 0
        (key_mask given: the 2-D HF attention mask over global positions; p >= its length is not visible), and
        p >= t - (t - lp[b]) mod chunk (chunk > 0: Llama 4's chunked attention, a query sees the keys of its own
        chunk of positions only; lp[b] = the leading zeros of key_mask[b], its left padding, 0 without key_mask:
        chunks start at the row's first real token, as transformers' ``chunked_overlay`` counts them).
        Scores are q.k * scale, then softcap * tanh(score / softcap) when softcap > 0 (Gemma 2), then
        + alibi_slopes[h] * (a(b, p) - t) when alibi_slopes (fp32, one per local query head h) is given: ALiBi,
        with a(b, p) = p, or alibi_pos[b, p] when alibi_pos (B, S_m) is given (BLOOM's position among the
        unmasked keys, (cumsum(mask) - 1) * mask; p >= S_m is never visible there). The query's own position t
        is a constant per row, which softmax ignores: it keeps the scores small, and every rank subtracts the
        same t, so the LSEs merge exactly. k_rope (B, Hk, S + 1, Dr), when given, is the keys' second part: the
        keys are cat([k_shard, k_rope], -1) and q has D + Dr dims (absorbed MLA: the latent and the rotary key
        are read where they are cached, with no per-step concatenation; passing the latent as v_shard too lets the
        kernel read it once). k_scale, v_scale (fp32, (Hk,)), when given: the shards are float8_e4m3fn and key
        (value) element e of KV head h stands for e * k_scale[h] (v_scale[h]); dequantised while loading, the
        products accumulated in fp32 (not with k_rope).
        Returns ``packed`` of shape (Hq_local, B, L, D + e): the output o_r in q's dtype with its natural-log
        LSE (fp32, bit-cast into the last e = 4 / itemsize elements). Head-major so that the all-to-all over
        query heads splits dim 0. A row with no visible key has lse = -inf and o = 0.
    helix::lse_merge(recv, kvp, head_dim) -> o
        recv (kvp * Hn, B, L, D + e), the partials of this rank's Hn heads from every KVP rank;
        lse = logsumexp_r(lse_r), o = sum_r exp(lse_r - lse) * o_r in fp32; all -inf -> 0. Returns (B, Hn, L, D).

Lowering (no Python of ours runs per step under Inductor):
    partial_attention is a ``triton_op``: under Inductor its body is traced, so on CUDA the Triton kernels of
        ``triton_attention.py`` appear in the generated code (and in its CUDA graph), and on CPU the reference
        torch math below becomes Inductor C++. The eager executor calls the same body directly.
    kv_write_local and lse_merge are CompositeImplicitAutograd: AOTAutograd decomposes them into aten ops that
        Inductor fuses (the KV write becomes an in-place index_put into the cache shard, as in gpt-fast).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.library import Library, custom_op, triton_op

from .common import left_padding, lse_elems, pack_lse  # noqa: F401  (lse_elems, pack_lse: re-exported)
from . import prefill
from .common import lse_dtype as _lse_dtype


class ShardedEagerError(RuntimeError):
    pass


# -- global op ------------------------------------------------------------------------------------------------
@custom_op("helix::kv_write", mutates_args=("keys", "values"))
def kv_write(keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
    raise ShardedEagerError(
        f"this helix StaticCache keeps its {tuple(keys.shape)} keys/values in rank-local shards; the model "
        f"cannot run eagerly on it. Call it through torch.compile(model, backend='helix', "
        f"options={{'layout': layout}})"
    )


@kv_write.register_fake
def _(keys, values, k, v, pos):
    return None


@custom_op("helix::grouped_mm", mutates_args=())
def grouped_mm(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    raise ShardedEagerError(
        f"these {tuple(weight.shape)} expert weights are held in rank-local shards (helix_compile.from_pretrained); "
        f"they cannot run eagerly. Call the model through torch.compile(model, backend='helix', "
        f"options={{'layout': layout}})"
    )


@grouped_mm.register_fake
def _(input, weight, offs):
    return input.new_empty(input.shape[0], weight.shape[-1])


# -- KV ownership -----------------------------------------------------------------------------------------------
def local_slots(pos: torch.Tensor, kvp_rank: int, kvp: int, kv_block: int, capacity: int) -> torch.Tensor:
    """Local slot of every global position; ``capacity`` (the spare slot) where this rank is not the owner."""
    block = torch.div(pos, kv_block, rounding_mode="floor")
    slot = torch.div(block, kvp, rounding_mode="floor") * kv_block + pos % kv_block
    return torch.where(block % kvp == kvp_rank, slot, torch.full_like(slot, capacity))


def slot_positions(capacity: int, kvp_rank: int, kvp: int, kv_block: int, device) -> torch.Tensor:
    """Global position held by each local slot ``0 .. capacity-1``."""
    s = torch.arange(capacity, device=device)
    return torch.div(s, kv_block, rounding_mode="floor") * (kv_block * kvp) + kvp_rank * kv_block + s % kv_block


# -- rank-local ops: composite (decomposed into aten ops that Inductor fuses) ------------------------------------
_lib = Library("helix", "FRAGMENT")
_lib.define(
    "kv_write_local(Tensor(a!) k_shard, Tensor(b!) v_shard, Tensor k, Tensor v, Tensor pos, int kvp_rank, int kvp, "
    "int kv_block) -> ()"
)
_lib.define(
    "kv_write_local_fp8(Tensor(a!) k_shard, Tensor(b!) v_shard, Tensor(c!) k_scale, Tensor(d!) v_scale, Tensor k, "
    "Tensor v, Tensor pos, int kvp_rank, int kvp, int kv_block) -> ()"
)
_lib.define("lse_merge(Tensor recv, int kvp, int head_dim) -> Tensor")


@torch.library.impl(_lib, "kv_write_local", "CompositeImplicitAutograd")
def kv_write_local(k_shard, v_shard, k, v, pos, kvp_rank, kvp, kv_block):
    slots = local_slots(pos, kvp_rank, kvp, kv_block, k_shard.shape[2] - 1)
    k_shard.index_copy_(2, slots, k.to(k_shard.dtype))
    v_shard.index_copy_(2, slots, v.to(v_shard.dtype))


# -- FP8 KV cache -------------------------------------------------------------------------------------------------
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
FP8_HEADROOM = 2.0  # a scale leaves room for values up to twice the first write's largest (cache.py)


def fp8_scale(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(H,) fp32: ``scale`` where set (!= 0), else amax(|x|) over x's batch rows, positions and dims of each head
    (x: (B, H, L, D)) / FP8_MAX * FP8_HEADROOM. Stays 0 for a head whose x is all zero (the next write sets it)."""
    new = x.abs().amax(dim=(0, 2, 3)).float() / FP8_MAX * FP8_HEADROOM
    return torch.where(scale == 0, new, scale)


def fp8_quantise(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, D) as float8_e4m3fn elements of x / scale[h], clamped to +-FP8_MAX (a scale of 0, x all zero
    there: divides by 1)."""
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (x.float() / safe[None, :, None, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def fp8_dequantise(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 x[b, h] * scale[h] of an fp8 (B, H, S, D) tensor."""
    return x.float() * scale.float()[None, :, None, None]


@torch.library.impl(_lib, "kv_write_local_fp8", "CompositeImplicitAutograd")
def kv_write_local_fp8(k_shard, v_shard, k_scale, v_scale, k, v, pos, kvp_rank, kvp, kv_block):
    slots = local_slots(pos, kvp_rank, kvp, kv_block, k_shard.shape[2] - 1)
    for shard, scale, x in ((k_shard, k_scale, k), (v_shard, v_scale, v)):
        now = fp8_scale(x, scale)
        scale.copy_(now)
        # through a uint8 view: index_copy_ has no float8 kernel on every device; the bytes are the same
        shard.view(torch.uint8).index_copy_(2, slots, fp8_quantise(x, now).view(torch.uint8))


@torch.library.impl(_lib, "lse_merge", "CompositeImplicitAutograd")
def lse_merge(recv, kvp, head_dim):
    rows, b, length, _ = recv.shape
    parts = recv.reshape(kvp, rows // kvp, b, length, -1)
    o = parts[..., :head_dim].float()
    lse = parts[..., head_dim:].contiguous().view(_lse_dtype(recv.dtype)).squeeze(-1).float()
    peak = lse.amax(dim=0)
    peak = torch.where(torch.isinf(peak), torch.zeros_like(peak), peak)
    weight = torch.exp(lse - peak)  # exactly 0 for a rank that saw no key
    total = weight.sum(dim=0)
    merged = (weight.unsqueeze(-1) * o).sum(dim=0) / torch.where(total == 0, torch.ones_like(total), total).unsqueeze(-1)
    return merged.permute(1, 0, 2, 3).to(recv.dtype).contiguous()


# -- rank-local ops: partial attention ---------------------------------------------------------------------------
@triton_op("helix::partial_attention", mutates_args=())
def partial_attention(
    q: torch.Tensor,
    k_shard: torch.Tensor,
    v_shard: torch.Tensor,
    pos: torch.Tensor,
    kvp_rank: int,
    kvp: int,
    kv_block: int,
    scale: float,
    softcap: float = 0.0,
    window: int = 0,
    key_mask: Optional[torch.Tensor] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    alibi_pos: Optional[torch.Tensor] = None,
    k_rope: Optional[torch.Tensor] = None,
    chunk: int = 0,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    if q.device.type == "cuda":
        if q.shape[2] != 1 and prefill.eligible(q, k_shard, v_shard, kvp, softcap, window, alibi_slopes, alibi_pos,
                                                 k_rope, chunk):
            return torch.ops.helix.prefill_attention(q, k_shard, v_shard, pos, scale, key_mask)
        from .triton_attention import partial_attention as triton_partial_attention

        return triton_partial_attention(q, k_shard, v_shard, pos, kvp_rank, kvp, kv_block, scale, softcap, window, key_mask,
                                        alibi_slopes=alibi_slopes, alibi_pos=alibi_pos, k_rope=k_rope, chunk=chunk,
                                        k_scale=k_scale, v_scale=v_scale)
    return partial_attention_reference(q, k_shard, v_shard, pos, kvp_rank, kvp, kv_block, scale, softcap, window, key_mask,
                                       alibi_slopes, alibi_pos, k_rope=k_rope, chunk=chunk, k_scale=k_scale,
                                       v_scale=v_scale)


def chunk_start(pos, chunk, key_mask=None):
    """(B or 1, L): the first global position of the chunk of the query at ``pos[l]`` (chunks of ``chunk``
    positions counted from the row's left padding: t - (t - lp[b]) mod chunk, a floor modulo)."""
    lp = left_padding(key_mask) if key_mask is not None else torch.zeros(1, dtype=pos.dtype, device=pos.device)
    t = pos[None, :]
    return t - torch.remainder(t - lp[:, None].to(pos.dtype), chunk)


def visible_keys(pos, key_pos, window=0, key_mask=None, chunk=0):
    """(B or 1, L, S) bool: key at global ``key_pos[s]`` visible to the query at ``pos[l]`` (see the module doc)."""
    seen = key_pos[None, None, :] <= pos[None, :, None]
    if window > 0:
        seen = seen & (pos[None, :, None] - key_pos[None, None, :] < window)
    if chunk > 0:
        seen = seen & (key_pos[None, None, :] >= chunk_start(pos, chunk, key_mask)[:, :, None])
    if key_mask is not None:
        inside = key_pos < key_mask.shape[1]
        allowed = key_mask.gather(1, key_pos.clamp(max=key_mask.shape[1] - 1).expand(key_mask.shape[0], -1)) != 0
        seen = seen & (allowed & inside)[:, None, :]
    return seen


def alibi_bias(slopes, pos, key_pos, alibi_pos=None):
    """(B or 1, H, L, S) fp32: slopes[h] * (a(b, key) - pos[l]), a = the key's global position or alibi_pos[b, .]."""
    if alibi_pos is not None:
        a = alibi_pos.gather(1, key_pos.clamp(max=alibi_pos.shape[1] - 1).expand(alibi_pos.shape[0], -1)).float()
    else:
        a = key_pos.float()[None]
    rel = a[:, None, :] - pos.float()[None, :, None]  # (B or 1, L, S)
    return slopes.float()[None, :, None, None] * rel[:, None]


def partial_attention_reference(q, k_shard, v_shard, pos, kvp_rank, kvp, kv_block, scale, softcap=0.0, window=0,
                                key_mask=None, alibi_slopes=None, alibi_pos=None, k_rope=None, chunk=0, k_scale=None,
                                v_scale=None):
    """Reference (any device): scores in fp32 over the whole local shard, masked by global position; FP8 shards
    dequantised to fp32 (``k_scale`` / ``v_scale``)."""
    b, hq, length, d = q.shape
    hk = k_shard.shape[1]
    capacity = k_shard.shape[2] - 1
    if k_rope is not None:
        if k_scale is not None:
            raise ValueError("partial_attention: FP8 keys (k_scale) in two parts (k_rope) are not supported")
        k_shard = torch.cat([k_shard, k_rope], dim=-1)
    k = k_shard[:, :, :capacity].float()
    v = v_shard[:, :, :capacity].float()
    if k_scale is not None:
        k = fp8_dequantise(k, k_scale)
    if v_scale is not None:
        v = fp8_dequantise(v, v_scale)
    qf = q.float().reshape(b, hk, hq // hk, length, d)  # query head h reads KV head h // (hq / hk)
    scores = torch.einsum("bkgld,bksd->bkgls", qf, k) * scale
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    key_pos = slot_positions(capacity, kvp_rank, kvp, kv_block, q.device)
    if alibi_slopes is not None:
        bias = alibi_bias(alibi_slopes, pos, key_pos, alibi_pos)  # (B or 1, Hq, L, S)
        scores = scores + bias.reshape(bias.shape[0], hk, hq // hk, length, capacity)
    visible = visible_keys(pos, key_pos, window, key_mask, chunk)
    if alibi_slopes is not None and alibi_pos is not None:
        visible = visible & (key_pos < alibi_pos.shape[1])[None, None, :]
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    o = torch.einsum("bkgls,bksd->bkgld", torch.exp(scores - finite[..., None]), v)
    o = o.reshape(b, hq, length, v.shape[-1]).permute(1, 0, 2, 3)
    lse = lse.reshape(b, hq, length).permute(1, 0, 2).to(_lse_dtype(q.dtype))
    return torch.cat([o.to(q.dtype), pack_lse(lse, q.dtype)], dim=-1)
