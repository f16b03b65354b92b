"""What lies around an attention core besides its q/k/v/o projections: views with constant head counts, the
output side between the core and o_proj (gates, norms over all heads), and the per-head op vocabulary they share.

Used by the attention matcher (``attention.py``); each piece owns its rewrite.

Head views (pattern ... into ...)
    view(x, B, L, H, D)            (any view/reshape on a head-sharded path whose size names the heads)
        into  view(x, B, L, H_local, D)
    The size that carries the heads is the first one where the view's output shape departs from its input's
    (``(B, L, H*D) -> (B, L, H, D)``: H; ``(B, L, H, D) -> (B, L, H*D)``: H*D). It is scaled by local/global of the
    path's features: q (Q/tpa of Q), kv (the rank's KV heads of K; the values' own head dim on the v path), qkv (a
    fused projection before its split), o (the heads the rank holds after the all-to-all, of Q). -1 (inferred)
    needs nothing. A view to the shape its input already has, every size given (Falcon's ``reshape(B, H, L, D)``
    after a transpose), is dropped: its uses read its input.
    broadcast_to(x, sizes)         (Falcon-40B: a KV head over its group's query heads, ``Broadcast``)
        into  broadcast_to(x, sizes with -1 wherever x already has that size)

Per-group fused qkv (``per_group_qkv``, ``head_select``)
    one projection whose rows are [q_g k_g v_g] per group of g heads (any order of the three parts): GPT-NeoX
    (g = 1, ``view(B, L, H, 3D).chunk(3, -1)``), CodeGen (``view(B, L, mp, 3w).split(w, -1)``, g = w / D heads
    per group, q|v|k), Persimmon (``view(B, L, H, 3, D)[..., i, :]``), Falcon-40B (``GroupSlices``: [q_1..q_g k v]
    per KV group, ``view(B, L, Kc, g+2, D)`` cut within the group, the KV head broadcast over the group). Its rows
    are sharded by whole groups (role ``qkv_heads``); a layout whose TPA slice is not whole groups is refused.

Stacked q|k|v cut by head index (``HeadSlices``, Falcon's multi-query ``query_key_value``)
    view(qkv, B, L, Q+2K, D)[..., :-2, :] / [..., [-2], :] / [..., [-1], :]
        into  the same with the head indices of the rank's local parts (each cut must take whole parts)

Output side (``match_output``; the dataflow from the attention core to its output projection)
    core -> [reshapes, elementwise ops] -> o_proj, where an elementwise op's other operand is one of
      - a value that does not vary over heads (a scalar, a size-1 feature dim): replicated;
      - a gate: the output of another projection of the layer's input inside the attention module, reached
        through per-head ops (``o = attn * sigmoid(gate_proj(x))``, AFMoE / HRM / Laguna / Beam), one gate value
        per feature (Q*D rows) or per head (Q rows); its rows, and 1-D parameters of one value per head or feature
        on its path (Beam's gate_bias), are sharded like o_proj's columns (role ``o_gate``);
      - a 1-D weight as wide as all heads' features (Q*D) of a norm over all heads (BitNet's attn_sub_norm):
        sharded like o_proj's columns (role ``o_norm``);
    and ``mean(x, -1)`` over all heads' features (Q*D, the norm's mean) becomes
        wait(all_reduce(sum(x, -1), "sum", world)) / (Q*D)
    (after the all-to-all the N ranks hold disjoint heads, so the world group sums over all of them). Anything
    else between the core and o_proj is refused naming the node.

    Several cores over the same query (DiffLLaMA's two attention calls, ``cores``) may meet there: concatenated
    along the features (never the heads), and a norm over the last dim of a (B, L, H', F) tensor is per head.
    Heads in parts (``HeadCut``, DiffLLaMA: o1 - lambda * o2 of ``chunk(attn, 2, dim=2)``, query head h with h + Q/2):
    the heads dim cut into p equal parts, each part only through elementwise ops until all p meet in one
    elementwise op, before o_proj. The rank holds the same block of each part (its q rows, and the exchange:
    attention.py), so its local cut pairs the same heads; the parts must match the config's (``Heads.parts``).
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
import torch.fx as fx

from .common import (
    CATS, SHAPE_METHODS, UnsupportedModelError, is_call, is_method, is_pointwise, module_path, shape, where,
)
from .projection import FusedSplit, Projection, is_projection, projection_of

funcol = torch.ops._c10d_functional
VIEWS = {"view", "reshape"}


# -- views with constant head counts ---------------------------------------------------------------------------
@dataclasses.dataclass
class HeadView:
    """A view/reshape on a head-sharded path whose size ``index`` (into the flat size list) counts heads."""

    node: fx.Node
    index: int | None  # None: a view to the shape its input already has (Falcon's reshape(B, H, L, D)): dropped
    path: str  # "q", "kv", "qkv", "o"

    def replace_with(self, env: dict, local: int, total: int) -> None:
        node = env[self.node.name]
        if self.index is None:  # the identity: its uses (and later rewrites, through env) read its input
            node.replace_all_uses_with(node.args[0])
            env[self.node.name] = node.args[0]
            return
        sizes = view_sizes(node)
        value = sizes[self.index]
        if (value * local) % total:
            raise UnsupportedModelError(
                f"{where(self.node)}: its size {value} (heads of the {self.path} path) is not divisible into this "
                f"rank's {local} of {total}"
            )
        sizes[self.index] = value * local // total
        size = _size_node(node)
        if size is not None:  # view(x, torch.Size([...])): the size node is this view's alone (checked in head_view)
            size.args = (list(sizes),)
        elif len(node.args) == 2 and isinstance(node.args[1], (tuple, list)):
            node.args = (node.args[0], tuple(sizes))
        else:
            node.args = (node.args[0], *sizes)


def _size_node(node: fx.Node) -> fx.Node | None:
    """The ``torch.Size([...])`` node of ``view(x, torch.Size([...]))``: how Dynamo records a size tuple with
    symbolic entries (GPT-Neo's ``x.size()[:-1] + (heads, D)`` once the length is dynamic), else None."""
    arg = node.args[1] if len(node.args) == 2 else None
    if is_call(arg, {torch.Size}) and len(arg.args) == 1 and isinstance(arg.args[0], (tuple, list)):
        return arg
    return None


def view_sizes(node: fx.Node) -> list:
    """The sizes a view / reshape node asks for, whether given as one tuple, a ``torch.Size`` node or varargs."""
    size = _size_node(node)
    if size is not None:
        return list(size.args[0])
    if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)):
        return list(node.args[1])
    return list(node.args[1:])


