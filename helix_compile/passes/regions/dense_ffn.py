"""Region matcher: a dense FFN (MLP), tensor-parallel over all N ranks (also in a MoE model, whose tpf x ep
split applies to the routed experts only: its dense layers and shared experts use all N ranks).

Match (pattern): the projections of one FFN module (``mlp``, ``feed_forward``, ``ffn``), classified by dataflow,
not by name: the *in* projections (gate, up, fc1, c_fc, dense_h_to_4h; or one fused gate_up) read the module's
input; the one *out* projection (down, fc2, c_proj, dense_4h_to_h) reads only what the ins computed, through
elementwise ops (activations, products, casts, scaling, dropout), and statistics over all intermediate features
(``FeatureStat``: a mean or std over the last dim, e.g. Gemma 3n's activation sparsity, a gaussian top-k
``relu(x - mean(x) - std(x) * c)``). Ops that read no projection (constants such as Gemma 3n's ``c``, an inverse
normal CDF) are replicated values and not constrained. Whatever follows the out projection (dropout, residual
scaling, casts) runs on its all-reduced, replicated value, so it is not constrained either. A fused gate_up is cut
by ``chunk`` / ``split`` on its last dim, or by a part view ``view(x, (B, L, 2, -1))`` read as ``x[..., 0, :]`` and
``x[..., 1, :]`` (Moshi) (``FusedSplit``; a part view or part index that is not the cut of the one fused in
projection is refused: it reshapes / indexes the intermediate features).
OPT-style layers (OPT, BioGPT, XGLM) hold ``fc1`` and ``fc2`` themselves, with the activation and dropout in
the layer's own forward: one region, named ``<layer>.fc1+fc2``, whose ops are the layer's own and those of its
fc1, fc2 and ``activation_fn`` modules.
BERT-style layers (BERT, RoBERTa, ELECTRA, MegatronBERT, RemBERT, BigBird, X-MOD, ...) split their FFN over two
sibling modules, ``<layer>.intermediate`` (in projection, activation) and ``<layer>.output`` (out projection,
dropout, LayerNorm(x + residual)): one region, named ``<layer>.intermediate+output``. An ``output`` module counts
only beside an ``intermediate`` one (so a BERT attention's ``attention.output`` is not taken), and only its own
ops and direct children (``dense``, ``LayerNorm``): deeper submodules, such as X-MOD's language adapters, run
after the all-reduced out projection on replicated values and are left whole (reported).

Rewrite (``replace_with``):
    in projections   column-parallel: each rank computes I/N of the intermediate features (a Conv1D's output
                     view gets the local width; a fused gate_up's cut offsets (0, I, 2I) become (0, i, 2i))
    out = proj(h, Wdown, b)  into  wait(all_reduce(proj(h, Wdown_shard), "sum", world)) [+ b]
    mean(x, -1)              into  wait(all_reduce(sum(x, -1), "sum", world)) / I              (fp32 sums)
    std(x, -1, correction=c) into  sqrt(wait(all_reduce(sum((x - mean)^2, -1), "sum", world)) / (I - c))
    (a norm over all I features, BitNet's ffn_sub_norm, is such a mean; its (I,) weight is sharded like the ins)
A module called several times (weights shared) is one region per call. Refuses: mixture-of-experts blocks not claimed by ``moe.py`` (a safety net), more or fewer than one out projection, and any op between
the ins and the out that mixes intermediate features (named, with its module).
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from .common import (
    ELEMENTWISE_FUNCS, ELEMENTWISE_METHODS, SHAPE_METHODS, UnsupportedModelError, check_only, is_method, module_path,
    shape, where,
)
from .ffn_kind import is_moe  # the MoE matcher's own test: a block it would own is never run as a dense FFN
from .projection import FusedSplit, Projection, find_split, is_part_index, is_part_view, is_projection, projection_of

FFN_MODULES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "moe")
funcol = torch.ops._c10d_functional


@dataclasses.dataclass
class DenseFFNMatch:
    module: str  # e.g. "model.layers.0.mlp"
    ins: list[Projection]  # column-parallel (gate, up; or one fused gate_up)
    out: Projection  # row-parallel (down)
    split: FusedSplit | None = None  # the cut of a fused gate_up
    stats: list = dataclasses.field(default_factory=list)  # FeatureStat: means/stds over all intermediate features
    norm_weights: list = dataclasses.field(default_factory=list)  # 1-D weights (I,) after a mean, sharded like the ins

    kind = "ffn"

    def describe(self) -> str:
        fused = " fused=gate_up" if self.split is not None else ""
        stats = f" feature_stats={[f'{st.kind}:{st.node.name}' for st in self.stats]}" if self.stats else ""
        return f"ffn {self.module} ins={[p.name for p in self.ins]} out={self.out.name}{fused}{stats}"

    def placements_nodes(self):
        nodes = [n for p in (*self.ins, self.out) for n in (p.weight, p.bias) if n is not None] + self.norm_weights
        return [(n, None, None) for n in nodes]

    def placements(self, heads):
        role = "ffn_in_pair" if self.split is not None else "ffn_in"
        out = [pl for p in self.ins for pl in p.placements(role)]
        return out + self.out.placements("ffn_out") + [(w, "ffn_in", "weight") for w in self.norm_weights]

    def replace_with(self, graph: fx.Graph, env: dict, ctx) -> None:
        inter = self.out.in_features
        local = inter // ctx.layout.world_size
        for p in self.ins:
            p.column_parallel(env, 2 * local if self.split is not None else local)
        if self.split is not None:
            self.split.replace_with(env, [0, inter, 2 * inter], [0, local, 2 * local])
        self.out.row_parallel(graph, env, ctx.world_group, ctx.layout.world_size, local)
        if ctx.layout.world_size > 1:
            for stat in self.stats:
                stat.replace_with(graph, env[stat.node.name], inter, ctx.world_group)


@dataclasses.dataclass
class FeatureStat:
    """A mean or standard deviation over all intermediate features (the last dim) of a column-parallel tensor:
    each rank holds I/N of them, so the rank-local statistic becomes an all-reduced one (exact up to fp order)."""

    node: fx.Node
    kind: str  # "mean" or "std"
    keepdim: bool
    correction: int = 0  # std: divide by I - correction

    def replace_with(self, graph: fx.Graph, node: fx.Node, width: int, group: str) -> None:
        x = node.args[0]

        def global_sum(t):
            part = graph.call_function(torch.sum, (t, -1), {"keepdim": True, "dtype": torch.float32})
            return graph.call_function(funcol.wait_tensor.default,
                                       (graph.call_function(funcol.all_reduce.default, (part, "sum", group)),))

        with graph.inserting_before(node):
            result = graph.call_function(operator.truediv, (global_sum(x), float(width)))
            if self.kind == "std":
                dev = graph.call_function(operator.sub, (graph.call_method("float", (x,)), result))
                var = graph.call_function(operator.truediv, (global_sum(graph.call_function(operator.mul, (dev, dev))),
                                                             float(width - self.correction)))
                result = graph.call_function(torch.sqrt, (var,))
            result = graph.call_method("to", (result, node.meta["example_value"].dtype))
            if not self.keepdim:
                result = graph.call_method("squeeze", (result, -1))
        node.replace_all_uses_with(result)
        graph.erase_node(node)


def _feature_stat(node: fx.Node, width: int) -> FeatureStat | None:
    """``node`` as a mean/std over the last dim of a tensor of ``width`` features, or None."""
    kind = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
    if node.op not in ("call_method", "call_function") or kind not in ("mean", "std"):
        return None
    if node.op == "call_function" and node.target not in (torch.mean, torch.std):
        return None
    x_shape = shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
    extra = set(node.kwargs) - {"dim", "keepdim", "unbiased", "correction"}
    if len(node.args) > 2 or extra or not x_shape or x_shape[-1] != width:
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dim not in (-1, len(x_shape) - 1, (-1,), [-1]):
        return None
    correction = node.kwargs.get("correction", None)
    if correction is None:
        correction = 1 if node.kwargs.get("unbiased", True) else 0
    if kind == "mean" and ("unbiased" in node.kwargs or "correction" in node.kwargs):
        return None
    return FeatureStat(node, kind, bool(node.kwargs.get("keepdim", False)), int(correction))


def match_dense_ffn(graph: fx.Graph, claimed: set, skip=()) -> list[DenseFFNMatch]:
    """One ``DenseFFNMatch`` per FFN module, in graph order; ``claimed`` projection nodes and ``skip`` modules
    (matched as mixture-of-experts blocks) are skipped."""
    groups: dict[str, list[fx.Node]] = {}
    ops = [n for n in graph.nodes if n.op in ("call_function", "call_method")]
    layers = {_split_layer(module_path(n), {SPLIT_IN}) for n in ops} - {None}  # layers with an ``intermediate``
    for node in ops:
        module = ffn_module(module_path(node), layers)
        if module is not None:
            groups.setdefault(module, []).append(node)
    regions = []
    for module, nodes in groups.items():
        if module in skip:
            continue
        _refuse_moe(module, nodes)
        projections = [projection_of(n) for n in nodes if is_projection(n) and n not in claimed]
        if not projections:
            continue
        regions += [match_one(module, call) for call in _calls(module, projections)]
    return regions


SPLIT_IN, SPLIT_OUT = "intermediate", "output"  # BERT-style FFN: two sibling modules of the layer
LAYER_FFN = ("fc1", "fc2")  # OPT-style FFN: projections of the decoder layer itself


def _split_layer(path: str, names) -> str | None:
    """The layer path of a BERT-style FFN module path (``<layer>.intermediate...``), or None."""
    parts = path.split(".")
    hit = [i for i, p in enumerate(parts) if p in names]
    return ".".join(parts[: hit[0]]) if hit else None


def ffn_module(path: str, layers=()) -> str | None:
    """The FFN region a node of this module path belongs to: ``<...>.mlp`` (first FFN_MODULES component),
    ``<layer>.intermediate+output`` for the two sibling modules of a BERT-style ``layer`` (one of ``layers``), or
    ``<layer>.fc1+fc2`` for the projections an OPT-style layer holds itself (OPT, BioGPT, XGLM)."""
    parts = path.split(".")
    hit = [i for i, p in enumerate(parts) if p in FFN_MODULES]
    if hit:
        return ".".join(parts[: hit[0] + 1])
    if len(parts) > 1 and parts[-1] in LAYER_FFN:
        return f"{'.'.join(parts[:-1])}.{'+'.join(LAYER_FFN)}"
    for i, p in enumerate(parts):
        if p in (SPLIT_IN, SPLIT_OUT) and ".".join(parts[:i]) in layers:
            if p == SPLIT_OUT and len(parts) > i + 2:
                return None  # a submodule of the output module (X-MOD's language adapters): after the out projection
            return f"{'.'.join(parts[:i])}.{SPLIT_IN}+{SPLIT_OUT}"
    return None


def _inside(module: str):
    """Whether a module path lies inside the FFN region ``module`` (both siblings of a BERT-style pair; for an
    OPT-style layer, the layer's own ops and its fc1, fc2 and activation modules)."""
    if module.endswith(f".{'+'.join(LAYER_FFN)}"):
        layer = module[: -len(f".{'+'.join(LAYER_FFN)}")]
        prefixes = tuple(f"{layer}.{p}" for p in (*LAYER_FFN, "activation_fn"))
        return lambda path: path == layer or any(path == p or path.startswith(p + ".") for p in prefixes)
    if module.endswith(f".{SPLIT_IN}+{SPLIT_OUT}"):
        layer = module[: -len(f".{SPLIT_IN}+{SPLIT_OUT}")]
        prefixes = (f"{layer}.{SPLIT_IN}", f"{layer}.{SPLIT_OUT}")
        return lambda path: any(path == p or path.startswith(p + ".") for p in prefixes)
    return lambda path: path.startswith(module)


def _calls(module: str, projections: list[Projection]) -> list[list[Projection]]:
    """The projections of each call of a module called more than once (HRM's recurrent layers reuse their
    modules): each out projection with the ins it reads; one group when that does not partition them."""
    by_out = {p.out: p for p in projections}
    feeds = {p.node: _upstream(p, by_out, module, [], []) for p in projections}
    outs = [p for p in projections if feeds[p.node]]
    groups = [[p for p in projections if p.node in feeds[out.node]] + [out] for out in outs]
    if len(outs) < 2 or sorted(id(p) for g in groups for p in g) != sorted(id(p) for p in projections):
        return [projections]
    return groups


def _refuse_moe(module: str, nodes) -> None:
    if is_moe(module, nodes):
        raise UnsupportedModelError(f"{module}: a mixture-of-experts FFN that the MoE matcher did not claim")


def match_one(module: str, projections: list[Projection]) -> DenseFFNMatch:
    by_out = {p.out: p for p in projections}
    stats: list[FeatureStat] = []
    parts: list[fx.Node] = []  # part views and their part indices: must be the cut of a fused gate_up
    feeds = {p.node: _upstream(p, by_out, module, stats, parts) for p in projections}
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
        split = find_split(ins[0], f"fused gate_up of {module}", part_views=True)
    for node in parts:
        if split is None or node not in split.nodes:
            verb = "reshapes" if is_part_view(node) else "indexes"
            raise UnsupportedModelError(f"{module}: {where(node)} {verb} the intermediate features")
    means = [st.node for st in stats if st.kind == "mean"]  # a norm's weight (I,) follows its mean (BitNet)
    weights = [w for m in means for n in _after(m, out) for w in n.all_input_nodes
               if w.op == "placeholder" and _shape(w) == (out.in_features,)]
    return DenseFFNMatch(module, ins, out, split, stats, list(dict.fromkeys(weights)))


def _shape(node):
    val = node.meta.get("example_value")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _after(node: fx.Node, out: Projection) -> list:
    """Nodes between ``node`` and the out projection (a norm's tail: rsqrt, products, its weight)."""
    found, stack = [], list(node.users)
    while stack:
        n = stack.pop()
        if n in found or n is out.node or n is out.in_view:
            continue
        found.append(n)
        stack.extend(n.users)
    return found


def _upstream(proj: Projection, by_out: dict, module: str, stats: list, parts: list) -> list[fx.Node]:
    """The projections of the module that ``proj`` reads, checking that only elementwise ops (and the feature
    statistics, appended to ``stats``; part views and part indices, appended to ``parts`` for ``match_one`` to
    check against the fused split) lie between; ops that read no projection are replicated values."""
    start = proj.in_view.args[0] if proj.transposed else proj.node.args[0]
    found, stack, seen = [], [start], set()
    ops, inside = [], _inside(module)
    while stack:
        node = stack.pop()
        if node in seen or not isinstance(node, fx.Node):
            continue
        seen.add(node)
        if node in by_out:
            found.append(by_out[node].node)
            continue
        if node.op in ("placeholder", "get_attr") or not inside(module_path(node)):
            continue  # the module's input (replicated)
        ops.append(node)
        stack.extend(node.all_input_nodes)
    if found:
        sharded, reading = set(by_out), []  # the projections' outputs and what reads them carry the features
        for node in sorted(ops, key=lambda n: n._sort_key):
            if any(a in sharded for a in node.all_input_nodes):
                sharded.add(node)
                stat = _feature_stat(node, proj.in_features)
                stats.append(stat) if stat is not None else reading.append(node)
        ops = reading
        allowed = ELEMENTWISE_METHODS | ELEMENTWISE_FUNCS | SHAPE_METHODS | {"chunk", "split", torch.chunk, torch.split}
        check_only(ops, allowed - {torch.cat}, module, pointwise=True)
        for node in ops:
            if is_part_view(node) or is_part_index(node):
                parts.append(node)
                continue
            if is_method(node, SHAPE_METHODS) and node.target not in ("contiguous", "to"):
                if _last(node) != _last(node.args[0]):
                    raise UnsupportedModelError(f"{module}: {where(node)} reshapes the intermediate features")
            if node.op == "call_function" and node.target is operator.getitem and not isinstance(node.args[1], int):
                raise UnsupportedModelError(f"{module}: {where(node)} indexes the intermediate features")
    return found


def _last(node):
    val = node.meta.get("example_value")
    return tuple(val.shape)[-1] if isinstance(val, torch.Tensor) and val.dim() else None
