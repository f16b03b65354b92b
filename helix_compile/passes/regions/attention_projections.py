"""Attention (part): checking the heads. The projections around an attention core (q, k, v behind it, o after it)
and the ops between them, which must keep heads independent: helix gives each rank some heads, so an op that mixes
heads would change its result.

Allowed between a q/k/v projection and the core (``_check_per_head``): reshapes and views, elementwise ops, RoPE
(``rope.py``: interleaved within the last axis, complex views), per-head norms and LayerNorms over head_dim, cuts of
the last dim (a fused qkv, owned by ``projection.find_split`` / ``heads.head_slices``), broadcasts along size-1
dims, and a mean over all heads' features (a norm across heads, OLMo2: ``CrossHeadNorm``, made exact under
tpa > 1 by the rewrite's all-reduce of partial sums). Ops that do not depend on the projection (RoPE's cos/sin
at model level) are replicated values: any op.

Contract
    projection_ancestor(start, module, what, norms, norm_role) -> Projection   the one projection among
                            ``start``'s ancestors inside the attention module; appends the cross-head norms found
                            to ``norms`` (their weights: the 1-D parameters as wide as the projection)
    first_projection_after(node, region) -> Projection                      the first projection after ``node``,
                            only reshapes between (kv-shared readers, MLA)
    refuses (``UnsupportedModelError`` naming the node): no projection or several, an op that may mix heads
                            (an index or a cat over a dim that may hold heads, a reduction over all heads other
                            than a mean on q or k), anything but reshapes between a core and the next projection
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from .common import (
    CATS, REDUCE_METHODS, SHAPE_METHODS, UnsupportedModelError, check_only, is_call, is_method, is_pointwise,
    module_path, order, shape, where,
)
from .heads import is_head_index, per_head_index
from .projection import SPLIT_METHODS, Projection, is_last_dim_slice, is_projection, is_projection_output, projection_of
from .rope import is_complex_view, within_last_axis


@dataclasses.dataclass
class CrossHeadNorm:
    """A norm over all heads' features of q or k (OLMo2): its mean over the sharded features, and its width."""

    mean: fx.Node
    width: int  # global features (heads * D)
    weights: list  # 1-D parameters of that width (sharded like the projection rows)
    role: str  # "q_norm" or "k_norm"


def projection_ancestor(start: fx.Node, attention_module: str, what: str, norms: list, norm_role) -> Projection:
    """The unique projection among the ancestors of ``start`` inside the attention module, every op between them
    per head (ops that do not depend on the projection, e.g. RoPE's cos/sin, are replicated values: any op)."""
    found, stack, seen, inner = [], [start], set(), []
    while stack:
        node = stack.pop()
        if node in seen or not isinstance(node, fx.Node):
            continue
        seen.add(node)
        if is_projection(node) or (is_method(node, {"view"}) and is_projection(node.args[0]) and node.args[0].target is torch.addmm):
            proj = projection_of(node)
            if all(p.node is not proj.node for p in found):
                found.append(proj)
            continue
        if node.op in ("placeholder", "get_attr") or is_method(node, {"size"}):
            continue  # a size (dynamic batch or length) carries no values
        if not module_path(node).startswith(attention_module):
            continue  # e.g. RoPE cos/sin computed at model level: replicated, broadcast over heads
        inner.append(node)
        shape_only = is_method(node, {"view_as", "reshape_as"})  # x.view_as(y): only y's shape
        stack.extend(node.all_input_nodes if not shape_only else [node.args[0]])
    if len(found) != 1:
        raise UnsupportedModelError(
            f"{what}: expected exactly one projection feeding it inside '{attention_module}', found "
            f"{[p.name for p in found]}"
        )
    proj = found[0]
    sharded = {proj.node, proj.out}  # the nodes whose values depend on the projection: these carry heads
    for node in sorted(inner, key=order):
        if any(n in sharded for n in node.all_input_nodes):
            sharded.add(node)
            norm = _check_per_head(node, what)
            if norm is not None:
                norms.append(norm)
    for norm in norms:
        if norm.width == proj.out_features and norm.role is None:
            norm.role = norm_role
    if any(n.role is None for n in norms):
        raise UnsupportedModelError(f"{what}: a norm over all heads' features is only supported on the query and key")
    # 1-D parameters as wide as the projection (the norm weights) are sharded like its rows
    for norm in norms:
        if norm.role == norm_role and not norm.weights:
            norm.weights = [
                p for n in sharded - {proj.node} for p in n.all_input_nodes
                if p.op == "placeholder" and shape(p) == (norm.width,)
            ]
    return proj


