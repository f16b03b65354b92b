"""Global-shaped *virtual* tensors whose real data lives in rank-local shards.

The user-visible model and cache keep their single-device (global) shapes so that Dynamo traces the unmodified
HF program; each rank stores only its shards. A virtual tensor is a stride-0 view of a one-element storage filled
with NaN: Dynamo traces it like any tensor, it costs no memory, and an accidental eager read yields NaN rather
than plausible garbage. The compiled program never reads it: the backend swaps in the registered shard.
An op whose meta function checks strides must not see one while Dynamo traces: ``route_virtual_experts`` sends
the virtual expert weights of transformers' ``grouped_mm`` experts to ``helix::grouped_mm`` instead of
``torch._grouped_mm``.

The registry maps a tensor (by identity, weakly) to its shards, one per shard spec: ``{spec: local tensor}``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.utils.weak import WeakIdKeyDictionary


@dataclasses.dataclass(frozen=True)
class Shard:
    """Rank-local piece ``tensor.narrow(dim, start, stop - start)`` of a global tensor."""

    dim: int
    start: int
    stop: int

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.narrow(self.dim, self.start, self.stop - self.start)

    def indices(self, shape) -> list[tuple]:
        """Index tuples whose pieces, concatenated along ``dim``, make this shard (one for a plain narrow)."""
        return [tuple(slice(self.start, self.stop) if d == self.dim else slice(None) for d in range(len(shape)))]


@dataclasses.dataclass(frozen=True)
class ExpertShard:
    """Rank-local piece of a fused 3-D expert tensor (experts first): experts ``[e_start, e_stop)`` on dim 0 and,
    on ``dim``, rows ``[start, stop)`` of each of its ``parts`` equal parts, concatenated.

    ``gate_up_proj`` (E, 2I, H) packs gate and up along dim 1 (parts=2): a TPF rank's slice keeps the same
    columns of both halves, so the model's own ``chunk(2, dim=-1)`` still splits gate from up.
    """

    e_start: int
    e_stop: int
    dim: int
    start: int
    stop: int
    parts: int = 1

    def indices(self, shape) -> list[tuple]:
        size = shape[self.dim] // self.parts
        out = []
        for p in range(self.parts):
            index = [slice(None)] * len(shape)
            index[0] = slice(self.e_start, self.e_stop)
            index[self.dim] = slice(p * size + self.start, p * size + self.stop)
            out.append(tuple(index))
        return out

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor[index] for index in self.indices(tensor.shape)], dim=self.dim)


_SHARDS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def virtual(shape, dtype: torch.dtype, device=None) -> torch.Tensor:
    """A global-shaped tensor with no data of its own (one NaN element, every stride 0)."""
    route_virtual_experts()
    base = torch.full((1,), float("nan"), dtype=dtype, device=device) if dtype.is_floating_point else torch.zeros(
        1, dtype=dtype, device=device
    )
    return base.as_strided(tuple(shape), (0,) * len(shape))


def is_virtual(tensor: torch.Tensor) -> bool:
    return tensor.numel() > 1 and all(s == 0 for s in tensor.stride())


def register(tensor: torch.Tensor, key, local: torch.Tensor) -> None:
    """Record that ``local`` is this rank's piece of ``tensor`` under ``key`` (a Shard spec or any hashable)."""
    _SHARDS.setdefault(tensor, {})[key] = local


def lookup(tensor: torch.Tensor, key):
    """This rank's piece of ``tensor`` under ``key``, or None."""
    entry = _SHARDS.get(tensor)
    return None if entry is None else entry.get(key)


def keys_of(tensor: torch.Tensor) -> list:
    entry = _SHARDS.get(tensor)
    return [] if entry is None else list(entry)


def local_piece(tensor: torch.Tensor, spec: Shard, what: str) -> torch.Tensor:
    """The rank-local tensor the compiled program reads in place of ``tensor``.

    A registered shard wins; a real (materialised) tensor is sliced once and the slice registered; a virtual
    tensor without a shard for ``spec`` is an error naming what is held.
    """
    found = lookup(tensor, spec)
    if found is not None:
        return found
    if is_virtual(tensor):
        raise RuntimeError(
            f"{what}: this rank holds shards {keys_of(tensor)} of the global {tuple(tensor.shape)} tensor, but the "
            f"compiled layout needs {spec}; load the model with the same Layout you compile with"
        )
    piece = spec.take(tensor).contiguous()
    register(tensor, spec, piece)
    return piece


def route_virtual_experts() -> None:
    """Let transformers' ``grouped_mm`` experts implementation trace over virtual expert weights.

    Where transformers calls ``torch._grouped_mm`` (bf16 under torch.compile, and eagerly when the kernel exists),
    the op's meta function checks the weight's strides and refuses a stride-0 virtual tensor while Dynamo traces.
    This wraps transformers' ``_grouped_mm`` dispatcher so that a virtual weight goes to ``helix::grouped_mm``
    (same result shape, no stride check; the MoE rewrite turns it back into ``torch._grouped_mm`` over the rank's
    contiguous shard). Real weights, and the ``grouped_mm_fallback`` path (other dtypes), are untouched. Idempotent.
    """
    try:
        from transformers.integrations import moe
    except ImportError:
        return
    original = getattr(moe, "_grouped_mm", None)
    if original is None or getattr(original, "helix_routes_virtual", False):
        return
    from .lowering.ops import grouped_mm as helix_grouped_mm

    def _grouped_mm(input, weight, offs):
        if is_virtual(weight) and moe._can_use_grouped_mm(input, weight, offs):
            return helix_grouped_mm(input.to(weight.dtype), weight, offs)
        return original(input, weight, offs)

    _grouped_mm.helix_routes_virtual = True
    moe._grouped_mm = _grouped_mm
