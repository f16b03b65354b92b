"""Projections, plain or fused: the matcher every region kind builds on.

A projection is ``y = x W^T + b`` (``nn.Linear``: one ``linear`` node; FalconLinear: ``matmul(x, W.T)`` and, with a
bias, ``+ b`` as a separate ``add``) or ``y = x W + b`` (transformers' ``Conv1D``, GPT-2: ``view(x, (-1, in)) ->
addmm(b, ., W) -> view(..., out)``, weight stored (in, out)).
``Projection`` normalises both, and owns the two rewrites a region asks of it:

    column-parallel (the rank computes some output features):   only the constant output width of a Conv1D's
        output view changes; the weight and bias arrive already sliced (plan placements).
    row-parallel (the rank holds some input features):           y = x W + b
        into  y = wait(all_reduce(x W_shard, "sum", group)) + b    (bias once, after the sum)

A fused projection's output is split by the model into its parts (q|k|v, gate|up) with constant offsets
(``split``, ``chunk``, slicing ``getitem``), or by a *part view*: ``view(x, (..., p, -1))`` (or the explicit
part width W/p) of a last dim of W features, then ``x[..., k, :]`` for part k (Moshi's gating MLP:
``fc1 -> view(B, L, 2, -1) -> act(x[..., 0, :]) * x[..., 1, :]``), i.e. part k is features [k W/p, (k+1) W/p).
``FusedSplit`` finds those ops and rewrites each global boundary to the local one (Inductor's micro_pipeline_tp
style: the match owns its ``replace_with``); a part view's explicit width becomes the local part width (-1 stays).
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from .common import (
    ADDMM, LINEAR, SHAPE_METHODS, UnsupportedModelError, is_call, is_method, module_path, shape, where,
)

funcol = torch.ops._c10d_functional


@dataclasses.dataclass
class Projection:
    node: fx.Node  # the linear / addmm node
    out: fx.Node  # the node whose value is y, features last: the linear itself, or a Conv1D's output view
    weight: fx.Node
    bias: fx.Node | None
    in_view: fx.Node | None = None  # Conv1D only: view(x, (-1, in))
    separate_bias: bool = False  # matmul(x, W.T) [-> add(., b) = out]: the bias is its own node (FalconLinear)

    @property
    def transposed(self) -> bool:
        return self.in_view is not None

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def out_features(self) -> int:
        return shape(self.weight)[1 if self.transposed else 0]

    @property
    def in_features(self) -> int:
        return shape(self.weight)[0 if self.transposed else 1]

    def placements(self, role: str):
        """(placeholder, role, kind) for the weight and the bias (the plan resolves each with ``role_shard``)."""
        out = [(self.weight, role, "weight_t" if self.transposed else "weight")]
        if self.bias is not None:
            out.append((self.bias, role, "bias"))
        for node, _, kind in out:
            if node.op != "placeholder":
                raise UnsupportedModelError(f"{role} projection {where(self.node)}: its {kind} is computed in the graph")
        return out

    # -- rewrites (on the partitioned copy: ``env`` maps names to its nodes) ---------------------------------------
    def column_parallel(self, env: dict, local_out: int) -> None:
        if self.transposed:
            _set_last_size(env[self.out.name], local_out)

    def row_parallel(self, graph: fx.Graph, env: dict, group: str | None, n: int, local_in: int) -> None:
        if n == 1:
            return
        node = env[self.node.name]
        if self.transposed:  # addmm(b, x, W) -> mm(x, W_shard) on the local input features
            _set_last_size(env[self.in_view.name], local_in)
            bias = node.args[0]
            with graph.inserting_before(node):
                mm = graph.call_function(torch.mm, (node.args[1], node.args[2]))
            node.replace_all_uses_with(mm)
            graph.erase_node(node)
            node = mm
        elif self.separate_bias:
            bias = None  # its add follows the matmul, so it reads the all-reduced sum: added once
        else:
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            node.args = (node.args[0], node.args[1], None)
            node.kwargs = {}
        with graph.inserting_after(node):
            reduced = graph.call_function(funcol.all_reduce.default, (node, "sum", group))
        with graph.inserting_after(reduced):
            result = graph.call_function(funcol.wait_tensor.default, (reduced,))
        if bias is not None:
            with graph.inserting_after(result):
                result = graph.call_function(torch.add, (result, bias))
        node.replace_all_uses_with(result, delete_user_cb=lambda user: user is not reduced)


def is_projection(node) -> bool:
    return is_call(node, {LINEAR}) or is_call(node, {ADDMM}) or _matmul_weight(node) is not None


def _matmul_weight(node) -> fx.Node | None:
    """W of ``matmul(x, W.T)`` with W a 2-D placeholder (FalconLinear: ``input @ self.weight.T``), else None."""
    if not is_call(node, {torch.matmul, operator.matmul}) or len(node.args) != 2:
        return None
    wt = node.args[1]
    if not (is_call(wt, {getattr}) and wt.args[1] == "T" or is_method(wt, {"t"})):
        return None
    weight = wt.args[0]
    return weight if weight.op == "placeholder" and len(shape(weight) or ()) == 2 else None


def _matmul_bias(node: fx.Node) -> fx.Node | None:
    """The ``add`` of a 1-D placeholder of the output width right after ``matmul(x, W.T)`` (FalconLinear's bias)."""
    users = list(node.users)
    if len(users) != 1 or not is_call(users[0], {operator.add, torch.add}) or users[0].args[0] is not node:
        return None
    bias = users[0].args[1]
    width = shape(node)[-1] if shape(node) else None
    ok = isinstance(bias, fx.Node) and bias.op == "placeholder" and shape(bias) == (width,)
    return users[0] if ok and module_path(users[0]) == module_path(node) else None


def as_projection(node: fx.Node) -> Projection:
    """Normalise a ``linear``, a ``matmul(x, W.T) [+ b]`` or a Conv1D ``addmm`` node (refusing any other addmm)."""
    if node.target is LINEAR:
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return Projection(node, node, node.args[1], bias)
    weight = _matmul_weight(node)
    if weight is not None:
        add = _matmul_bias(node)
        return Projection(node, add or node, weight, add.args[1] if add is not None else None, separate_bias=True)
    bias, x, weight = node.args[:3]
    users = list(node.users)
    if (
        node.kwargs or not is_method(x, {"view"}) or len(users) != 1 or not is_method(users[0], {"view"})
        or weight.op != "placeholder"
    ):
        raise UnsupportedModelError(f"{where(node)}: an addmm that is not a Conv1D projection (view -> addmm -> view)")
    return Projection(node, users[0], weight, bias, in_view=x)


def projection_of(node: fx.Node) -> Projection:
    """The projection whose ``out`` or ``node`` this is."""
    if is_projection(node):
        return as_projection(node)
    if is_method(node, {"view"}) and is_call(node.args[0], {ADDMM}):
        return as_projection(node.args[0])
    raise KeyError(node.name)


def is_projection_output(node: fx.Node) -> bool:
    """A projection's output: the ``linear`` / ``matmul`` / ``addmm`` node itself, or the bias ``add`` that completes
    ``matmul(x, W.T) + b`` (FalconLinear with a bias)."""
    if is_projection(node):
        return True
    return is_call(node, {operator.add, torch.add}) and _matmul_weight(node.args[0]) is not None and \
        _matmul_bias(node.args[0]) is node


def _set_last_size(view: fx.Node, size: int) -> None:
    """view(x, (..., n)) / view(x, ..., n) -> the same with the last size ``size``."""
    args = list(view.args)
    if len(args) == 2 and isinstance(args[1], (tuple, list)):
        args[1] = (*args[1][:-1], size)
    else:
        args[-1] = size
    if not isinstance(view.args[-1] if len(view.args) > 2 else view.args[1][-1], int):
        raise UnsupportedModelError(f"{where(view)}: expected a constant feature width")
    view.args = tuple(args)


# -- the splits of a fused projection ---------------------------------------------------------------------------
SPLIT_METHODS = {"split", "chunk", "tensor_split"}


@dataclasses.dataclass
class FusedSplit:
    """The ops that cut a fused projection's output into its parts along the feature (last) dim.

    ``boundaries`` are the global offsets of the parts (e.g. 0, Q*D, Q*D+K*D, (Q+2K)*D); ``replace_with``
    rewrites every constant offset to the rank's local one (``local`` boundaries, same count).
    """

    projection: Projection
    cuts: list[fx.Node]  # split / chunk / getitem-slice nodes on the last dim, or getitem(part_view, (..., k, :))
    width: int  # global feature width at the cut (e.g. (Q+2K)*D, or 3*D for per-head interleaved)
    part_views: list[fx.Node] = dataclasses.field(default_factory=list)  # view(x, (..., p, -1 or W/p))

    @property
    def nodes(self) -> list[fx.Node]:
        """Every node this split owns (the cuts and the part views)."""
        return [*self.part_views, *self.cuts]

    def replace_with(self, env: dict, global_bounds: list[int], local_bounds: list[int]) -> None:
        to_local = dict(zip(global_bounds, local_bounds))

        def local(value, node):
            if value is None:
                return None
            value = value + self.width if value < 0 else value
            if value not in to_local:
                raise UnsupportedModelError(f"{where(node)}: offset {value} is not a boundary of {global_bounds}")
            return to_local[value]

        for view in self.part_views:
            parts = shape(view)[-2]
            locals_ = [local(k * self.width // parts, view) for k in range(parts + 1)]
            sizes = {b - a for a, b in zip(locals_, locals_[1:])}
            if len(sizes) != 1 or locals_[0] != 0:
                raise UnsupportedModelError(f"{where(view)}: its {parts} equal parts become {locals_} locally")
            if _last_size(view) != -1:
                _set_last_size(env[view.name], sizes.pop())
        for cut in self.cuts:
            node = env[cut.name]
            if cut.args[0] in self.part_views:
                continue  # part k of the part view: the local view has the same parts, each of the local width
            if node.op == "call_method" and node.target == "chunk":
                continue  # equal parts of the local width: already right
            if node.op == "call_method" and node.target == "split":
                sizes = node.args[1]
                if isinstance(sizes, int):
                    parts = [local(sizes * (i + 1), cut) - local(sizes * i, cut) for i in range(self.width // sizes)]
                    if len(set(parts)) != 1:
                        raise UnsupportedModelError(f"{where(cut)}: equal global parts become unequal locally {parts}")
                    new = parts[0]
                else:
                    starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
                    new = [local(b, cut) - local(a, cut) for a, b in zip(starts, starts[1:])]
                node.args = (node.args[0], new, *node.args[2:])
                continue
            index = node.args[1]  # getitem(x, (Ellipsis, slice(a, b)))
            last = index[-1]
            node.args = (node.args[0], (*index[:-1], slice(local(last.start, cut), local(last.stop, cut), last.step)))


def find_split(projection: Projection, region: str, part_views: bool = False) -> FusedSplit | None:
    """The last-dim cuts of a projection's output reached through reshapes (None: the output is not cut).
    ``part_views``: also take a part view ``view(x, (..., p, -1))`` read only as ``x[..., k, :]`` (a fused gate_up;
    off for attention, whose head views (..., H, D) have the same shape)."""
    cuts, frontier, width, views = [], [projection.out], None, []
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if part_views and is_part_view(user):
                for part in user.users:
                    if not _is_part_index(part):
                        raise UnsupportedModelError(
                            f"{region}: {where(part)} reads the part view {user.name} (shape {shape(user)}) of the "
                            "fused features other than as x[..., k, :]"
                        )
                    cuts.append(part)
                views.append(user)
                width = shape(node)[-1]
            elif is_method(user, SHAPE_METHODS) and user.target not in ("transpose", "permute"):
                frontier.append(user)  # views keep the feature dim last here (checked through the width below)
            elif is_method(user, {"transpose"}) and {_dim(a, user) for a in user.args[1:3]} & {-1}:
                raise UnsupportedModelError(f"{region}: {where(user)} moves the fused feature dim")
            elif is_method(user, {"transpose"}):
                frontier.append(user)
            elif is_method(user, SPLIT_METHODS) or is_call(user, {torch.split, torch.chunk}):
                dim = user.kwargs.get("dim", user.args[2] if len(user.args) > 2 else 0)
                if _dim(dim, user) != -1:
                    raise UnsupportedModelError(f"{region}: {where(user)} splits a fused projection along another dim")
                cuts.append(user)
                width = shape(node)[-1]
            elif user.op == "call_function" and user.target is operator.getitem and is_last_dim_slice(user.args[1]):
                cuts.append(user)
                width = shape(node)[-1]
    return FusedSplit(projection, cuts, width, views) if cuts else None


def is_part_view(node) -> bool:
    """``view``/``reshape`` of (..., W) into (..., p, W/p): the last dim cut into p equal parts (p > 1)."""
    if not is_method(node, {"view", "reshape"}) or not isinstance(node.args[0], fx.Node):
        return False
    before, after = shape(node.args[0]), shape(node)
    return (
        bool(before) and bool(after) and len(after) == len(before) + 1 and tuple(after[:-2]) == tuple(before[:-1])
        and after[-2] > 1 and after[-2] * after[-1] == before[-1] and _last_size(node) in (-1, after[-1])
    )


def _last_size(view: fx.Node):
    """The last size a view/reshape node is called with (an int, or a graph value)."""
    return view.args[1][-1] if len(view.args) == 2 and isinstance(view.args[1], (tuple, list)) else view.args[-1]


def is_part_index(node) -> bool:
    """``getitem(part_view, (..., k, :))``: part k of a part view (see ``_is_part_view``)."""
    return _is_part_index(node) and is_part_view(node.args[0])


def _is_part_index(node) -> bool:
    if not (node.op == "call_function" and node.target is operator.getitem):
        return False
    index = node.args[1]
    return (
        isinstance(index, tuple) and len(index) >= 3 and index[0] is Ellipsis and isinstance(index[-2], int)
        and not isinstance(index[-2], bool) and index[-1] == slice(None)
        and all(i == slice(None) for i in index[1:-2])
    )


def _dim(dim, node) -> int:
    rank = len(shape(node.args[0]) or ())
    return dim - rank if isinstance(dim, int) and dim >= 0 else dim


def is_last_dim_slice(index) -> bool:
    """A getitem index ``(..., a:b)``: a slice of the last dim only."""
    return (
        isinstance(index, tuple) and len(index) >= 2 and index[0] is Ellipsis and isinstance(index[-1], slice)
        and all(i == slice(None) for i in index[1:-1])
    )
