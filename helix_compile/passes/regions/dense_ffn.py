"""Region matcher: a dense FFN (MLP), tensor-parallel over all N ranks (also in a MoE model, whose tpf x ep
split applies to the routed experts only: its dense layers and shared experts use all N ranks).

Match (pattern): the projections of one FFN module (``mlp``, ``feed_forward``, ``ffn``), classified by dataflow,
not by name: the *in* projections (gate, up, fc1, c_fc, dense_h_to_4h; or one fused gate_up) read the module's
input; the one *out* projection (down, fc2, c_proj, dense_4h_to_h) reads only what the ins computed, through
elementwise ops (activations, products, casts, scaling, dropout). Whatever follows the out projection (dropout,
residual scaling, casts) runs on its all-reduced, replicated value, so it is not constrained. A fused gate_up is
cut by ``chunk`` / ``split`` on its last dim (``FusedSplit``).

Rewrite (``replace_with``):
    in projections   column-parallel: each rank computes I/N of the intermediate features (a Conv1D's output
                     view gets the local width; a fused gate_up's cut offsets (0, I, 2I) become (0, i, 2i))
    out = proj(h, Wdown, b)  into  wait(all_reduce(proj(h, Wdown_shard), "sum", world)) [+ b]
Refuses: mixture-of-experts blocks not claimed by ``moe.py`` (a safety net), more or fewer than one out projection, and any op between
the ins and the out that mixes intermediate features (named, with its module).
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from .common import (
    ELEMENTWISE_FUNCS, ELEMENTWISE_METHODS, SHAPE_METHODS, UnsupportedModelError, check_only, is_method, module_path,
    where,
)
from .projection import FusedSplit, Projection, find_split, is_projection, projection_of

FFN_MODULES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "moe")


@dataclasses.dataclass
class DenseFFNMatch:
    module: str  # e.g. "model.layers.0.mlp"
    ins: list[Projection]  # column-parallel (gate, up; or one fused gate_up)
    out: Projection  # row-parallel (down)
    split: FusedSplit | None = None  # the cut of a fused gate_up

    kind = "ffn"

    def describe(self) -> str:
        fused = " fused=gate_up" if self.split is not None else ""
        return f"ffn {self.module} ins={[p.name for p in self.ins]} out={self.out.name}{fused}"

    def placements_nodes(self):
        return [(n, None, None) for p in (*self.ins, self.out) for n in (p.weight, p.bias) if n is not None]

    def placements(self, heads):
        role = "ffn_in_pair" if self.split is not None else "ffn_in"
        out = [pl for p in self.ins for pl in p.placements(role)]
        return out + self.out.placements("ffn_out")

    def replace_with(self, graph: fx.Graph, env: dict, ctx) -> None:
        inter = self.out.in_features
        local = inter // ctx.layout.world_size
        for p in self.ins:
            p.column_parallel(env, 2 * local if self.split is not None else local)
        if self.split is not None:
            self.split.replace_with(env, [0, inter, 2 * inter], [0, local, 2 * local])
        self.out.row_parallel(graph, env, ctx.world_group, ctx.layout.world_size, local)


def match_dense_ffn(graph: fx.Graph, claimed: set, skip=()) -> list[DenseFFNMatch]:
    """One ``DenseFFNMatch`` per FFN module, in graph order; ``claimed`` projection nodes and ``skip`` modules
    (matched as mixture-of-experts blocks) are skipped."""
    groups: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        parts = module_path(node).split(".")
        hit = [i for i, p in enumerate(parts) if p in FFN_MODULES]
        if node.op in ("call_function", "call_method") and hit:
            groups.setdefault(".".join(parts[: hit[0] + 1]), []).append(node)
    regions = []
    for module, nodes in groups.items():
        if module in skip:
            continue
        _refuse_moe(module, nodes)
        projections = [projection_of(n) for n in nodes if is_projection(n) and n not in claimed]
        if not projections:
            continue
        regions.append(match_one(module, projections))
    return regions


def _refuse_moe(module: str, nodes) -> None:
    from .moe import is_moe  # the MoE matcher's own test: a block it would own is never run as a dense FFN

    if is_moe(module, nodes):
        raise UnsupportedModelError(f"{module}: a mixture-of-experts FFN that the MoE matcher did not claim")


def match_one(module: str, projections: list[Projection]) -> DenseFFNMatch:
    by_out = {p.out: p for p in projections}
    feeds = {p.node: _upstream(p, by_out, module) for p in projections}
    outs = [p for p in projections if feeds[p.node]]
    ins = [p for p in projections if not feeds[p.node]]
    if len(outs) != 1 or not ins or set(feeds[outs[0].node]) != {p.node for p in ins}:
        raise UnsupportedModelError(
            f"{module}: expected input projections feeding one output projection, found "
            f"{ {p.name: [n.name for n in feeds[p.node]] for p in projections} } (projection: the projections it reads)"
        )
    out = outs[0]
    split = None
    if len(ins) == 1:
        split = find_split(ins[0], f"fused gate_up of {module}")
    return DenseFFNMatch(module, ins, out, split)


def _upstream(proj: Projection, by_out: dict, module: str) -> list[fx.Node]:
    """The projections of the module that ``proj`` reads, checking that only elementwise ops lie between."""
    start = proj.in_view.args[0] if proj.transposed else proj.node.args[0]
    found, stack, seen = [], [start], set()
    ops = []
    while stack:
        node = stack.pop()
        if node in seen or not isinstance(node, fx.Node):
            continue
        seen.add(node)
        if node in by_out:
            found.append(by_out[node].node)
            continue
        if node.op in ("placeholder", "get_attr") or not module_path(node).startswith(module):
            continue  # the module's input (replicated)
        ops.append(node)
        stack.extend(node.all_input_nodes)
    if found:
        allowed = ELEMENTWISE_METHODS | ELEMENTWISE_FUNCS | SHAPE_METHODS | {"chunk", "split", torch.chunk, torch.split}
        check_only(ops, allowed - {torch.cat}, module, pointwise=True)
        for node in ops:
            if is_method(node, SHAPE_METHODS) and node.target not in ("contiguous", "to"):
                if _last(node) != _last(node.args[0]):
                    raise UnsupportedModelError(f"{module}: {where(node)} reshapes the intermediate features")
            if node.op == "call_function" and node.target is operator.getitem and not isinstance(node.args[1], int):
                raise UnsupportedModelError(f"{module}: {where(node)} indexes the intermediate features")
    return found


def _last(node):
    val = node.meta.get("example_value")
    return tuple(val.shape)[-1] if isinstance(val, torch.Tensor) and val.dim() else None