def head_view(node: fx.Node, path: str, width: int) -> HeadView | None:
    """The HeadView of a view/reshape node whose constant sizes name the heads (None: -1 there, no change, or
    the change is not where the path's ``width`` features are: its sizes from there on must multiply to it)."""
    if not is_method(node, VIEWS) or node.kwargs:
        return None
    before, after = shape(node.args[0]), shape(node)
    if before is None or after is None:
        return None
    kept = [i for i, b in enumerate(after) if b != 1]  # size-1 dims (q_len 1, an inserted dim) carry nothing
    squeezed = [a for a in before if a != 1]
    index = next((j for a, j in zip(squeezed, kept) if a != after[j]), None)
    sizes = view_sizes(node)
    if index is None and tuple(before) == tuple(after) and -1 not in sizes and any(
            isinstance(v, int) and v > 1 for v in sizes):
        return HeadView(node, None, path)  # all sizes given (so the global head count, if any), changing nothing
    if index is None or index >= len(sizes) or math.prod(after[index:]) != width:
        return None
    value = sizes[index]
    if isinstance(value, int) and value == -1:
        return None
    if not isinstance(value, int):
        raise UnsupportedModelError(f"{where(node)}: a computed size where the heads are; helix cannot shard it")
    if _size_node(node) is not None and len(_size_node(node).users) != 1:
        raise UnsupportedModelError(f"{where(node)}: its size {_size_node(node).name} is used elsewhere too; helix "
                                    f"cannot change it for this view alone")
    return HeadView(node, index, path)


def path_nodes(start: fx.Node, end: fx.Node) -> set:
    """Nodes that depend on ``start`` and that ``end`` depends on (both included)."""
    ancestors, stack = set(), [end]
    while stack:
        node = stack.pop()
        if node in ancestors or not isinstance(node, fx.Node):
            continue
        ancestors.add(node)
        if node is not start:
            stack.extend(node.all_input_nodes)
    out, stack = set(), [start]
    while stack:
        node = stack.pop()
        if node in out or node not in ancestors:
            continue
        out.add(node)
        stack.extend(node.users)
    return out


