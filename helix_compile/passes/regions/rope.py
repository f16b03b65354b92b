"""RoPE's per-head ops on the query and key paths that the attention matcher allows: complex RoPE and ops that
move values only within the last axis (interleaved RoPE).

Complex RoPE (Llama 4's ``apply_rotary_emb``)

Match (pattern), between a q or k projection and the attention core (``attention_projections.projection_ancestor``):
    x (B, L, H, D) -> [float] -> reshape(B, L, H, -1, 2) -> view_as_complex      (B, L, H, D/2) complex
                   -> * freqs_cis[:, :, None, :] -> view_as_real                   (B, L, H, D/2, 2)
                   -> flatten(3)                                                   (B, L, H, D)
    ``view_as_complex`` pairs the last dim of 2 (inside one head, the reshape only splits D) and ``view_as_real``
    unpairs it: both keep every dim before the last, heads included, so they are per-head ops when their input has
    the heads' dims (4-D or more). The reshape names the head count H as a constant size while it splits D
    (``heads.head_view`` finds no head view in it: its first changed size is D's): ``complex_views`` claims it.

Rewrite (``heads.HeadView``): reshape(x, B, L, H, -1, 2)  into  reshape(x, B, L, H_local, -1, 2), H_local the
rank's heads of the path (q: Q/tpa; kv: the rank's KV heads). The multiplication by freqs_cis (one value per
position and frequency, broadcast over heads) is an elementwise op with a replicated operand.

Within the last axis (``within_last_axis``; interleaved rotate-half: GLM, RoFormer)
    stack([-x[..., 1::2], x[..., ::2]], dim=-1)                                    (B, H, L, D/2, 2)
        .reshape_as(x)  (or flatten(-2), view(..., -1))                            (B, H, L, D)
    The last axis of a tensor with the heads' dims (4-D or more) is within a head (head_dim, or part of it). Strided
    slices of it (``heads.per_head_index``) and negation are per element; a stack on a new last axis, a cat or a
    repeat_interleave along the last axis, and a reshape_as that only merges trailing axes back into the last keep
    every dim before the last, heads included: per head, and the same on a rank's local heads (reshape_as takes
    its shape from a local tensor). Needs no rewrite. Any other stack / cat / repeat_interleave / reshape_as on a
    head-sharded path is refused by the matcher, by name.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from .common import CATS, is_call, is_method, shape
from .heads import VIEWS, HeadView, path_nodes, view_sizes

_COMPLEX = {torch.view_as_complex, torch.view_as_real}


def is_complex_view(node: fx.Node) -> bool:
    """``view_as_complex`` / ``view_as_real`` of a tensor with the heads' dims (see the module doc)."""
    return is_call(node, _COMPLEX) and len(shape(node.args[0]) or ()) >= 4


def within_last_axis(node: fx.Node) -> bool:
    """A stack on a new last axis, a cat or repeat_interleave along the last axis, or a reshape_as that only merges
    trailing axes back into the last, of tensors with the heads' dims (4-D or more; see the module doc)."""
    if is_call(node, {torch.stack}) and node.args and isinstance(node.args[0], (tuple, list)) and node.args[0]:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        rank = len(shape(node.args[0][0]) or ())
        return rank >= 4 and dim in (-1, rank)
    if is_call(node, CATS) and node.args and isinstance(node.args[0], (tuple, list)) and node.args[0]:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        rank = len(shape(node.args[0][0]) or ())
        return rank >= 4 and dim in (-1, rank - 1)  # rotate_half's cat((-x2, x1), -1), partial RoPE's pass-through
    if is_method(node, {"repeat_interleave"}):
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else None)
        rank = len(shape(node.args[0]) or ())
        return rank >= 4 and dim in (-1, rank - 1)
    if is_method(node, {"reshape_as"}) and len(node.args) == 2 and not node.kwargs:
        before, after = shape(node.args[0]), shape(node.args[1])
        if before is None or after is None or len(after) < 4 or len(before) <= len(after):
            return False
        kept = len(after) - 1
        return tuple(before[:kept]) == tuple(after[:kept]) and math.prod(before[kept:]) == after[-1]
    return False


def _pair_split(node: fx.Node) -> int | None:
    """The index of the heads' size in a view (B, L, H, D) -> (B, L, H, D/2, 2) that splits only the last dim and
    names H as a constant (None: not such a view, or H is -1)."""
    if node.op != "call_method" or node.target not in VIEWS or node.kwargs:
        return None
    before, after = shape(node.args[0]), shape(node)
    if before is None or after is None or len(before) < 3 or len(after) != len(before) + 1:
        return None
    if tuple(after[:-2]) != tuple(before[:-1]) or after[-1] != 2 or after[-2] * 2 != before[-1]:
        return None
    sizes, index = view_sizes(node), len(before) - 2
    if len(sizes) != len(after) or not isinstance(sizes[index], int) or sizes[index] == -1:
        return None
    return index


def complex_views(q, k, v, query: fx.Node, key: fx.Node, value: fx.Node) -> list:
    """HeadViews of the pair-splitting reshapes before ``view_as_complex`` on the q and k (and v) paths."""
    views = []
    for proj, end, path in ((q, query, "q"), (k, key, "kv"), (v, value, "kv")):
        if proj is None:
            continue
        for node in sorted(path_nodes(proj.node, end), key=lambda n: n._sort_key):
            index = _pair_split(node)
            if index is not None and any(is_call(u, {torch.view_as_complex}) for u in node.users):
                if all(view.node is not node for view in views):
                    views.append(HeadView(node, index, path))
    return views
