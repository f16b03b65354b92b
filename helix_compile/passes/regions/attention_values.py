"""Attention (part): routing values. How each attention core's values come from the cache's ``values``
placeholder, and whether that route stays exact on a rank's heads.

Most models read the placeholder through repeat_kv only (getitem None / expand / reshape). DiffLLaMA runs several
cores over one query, each over whole KV heads of the cache rearranged position by position
(``chunk(values, 2, dim=1)[i].repeat(1, 2, 1, 1)``); such ops take every position alike, so they commute with
sharding the sequence (KVP), and which heads they hand each query head on a rank is proved by running them on
that rank's head indices (``ValueRoute.check``).

Contract
    value_route(value, values, keys, core) -> ValueRoute   the route of ``core``'s value operand back to
                            ``values``; refuses (``UnsupportedModelError`` naming the node) values of another cache
                            layer and any op but per-position rearrangements of whole KV heads
    ValueRoute.check(heads, layout, rank)                    refuses a layout under which a local query head would
                            read another value head than the global program gives it
    cache_source(node)      follows repeat_kv (getitem / shape methods) back to a placeholder (None: other ops)
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from .common import CATS, SHAPE_METHODS, UnsupportedModelError, is_call, is_method, order, shape, where
from .heads import cut_dim, is_cut
from .roles import head_ranges


@dataclasses.dataclass
class ValueRoute:
    """The values one attention core reads: the cache's ``values`` placeholder itself (``ops`` empty), or whole KV
    heads of it rearranged position by position (DiffLLaMA: ``chunk(values, 2, dim=1)[i].repeat(1, 2, 1, 1)``):
    ``node`` (B, K, S, Dv), made from the placeholder by ``ops`` (chunk / split / tensor_split along the heads dim
    and getitem of a part, getitem of a heads slice or of batch rows, repeat along the heads dim, cat along it,
    contiguous), before repeat_kv. Such ops take every position alike, so they commute with sharding the sequence
    (KVP); which heads they take on a rank's heads is proved by ``check``."""

    core: fx.Node
    source: fx.Node  # the cache's values placeholder
    node: fx.Node  # what the core reads through repeat_kv: ``source``, or the last of ``ops``
    ops: list  # graph order

    def heads_read(self, kv_heads: list) -> list:
        """The cache's KV heads (global indices) that ``node``'s heads hold when the cache holds ``kv_heads`` in this
        order: ``ops`` run on a (1, len(kv_heads), 1, 1) tensor of those indices."""
        env = {self.source: torch.tensor(kv_heads).view(1, -1, 1, 1)}
        for op in self.ops:
            if _rows_slice(op):  # batch rows: the same heads
                env[op] = env[op.args[0]]
                continue
            args, kwargs = fx.node.map_arg((op.args, op.kwargs), lambda n: env[n])
            env[op] = op.target(*args, **kwargs) if op.op == "call_function" else getattr(args[0], op.target)(
                *args[1:], **kwargs)
        return env[self.node].flatten().tolist()

    def check(self, heads, layout, rank: int) -> None:
        """Refuse unless the local program, running ``ops`` on this rank's KV heads, gives each of its query heads
        the value head the global program gives that query head (query head h reads head h // (Q/K) of ``node``)."""
        if not self.ops:
            return
        q_ranges, kv_ranges = head_ranges(heads, layout, rank)
        qs, ks = [h for a, b in q_ranges for h in range(a, b)], [g for a, b in kv_ranges for g in range(a, b)]
        names = " -> ".join(op.name for op in self.ops)
        try:
            whole, local = self.heads_read(list(range(heads.k))), self.heads_read(ks)
        except (RuntimeError, IndexError, ValueError) as e:
            raise UnsupportedModelError(f"{where(self.core)}: its values are rearranged ({names}) in a way that does "
                                        f"not run on this rank's {len(ks)} KV heads {kv_ranges}: {e}") from None
        if len(whole) != heads.k or len(local) != len(ks):
            raise UnsupportedModelError(
                f"{where(self.core)}: its values ({names}) have {len(whole)} heads and its keys {heads.k}; helix pairs "
                f"keys and values head by head"
            )
        group, local_group = heads.q // heads.k, len(qs) // len(ks)
        for i, h in enumerate(qs):
            if local[i // local_group] != whole[h // group]:
                raise UnsupportedModelError(
                    f"{where(self.core)}: query head {h} reads value head {whole[h // group]} of the cache (through "
                    f"{names}), but on rank {rank} ({layout.key()}: query heads {q_ranges}, KV heads {kv_ranges}) it "
                    f"would read head {local[i // local_group]}; helix keeps such rearrangements exact only when each "
                    f"rank holds the heads they pair up ({heads.parts} part(s) of the heads, layout._HEAD_PARTS)"
                )


def value_route(value: fx.Node, values: fx.Node, keys: fx.Node, core: fx.Node) -> ValueRoute:
    """How the ``value`` operand of ``core`` comes from the cache's ``values`` placeholder (see ``ValueRoute``):
    repeat_kv's views (and batch rows) back to the placeholder or to the last of the head rearrangements, which
    must lead to the placeholder alone; anything else is refused by name."""
    node = value
    while node.op != "placeholder" and not _head_op(node) and (
            is_method(node, SHAPE_METHODS) or is_call(node, {operator.getitem})):
        node = node.args[0]  # repeat_kv: getitem None / expand / reshape (and a batch slice)
    ops, stack, seen = [], [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            if n is not values:
                raise UnsupportedModelError(
                    f"attention reads keys of one cache layer ({keys.name}) and values of another ({n.name}): "
                    f"{where(core)}"
                )
            continue
        if not (_head_op(n) or _rows_slice(n) or is_method(n, {"contiguous", "clone"})):
            raise UnsupportedModelError(
                f"the values of {where(core)} come from the cache's {values.name} through {where(n)}: helix follows "
                f"only per-position rearrangements of whole KV heads there (chunk / split / getitem / repeat / cat "
                f"along the heads dim, and repeat_kv)"
            )
        ops.append(n)
        stack.extend(n.all_input_nodes)
    return ValueRoute(core, values, node, sorted(ops, key=order))


def _head_op(node: fx.Node) -> bool:
    """An op on the heads dim (1) of a (B, K, S, D) tensor that takes every position alike: a cut along it and
    x[i] of one of its parts, a slice of it x[:, a:b], repeat(1, r, 1, 1), cat along it."""
    if is_cut(node):
        return len(shape(node.args[0]) or ()) == 4 and cut_dim(node) == 1
    if is_call(node, {operator.getitem}):
        source, index = node.args
        if is_cut(source):
            return isinstance(index, int)
        return (isinstance(index, tuple) and len(index) >= 2 and index[0] == slice(None) and isinstance(index[1], slice)
                and all(isinstance(v, int) or v is None for v in (index[1].start, index[1].stop, index[1].step))
                and all(i == slice(None) for i in index[2:]) and len(shape(source) or ()) == 4)
    if is_method(node, {"repeat"}):
        sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        return len(sizes) == 4 and all(isinstance(v, int) for v in sizes) and sizes[0] == sizes[2] == sizes[3] == 1
    if is_call(node, CATS):
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        return len(shape(node) or ()) == 4 and dim % 4 == 1
    return False


def _rows_slice(node: fx.Node) -> bool:
    """x[:b] / x[a:b, :, :, :]: rows of the batch, every head and position."""
    if not is_call(node, {operator.getitem}):
        return False
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    return isinstance(index[0], slice) and index[0].step is None and all(i == slice(None) for i in index[1:])


def cache_source(node: fx.Node) -> fx.Node | None:
    """Follow repeat_kv (getitem None / expand / reshape / contiguous) back to a placeholder."""
    while node.op != "placeholder":
        if node.op == "call_method" and node.target in SHAPE_METHODS or (
            node.op == "call_function" and node.target is operator.getitem
        ):
            node = node.args[0]
        else:
            return None
    return node