def input_views(q: Projection, k: Projection, v: Projection, query: fx.Node, key: fx.Node, value: fx.Node) -> list:
    """HeadViews between the q/k/v projections and the attention (a node on several paths: the fused ``qkv``)."""
    paths = {"q": path_nodes(q.node, query), "k": path_nodes(k.node, key), "v": path_nodes(v.node, value)}
    (_, hq, _, dq), (_, hk, _, dk), dv = shape(query), shape(key), shape(value)[-1]
    views, widths = [], {"q": hq * dq, "kv": hk * dk, "qkv": q.out_features}
    for node in sorted(set().union(*paths.values()), key=lambda n: n._sort_key):
        on = [p for p, nodes in paths.items() if node in nodes]
        path = "qkv" if len(on) > 1 and "q" in on else "q" if on == ["q"] else "kv"  # k = v (k_eq_v): kv
        found = head_view(node, path, hk * dv if on == ["v"] else widths[path]) or broadcast_view(node, path)
        if found is not None:
            views.append(found)
    return views


# -- per-group fused qkv ----------------------------------------------------------------------------------------
def head_select(proj: Projection) -> FusedSplit | None:
    """Persimmon's cut: ``view(..., H, 3, D)`` of the fused output, then ``[..., i, :]`` for i = 0, 1, 2."""
    for view in proj.out.users:
        after = shape(view)
        if not is_method(view, VIEWS) or after is None or len(after) < 2 or after[-2] != 3:
            continue
        cuts = list(view.users)
        if cuts and all(
            is_call(c, {operator.getitem}) and isinstance(c.args[1], tuple) and len(c.args[1]) == 3
            and c.args[1][0] is Ellipsis and isinstance(c.args[1][1], int) and c.args[1][2] == slice(None) for c in cuts
        ) and {c.args[1][1] for c in cuts} == {0, 1, 2}:
            return FusedSplit(proj, cuts, 3 * after[-1])
    return None


@dataclasses.dataclass
class HeadSlices:
    """A stacked q|k|v projection viewed as (B, L, Q+2K, D) and cut along that heads dim by index: Falcon's
    multi-query ``query_key_value`` (``[..., :-2, :]``, ``[..., [-2], :]``, ``[..., [-1], :]``). Each cut must take
    whole parts (q, k or v); ``replace_with`` rewrites its head indices to the rank's local parts (the view's head
    count is a ``HeadView`` of the qkv path)."""

    projection: Projection
    view: fx.Node
    cuts: list  # getitem nodes: a slice, or a one-element list, of the heads dim
    width: int  # the projection's features: one stacked q|k|v ("qkv")
    head_dim: int

    def replace_with(self, env: dict, global_bounds: list[int], local_bounds: list[int]) -> None:
        """``global_bounds`` / ``local_bounds``: the parts' feature offsets (0, Q*D, (Q+K)*D, (Q+2K)*D) and the rank's."""
        d = self.head_dim
        total, to_local = global_bounds[-1] // d, {g // d: l // d for g, l in zip(global_bounds, local_bounds)}

        def local(i, cut):
            i = i + total if i < 0 else i
            if i not in to_local:
                raise UnsupportedModelError(f"{where(cut)}: head {i} is not a boundary of the q|k|v parts "
                                            f"{sorted(to_local)}")
            return to_local[i]

        for cut in self.cuts:
            node = env[cut.name]
            index = node.args[1]
            sel = index[-2]
            if isinstance(sel, slice):
                new = slice(None if sel.start is None else local(sel.start, cut),
                            None if sel.stop is None else local(sel.stop, cut), sel.step)
            else:  # [i]: one head, a whole part of one head (the KV head of multi-query attention)
                i = sel[0] + total if sel[0] < 0 else sel[0]
                if local(i + 1, cut) - local(i, cut) != 1:
                    raise UnsupportedModelError(f"{where(cut)}: takes head {i}, not a whole q, k or v part")
                new = [local(i, cut)]
            node.args = (node.args[0], (*index[:-2], new, index[-1]))


