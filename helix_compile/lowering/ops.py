"""Helix custom ops (``torch.library``): fake implementations for tracing and a reference torch implementation.

On CUDA, partial_attention runs the Triton split-S kernel of ``triton_attention.py`` for queries of up to
TRITON_MAX_QUERY positions (decode), the reference otherwise.

Global op (what the user-visible program calls; the partition pass replaces it):
    helix::kv_write(keys, values, k, v, pos)                      write new K/V at global positions ``pos``

Rank-local ops (what the partitioned program calls):
    helix::kv_write_local(k_shard, v_shard, k, v, pos, kvp_rank, kvp, kv_block)
        owner-only write: position p goes to slot (p // kv_block // kvp) * kv_block + p % kv_block of the rank
        with kvp_rank == (p // kv_block) % kvp; every other rank writes it to its spare last slot (never read),
        so the op needs no data-dependent shapes and no host sync.
    helix::partial_attention(q, k_shard, v_shard, pos, kvp_rank, kvp, kv_block, scale) -> packed
        attention of the local query heads over the local keys, masked causally by *global* positions. Returns
        ``packed`` of shape (Hq_local, B, L, D + e): the output o_r in q's dtype with its natural-log LSE
        (fp32, bit-cast into the last e = 4 / itemsize elements). Head-major so that the all-to-all over query
        heads splits dim 0. A row with no visible key has lse = -inf and o = 0.
    helix::lse_merge(recv, kvp, head_dim) -> o
        recv (kvp * Hn, B, L, D + e), the partials of this rank's Hn heads from every KVP rank;
        lse = logsumexp_r(lse_r), o = sum_r exp(lse_r - lse) * o_r in fp32; all -inf -> 0. Returns (B, Hn, L, D).
"""

from __future__ import annotations

import torch
from torch.library import custom_op


class ShardedEagerError(RuntimeError):
    pass


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype.itemsize <= 4 else dtype


def lse_elems(dtype: torch.dtype) -> int:
    """Elements of ``dtype`` that hold one LSE value in the packed partial-attention output."""
    return _lse_dtype(dtype).itemsize // dtype.itemsize


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


# -- rank-local ops -------------------------------------------------------------------------------------------
def local_slots(pos: torch.Tensor, kvp_rank: int, kvp: int, kv_block: int, capacity: int) -> torch.Tensor:
    """Local slot of every global position; ``capacity`` (the spare slot) where this rank is not the owner."""
    block = torch.div(pos, kv_block, rounding_mode="floor")
    slot = torch.div(block, kvp, rounding_mode="floor") * kv_block + pos % kv_block
    return torch.where(block % kvp == kvp_rank, slot, torch.full_like(slot, capacity))


def slot_positions(capacity: int, kvp_rank: int, kvp: int, kv_block: int, device) -> torch.Tensor:
    """Global position held by each local slot ``0 .. capacity-1``."""
    s = torch.arange(capacity, device=device)
    return torch.div(s, kv_block, rounding_mode="floor") * (kv_block * kvp) + kvp_rank * kv_block + s % kv_block


@custom_op("helix::kv_write_local", mutates_args=("k_shard", "v_shard"))
def kv_write_local(
    k_shard: torch.Tensor,
    v_shard: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos: torch.Tensor,
    kvp_rank: int,
    kvp: int,
    kv_block: int,
) -> None:
    slots = local_slots(pos, kvp_rank, kvp, kv_block, k_shard.shape[2] - 1)
    k_shard.index_copy_(2, slots, k.to(k_shard.dtype))
    v_shard.index_copy_(2, slots, v.to(v_shard.dtype))


@kv_write_local.register_fake
def _(k_shard, v_shard, k, v, pos, kvp_rank, kvp, kv_block):
    return None


@custom_op("helix::partial_attention", mutates_args=())
def partial_attention(
    q: torch.Tensor,
    k_shard: torch.Tensor,
    v_shard: torch.Tensor,
    pos: torch.Tensor,
    kvp_rank: int,
    kvp: int,
    kv_block: int,
    scale: float,
) -> torch.Tensor:
    return partial_attention_reference(q, k_shard, v_shard, pos, kvp_rank, kvp, kv_block, scale)


TRITON_MAX_QUERY = 16  # the split-S kernel re-reads the shard per query row: decode and short chunks only


@partial_attention.register_kernel("cuda")
def _(q, k_shard, v_shard, pos, kvp_rank, kvp, kv_block, scale):
    if q.shape[2] <= TRITON_MAX_QUERY:
        from .triton_attention import partial_attention as triton_partial_attention

        return triton_partial_attention(q, k_shard, v_shard, pos, kvp_rank, kvp, kv_block, scale)
    return partial_attention_reference(q, k_shard, v_shard, pos, kvp_rank, kvp, kv_block, scale)


def partial_attention_reference(q, k_shard, v_shard, pos, kvp_rank, kvp, kv_block, scale):
    """Reference (any device): scores in fp32 over the whole local shard, masked by global position."""
    b, hq, length, d = q.shape
    hk = k_shard.shape[1]
    capacity = k_shard.shape[2] - 1
    k = k_shard[:, :, :capacity].float()
    v = v_shard[:, :, :capacity].float()
    qf = q.float().reshape(b, hk, hq // hk, length, d)  # query head h reads KV head h // (hq / hk)
    scores = torch.einsum("bkgld,bksd->bkgls", qf, k) * scale
    visible = slot_positions(capacity, kvp_rank, kvp, kv_block, q.device)[None, :] <= pos[:, None]  # (L, S_local)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    o = torch.einsum("bkgls,bksd->bkgld", torch.exp(scores - finite[..., None]), v)
    o = o.reshape(b, hq, length, v.shape[-1]).permute(1, 0, 2, 3)
    lse = lse.reshape(b, hq, length).permute(1, 0, 2).to(_lse_dtype(q.dtype))
    return torch.cat([o.to(q.dtype), lse.unsqueeze(-1).contiguous().view(q.dtype)], dim=-1)


@partial_attention.register_fake
def _(q, k_shard, v_shard, pos, kvp_rank, kvp, kv_block, scale):
    b, hq, length, _ = q.shape
    return q.new_empty((hq, b, length, v_shard.shape[-1] + lse_elems(q.dtype)))


@custom_op("helix::lse_merge", mutates_args=())
def lse_merge(recv: torch.Tensor, kvp: int, head_dim: int) -> torch.Tensor:
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


@lse_merge.register_fake
def _(recv, kvp, head_dim):
    rows, b, length, _ = recv.shape
    return recv.new_empty((b, rows // kvp, length, head_dim))