def _check_per_head(node: fx.Node, what: str) -> CrossHeadNorm | None:
    """Allow only ops that keep heads independent between a projection and attention (or a cross-head norm)."""
    if within_last_axis(node):
        return None  # interleaved RoPE: stack / cat / repeat_interleave / reshape_as within the last axis (rope.py)
    if is_call(node, {operator.getitem}) and shape(node.args[0]) is not None:  # of a tensor, not a tuple's part
        if per_head_index(node) or _projection_cut(node):
            return None
        raise UnsupportedModelError(
            f"{what}: {where(node)} indexes a dim of {shape(node.args[0])} that may hold the heads; helix shards heads "
            f"across ranks and would change its result"
        )
    if is_call(node, CATS):
        raise UnsupportedModelError(
            f"{what}: {where(node)} concatenates along a dim other than the last of a (B, H, L, D) / (B, L, H, D) "
            f"tensor; helix shards heads across ranks and would change its result"
        )
    if node.op == "call_method" and node.target in SHAPE_METHODS | {"view_as"} or is_pointwise(node):
        return None  # view_as(x, y): y's local shape (a head-sharded y, else a loud shape error)
    if is_complex_view(node):
        return None  # complex RoPE (Llama 4): pairs within a head (rope.py)
    if is_call(node, {torch.broadcast_to}):
        return None  # copies along size-1 dims (Falcon-40B: a KV head over its group), sizes: heads.Broadcast
    if is_method(node, SPLIT_METHODS):  # cuts of the last dim: a fused qkv (checked by FusedSplit) or within a head
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
        if dim in (-1, len(shape(node.args[0]) or ()) - 1):
            return None
    if is_call(node, {torch.chunk, torch.split}) and len(shape(node.args[0]) or ()) == 4:  # gpt-oss's RoPE halves:
        if node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0) in (-1, 3):  # torch.chunk(x, 2, -1)
            return None  # within a head: the last dim of a (B, H, L, D) / (B, L, H, D) tensor is head_dim
    if is_call(node, {torch.nn.functional.layer_norm, torch.layer_norm}):
        x = shape(node.args[0]) or ()
        if len(x) == 4 and tuple(node.args[1]) == x[-1:]:
            return None  # a per-head LayerNorm over head_dim (Persimmon's q/k layernorm): weight of D, replicated
    reduces = (node.op == "call_method" and node.target in REDUCE_METHODS) or is_call(node, {torch.mean, torch.sum})
    if reduces:
        in_shape = shape(node.args[0])
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", None)
        if in_shape is not None and dims in (-1, len(in_shape) - 1, (-1,), [-1]):
            if len(in_shape) == 4:
                return None  # a per-head norm (q_norm / k_norm over head_dim)
            if len(in_shape) == 3 and node.target in ("mean", torch.mean):
                return CrossHeadNorm(node, in_shape[-1], [], None)  # over all heads' features (OLMo2)
    raise UnsupportedModelError(
        f"{what}: {where(node)} is not a per-head op; helix shards heads across ranks and would change its result"
    )


def _projection_cut(node: fx.Node) -> bool:
    """``x[..., a:b]`` or ``x[..., :-2, :]`` / ``x[..., [i], :]`` of a projection's output through views only: a cut
    of its features or heads, which ``find_split`` / ``head_slices`` own (a fused q|k|v, checked and rewritten there;
    a cut of a separate projection's whole width is refused in ``_match_one``)."""
    if not (is_last_dim_slice(node.args[1]) or is_head_index(node)):
        return False
    source = node.args[0]
    while is_method(source, SHAPE_METHODS) and not is_projection_output(source):
        source = source.args[0]
    return is_projection_output(source)


def first_projection_after(node: fx.Node, region: str) -> Projection:
    between = []
    while True:
        users = list(node.users)
        if len(users) != 1:
            raise UnsupportedModelError(
                f"{region}: {where(node)} is used by {len(users)} nodes {[u.name for u in users]}; between the "
                f"attention and its output projection helix expects reshapes only (each rank holds some heads there; "
                f"an op over all heads, such as a norm, is not supported)"
            )
        node = users[0]
        if is_projection(node):
            proj = projection_of(node)
            check_only([b for b in between if b is not proj.in_view], SHAPE_METHODS | {operator.getitem}, region)
            return proj
        between.append(node)