def head_slices(proj: Projection, head_dim: int) -> HeadSlices | None:
    """``view(out, (B, L, H', D))`` of the whole fused output whose only users index its heads dim (see
    ``HeadSlices``), else None."""
    for view in proj.out.users:
        s = shape(view)
        if not is_method(view, VIEWS) or s is None or len(s) != 4 or s[-1] != head_dim or s[-2] * head_dim != \
                proj.out_features:
            continue
        cuts = list(view.users)
        if len(cuts) == 3 and all(is_head_index(c) for c in cuts):
            return HeadSlices(proj, view, cuts, proj.out_features, head_dim)
    return None


def is_head_index(cut: fx.Node) -> bool:
    """``x[..., a:b, :]`` or ``x[..., [i], :]`` (constant ints) on the heads dim of a (B, L, H', D) view."""
    if not is_call(cut, {operator.getitem}) or not isinstance(cut.args[1], tuple) or len(cut.args[1]) < 2:
        return False
    index = cut.args[1]
    lead, sel = index[:-2], index[-2]
    if index[-1] != slice(None) or not (lead == (Ellipsis,) or lead == (slice(None),) * 2):
        return False
    if isinstance(sel, slice):
        return sel.step in (None, 1) and all(isinstance(v, int) or v is None for v in (sel.start, sel.stop))
    return isinstance(sel, list) and len(sel) == 1 and isinstance(sel[0], int)


def per_head_index(node: fx.Node) -> bool:
    """``x[index]`` of a tensor of 4 or more dims that selects only on dims after the first three: the heads are in
    dim 1 or 2 ((B, H, L, D), (B, L, H, D), (B, L, H, 3, D)), so it stays within a head (RoPE's ``x[..., ::2]``,
    partial RoPE's ``x[..., :r]``, Persimmon's ``x[..., i, :]``). An index with None, a tensor or two Ellipses:
    False."""
    if not is_call(node, {operator.getitem}):
        return False
    rank = len(shape(node.args[0]) or ())
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if rank < 4 or any(i is None or isinstance(i, fx.Node) for i in index) or sum(i is Ellipsis for i in index) > 1:
        return False
    at = next((j for j, i in enumerate(index) if i is Ellipsis), None)
    if at is not None:
        index = index[:at] + (slice(None),) * (rank - len(index) + 1) + index[at + 1:]
    return all(i == slice(None) for i in index[:3])


@dataclasses.dataclass
class GroupSlices:
    """Falcon's new decoder architecture (Falcon-40B/180B): the fused rows are, per KV group, [q_1 .. q_g k v] (g
    query heads and their KV head), viewed as (B, L, Kc, g+2, D) and cut by index within each group
    (``[:, :, :, :-2]``, ``[:, :, :, [-2]]``, ``[:, :, :, [-1]]``); the model broadcasts the KV head over its
    group's query heads before the cache (``broadcast_to``: ``broadcast_view``), so the cache holds Q heads. Rows
    sharded by whole groups (role ``qkv_heads``); the cuts index within a group and need no rewrite."""

    projection: Projection
    view: fx.Node
    cuts: list
    width: int  # (g + 2) * D: one group's rows
    group: int  # g

    def check(self, module: str, heads) -> int:
        """g, checking the shape against the heads (the cache holds Q heads: one per query head)."""
        if heads.q % self.group or heads.k != heads.q or heads.dv != heads.d or self.width != (self.group + 2) * heads.d:
            raise UnsupportedModelError(f"{module}: fused qkv {self.projection.name} in groups of {self.group} query "
                                        f"heads + k + v ({self.width} rows each) does not fit {heads}")
        return self.group


def group_slices(proj: Projection, head_dim: int) -> GroupSlices | None:
    """``view(out, (B, L, Kc, g+2, D))`` whose only users take, within each group, its g query heads, its key and its
    value (see ``GroupSlices``), else None."""
    for view in proj.out.users:
        s = shape(view)
        if not is_method(view, VIEWS) or s is None or len(s) != 5 or s[-1] != head_dim or s[-2] < 3 \
                or math.prod(s[2:]) != proj.out_features:
            continue
        parts, cuts = [], list(view.users)
        for cut in cuts:
            index = cut.args[1] if is_call(cut, {operator.getitem}) and isinstance(cut.args[1], tuple) else ()
            lead = index[:3] == (slice(None),) * 3 and len(index) in (4, 5) and index[4:] in ((), (slice(None),))
            sel = index[3] if lead else None
            if isinstance(sel, slice) and sel.step in (None, 1):
                parts.append(tuple(range(s[-2]))[sel])
            elif isinstance(sel, list) and len(sel) == 1 and isinstance(sel[0], int):
                parts.append((sel[0] % s[-2],))
            else:
                parts = None
                break
        g = s[-2] - 2
        if parts is not None and sorted(parts) == [tuple(range(g)), (g,), (g + 1,)]:
            return GroupSlices(proj, view, cuts, s[-2] * head_dim, g)
    return None


def fused_rows(split, heads) -> int:
    """Rows of a fused q|k|v projection: (Q + K) * D + K * Dv, or (Q + 2 Q/g) * D for ``GroupSlices``."""
    if isinstance(split, GroupSlices):
        return (heads.q + 2 * heads.q // split.group) * heads.d
    return (heads.q + heads.k) * heads.d + heads.k * heads.dv


@dataclasses.dataclass
class Broadcast:
    """``broadcast_to(x, sizes)`` on a head-sharded path (Falcon-40B: a KV head over its group's query heads): the
    sizes the input already has become -1 (the rank's local ones), the broadcast sizes (within a group) stay."""

    node: fx.Node
    path: str

    def replace_with(self, env: dict, local: int, total: int) -> None:
        node = env[self.node.name]
        before, sizes = shape(self.node.args[0]), list(node.args[1])
        lead = len(sizes) - len(before)
        node.args = (node.args[0], tuple(-1 if i >= lead and before[i - lead] == v else v for i, v in enumerate(sizes)))


def broadcast_view(node: fx.Node, path: str) -> Broadcast | None:
    if is_call(node, {torch.broadcast_to}) and len(node.args) == 2 and isinstance(node.args[1], (tuple, list)):
        return Broadcast(node, path)
    return None


def per_group_qkv(module: str, proj: Projection, split: FusedSplit, heads) -> int:
    """Heads per group of a per-group interleaved fused qkv (see the module docstring), checking its cuts."""
    if isinstance(split, GroupSlices):
        return split.check(module, heads)
    d, width = heads.d, split.width
    group = width // (3 * d)
    ok = width % (3 * d) == 0 and heads.q % group == 0 and heads.q == heads.k
    for cut in split.cuts:
        if is_method(cut, {"chunk"}):
            ok = ok and cut.args[1] == 3
        elif is_method(cut, {"split"}):
            sizes = cut.args[1]
            ok = ok and (sizes == width // 3 if isinstance(sizes, int) else list(sizes) == [width // 3] * 3)
        elif is_call(cut, {operator.getitem}) and shape(cut.args[0])[-2:] == (3, d):
            ok = ok and cut.args[0] is not proj.out  # head_select
        elif is_call(cut, {operator.getitem}):  # [..., a:b] with a, b thirds of the width (GPT-NeoX-Japanese)
            last = cut.args[1][-1]
            thirds = {None, 0, width // 3, 2 * width // 3, width}
            ok = ok and last.step in (None, 1) and last.start in thirds and last.stop in thirds
        else:
            ok = False
    if not ok:
        raise UnsupportedModelError(
            f"{module}: fused qkv {proj.name} is cut at width {width} by {[c.name for c in split.cuts]}: neither "
            f"stacked q|k|v nor [q k v] interleaved per group of heads of {d} features ({heads})"
        )
    return group


# -- the output side -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class OutputNorm:
    """mean(x, -1) over all heads' features between the core and o_proj."""

    mean: fx.Node
    width: int


@dataclasses.dataclass
class HeadCut:
    """``chunk``/``split`` of the attention output's heads dim into ``parts`` equal parts, read as ``getitem`` i."""

    node: fx.Node
    parts: int
    items: list  # the getitem nodes, one per part


@dataclasses.dataclass
class OutputSide:
    o: Projection
    gates: list  # Projection: gate projections, rows sharded like o's columns
    norms: list  # OutputNorm
    views: list  # HeadView (path "o")
    gate_views: list  # HeadView (path "o") on the gates' own paths
    weights: list  # 1-D placeholders of all heads' features (the norms' weights), sharded like o's columns
    gate_params: list  # 1-D placeholders of one value per head or feature on a gate's path (Beam's gate_bias)
    cut: HeadCut | None = None  # heads in parts (DiffLLaMA)

    @property
    def parts(self) -> int:
        return self.cut.parts if self.cut is not None else 1

    def describe(self) -> str:
        gates = f" gates={[g.name for g in self.gates]}" if self.gates else ""
        cut = f" head_parts={self.cut.parts} at {self.cut.node.name}" if self.cut is not None else ""
        return gates + (f" output_norms={[n.mean.name for n in self.norms]}" if self.norms else "") + cut

    def placements(self):
        out = [(n, "o_gate", kind) for g in self.gates for n, _, kind in g.placements("o_gate")]
        out += [(p, "o_gate", "bias") for p in self.gate_params]
        return out + [(w, "o_norm", "weight") for w in self.weights]

    def nodes(self):
        return [n for g in self.gates for n in (g.weight, g.bias) if n is not None] + self.weights + self.gate_params

    def replace_with(self, graph: fx.Graph, env: dict, ctx, head_dim: int) -> None:
        local, total = ctx.split[ctx.kvp_rank], ctx.heads.q
        for gate in self.gates:
            gate.column_parallel(env, local * gate.out_features // total)
        for view in self.views + self.gate_views:
            view.replace_with(env, local, total)
        if ctx.layout.world_size > 1:
            for norm in self.norms:
                all_reduce_mean(graph, env[norm.mean.name], norm.width, ctx.world_group)


def all_reduce_mean(graph: fx.Graph, mean: fx.Node, width: int, group: str) -> None:
    """mean(x, -1, keepdim) over this rank's features into the mean over every rank's (exact up to fp rounding)."""
    x = mean.args[0]
    keepdim = mean.kwargs.get("keepdim", mean.args[2] if len(mean.args) > 2 else False)
    with graph.inserting_before(mean):
        part = graph.call_function(torch.sum, (x, -1), {"keepdim": keepdim})
        reduced = graph.call_function(funcol.all_reduce.default, (part, "sum", group))
        total = graph.call_function(funcol.wait_tensor.default, (reduced,))
        result = graph.call_function(operator.truediv, (total, float(width)))
    mean.replace_all_uses_with(result)
    graph.erase_node(mean)


def match_output(cores: list, module: str, region: str, gate_source) -> OutputSide:
    """The output side of attention cores over one query (see the module docstring). ``gate_source(node, what)``
    finds the projection a gate operand comes from through per-head ops (the attention matcher's ancestor walk)."""
    core = cores[0]
    heads, head_dim = shape(core)[1], shape(core)[-1]
    width = heads * head_dim
    if any(shape(c) != shape(core) for c in cores):
        raise UnsupportedModelError(f"{region}: attention cores {[c.name for c in cores]} over one query differ in "
                                    f"shape {[shape(c) for c in cores]}")
    region_nodes, frontier, outputs = set(cores), list(cores), []
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in region_nodes or is_method(user, {"view_as"}) and user.args[0] is not node:
                continue  # view_as(gate, attn): only the shape of the attention output
            if is_projection(user):
                outputs.append(user)
                continue
            if is_method(user, {"view"}) and user.users and all(is_call(u, {torch.addmm}) for u in user.users):
                outputs.extend(user.users)  # a Conv1D's input view
                continue
            if not module_path(user).startswith(module):
                raise UnsupportedModelError(
                    f"{region}: {where(user)} uses the attention output outside '{module}' before any output "
                    f"projection; helix expects the attention output to reach only its output projection"
                )
            region_nodes.add(user)
            frontier.append(user)
    outputs = list(dict.fromkeys(outputs))
    if len(outputs) != 1:
        raise UnsupportedModelError(
            f"{region}: the attention output reaches {len(outputs)} projections {[o.name for o in outputs]}; helix "
            f"expects exactly one output projection"
        )
    o = projection_of(outputs[0])
    if o.in_features != width:
        raise UnsupportedModelError(f"{region}: output projection {o.name} takes {o.in_features} features, the "
                                    f"attention gives {heads} heads x {head_dim}")
    dims = _heads_dims(cores, region_nodes, region)
    cut = _head_cut(region_nodes, dims, o, region)
    gates, norms, views, gate_views, weights, gate_params = [], [], [], [], [], []
    for node in sorted(region_nodes - set(cores), key=lambda n: n._sort_key):
        if node is o.in_view or cut is not None and (node is cut.node or node in cut.items):
            continue
        if _per_head_norm(node, dims):
            continue
        if is_method(node, SHAPE_METHODS) or is_call(node, {operator.getitem}) and node.args[0] in region_nodes:
            if is_call(node, {operator.getitem}):
                raise UnsupportedModelError(f"{region}: {where(node)} indexes the attention output")
            found = head_view(node, "o", width)
            if found is not None:
                views.append(found)
            continue
        here = shape(node)
        reduces = is_method(node, {"mean"}) or is_call(node, {torch.mean})
        if reduces:
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            x = shape(node.args[0])
            if x is None or len(x) != 3 or x[-1] != width or dims not in (-1, 2, (-1,), [-1]):
                raise UnsupportedModelError(
                    f"{region}: {where(node)} reduces the attention output other than a mean over all heads' "
                    f"features ({width}); helix does not support it"
                )
            norms.append(OutputNorm(node, width))
            continue
        if not is_pointwise(node):
            raise UnsupportedModelError(
                f"{region}: {where(node)} between the attention and its output projection is not a per-head op; "
                f"each rank holds some heads there"
            )
        for operand in node.all_input_nodes:
            if operand in region_nodes:
                continue
            kind = _operand_kind(operand, here, heads, head_dim)
            if kind == "replicated":
                continue
            if kind == "weight":
                if operand.op != "placeholder":
                    raise UnsupportedModelError(f"{region}: {where(node)} multiplies by a computed tensor {operand.name} "
                                                f"of all heads' features")
                weights.append(operand) if operand not in weights else None
                continue
            gate = gate_source(operand, f"gate of {module}")
            if gate.out_features not in (width, heads):
                raise UnsupportedModelError(
                    f"{region}: gate projection {gate.name} has {gate.out_features} outputs; helix shards a gate "
                    f"of one value per head ({heads}) or per feature ({width})"
                )
            per_head = gate.out_features == heads
            if per_head and (len(here) != 4 or shape(operand)[-1] != 1):
                raise UnsupportedModelError(f"{region}: per-head gate {where(operand)} does not broadcast over the "
                                            f"head dim")
            if all(g.node is not gate.node for g in gates):
                gates.append(gate)
                for n in sorted(path_nodes(gate.node, operand), key=lambda n: n._sort_key):
                    found = head_view(n, "o", gate.out_features)
                    if found is not None:
                        gate_views.append(found)
                    gate_params.extend(p for p in map(_parameter, n.all_input_nodes)
                                       if p is not None and shape(p) in ((heads,), (width,)) and p not in gate_params)
    if weights and not norms:
        raise UnsupportedModelError(f"{region}: weights {[w.name for w in weights]} over all heads' features "
                                    f"without a norm helix understands")
    return OutputSide(o, gates, norms, views, gate_views, weights, gate_params, cut)


_CUTS = {torch.chunk, torch.split, torch.tensor_split}
_NORMS = {torch.nn.functional.rms_norm, torch.rms_norm, torch.nn.functional.layer_norm, torch.layer_norm}


def is_cut(node: fx.Node) -> bool:
    """chunk / split / tensor_split (method or function): a tensor cut into a tuple of parts."""
    return is_method(node, {"chunk", "split", "tensor_split"}) or is_call(node, _CUTS)


def cut_dim(node: fx.Node) -> int:
    """The dim a cut (``is_cut``) cuts along, counted from 0."""
    dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
    return dim % len(node.args[0].meta["example_value"].shape)


def _heads_dims(cores: list, nodes: set, region: str) -> dict:
    """The dim that holds the query heads in each output-side node (None: not known): the cores' dim 1, through
    transposes, permutes, cuts and their parts, views to the same shape, and ops that keep the shape's rank."""
    dims = {c: 1 for c in cores}
    for node in sorted(nodes - set(cores), key=lambda n: n._sort_key):
        ins = [n for n in node.all_input_nodes if n in nodes]
        found = {dims.get(n) for n in ins}
        d = found.pop() if len(found) == 1 else None
        before, after = shape(ins[0]) if ins else None, shape(node)
        if d is None:
            pass
        elif is_method(node, {"transpose"}):
            a, b = (x % len(after) for x in node.args[1:3])
            d = b if d == a else a if d == b else d
        elif is_method(node, {"permute"}):
            order = node.args[1] if isinstance(node.args[1], (tuple, list)) else node.args[1:]
            d = [x % len(after) for x in order].index(d)
        elif is_cut(node) or is_call(node, {operator.getitem}) and is_cut(node.args[0]):
            pass  # a part keeps the dims of the whole
        elif after is None or before is None or len(after) != len(before):
            d = None
        elif is_method(node, VIEWS | {"view_as"}) and tuple(after) != tuple(before):
            d = None
        if is_call(node, CATS):
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            if d is None and len(cores) > 1 or d is not None and dim % len(after) == d:
                raise UnsupportedModelError(
                    f"{region}: {where(node)} concatenates attention outputs along the heads dim (or a dim helix "
                    f"cannot tell from it); helix concatenates them along the features only"
                )
        dims[node] = d
    return dims


def _head_cut(nodes: set, dims: dict, o: Projection, region: str) -> HeadCut | None:
    """The cut of the heads into parts between the cores and o_proj (module docstring), checked; None: no cut."""
    cuts = [n for n in nodes if is_cut(n) and dims.get(n) is not None and cut_dim(n) == dims[n]]
    if not cuts:
        return None
    if len(cuts) > 1:
        raise UnsupportedModelError(f"{region}: the attention heads are cut twice ({[c.name for c in cuts]})")
    cut = cuts[0]
    items, parts = list(cut.users), len(cut.meta["example_value"])
    if not all(is_call(i, {operator.getitem}) and isinstance(i.args[1], int) for i in items) or \
            sorted(i.args[1] % parts for i in items) != list(range(parts)) or \
            len({p.shape[dims[cut]] for p in cut.meta["example_value"]}) != 1:  # heads: static sizes
        raise UnsupportedModelError(f"{region}: {where(cut)} cuts the attention heads into {parts} parts helix cannot "
                                    f"follow (it needs equal parts, each read once as x[i])")
    taken = {i: frozenset({i.args[1] % parts}) for i in items}  # node -> the parts it depends on
    for node in sorted(nodes, key=lambda n: n._sort_key):
        if node in taken or node is cut:
            continue
        found = [taken[n] for n in node.all_input_nodes if n in taken]
        if not found:
            continue
        taken[node] = frozenset().union(*found)
        partial = len(taken[node]) < parts or len(set(found)) > 1  # on some parts, or where parts meet
        if partial and (not is_pointwise(node) or is_call(node, CATS)):
            raise UnsupportedModelError(
                f"{region}: {where(node)} acts on parts {sorted(taken[node])} of the {parts} parts that "
                f"{cut.name} cuts the attention heads into; helix supports elementwise ops on a part and where the "
                f"parts meet"
            )
    fed = [n for n in (o.in_view or o.node).all_input_nodes if n in taken]
    if len(fed) != 1 or len(taken[fed[0]]) != parts:
        raise UnsupportedModelError(f"{region}: the {parts} parts that {where(cut)} cuts the attention heads into do "
                                    f"not all meet before the output projection {o.name}")
    return HeadCut(cut, parts, items)


def _per_head_norm(node: fx.Node, dims: dict) -> bool:
    """An RMSNorm / LayerNorm over the last dim of a (B, L, H', F) output-side tensor whose heads are not last:
    per head (DiffLLaMA's groupnorm over each pair's 2*D features); its weight, if any, is the same for every head."""
    if not is_call(node, _NORMS) or len(shape(node) or ()) != 4:
        return False
    x, normalized = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
    return tuple(normalized or ()) == shape(node)[-1:] and dims.get(x) not in (None, 3)


def _parameter(node: fx.Node) -> fx.Node | None:
    """The placeholder a node reads through indexing and views only (``gate_bias[None, None, :, None]``)."""
    while is_call(node, {operator.getitem}) or is_method(node, SHAPE_METHODS):
        node = node.args[0]
    return node if node.op == "placeholder" else None


def _operand_kind(operand: fx.Node, here, heads: int, head_dim: int) -> str:
    """'replicated' (the same for every head), 'weight' (a 1-D tensor of all heads' features) or 'gate'."""
    val = operand.meta.get("example_value")
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        return "replicated"
    s = tuple(val.shape)
    if len(here) == 3:  # (B, L, H*D): a feature-wide operand varies over heads
        if s[-1] == 1:
            return "replicated"
        return "weight" if len(s) == 1 else "gate"
    if len(here) == 4:  # (B, L, H, D) or (B, H, L, D): the same for every head iff size 1 on the heads dim
        full = (1,) * (4 - len(s)) + s
        dims = [d for d in (1, 2) if here[d] == heads] or [1, 2]
        return "replicated" if all(full[d] == 1 for d in dims) else "gate"
    return "gate"
