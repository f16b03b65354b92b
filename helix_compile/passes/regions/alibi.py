"""Region matcher (part of attention): ALiBi, and the batched-matmul attention form of the ALiBi families (BLOOM).

Match (pattern), called by ``attention_core._find_core`` when the cache keys reach a ``bmm`` / ``baddbmm`` (and by
``attention_core._eager_core`` for the bias MPT adds to its matmul scores: ``alibi_or_none``):
    core    q3 = q.reshape(B*H, -1, D); k3t = keys.reshape(B*H, -1, D).transpose(-1, -2)
            scores = bias.baddbmm(q3, k3t, beta=1, alpha=scale)   (or bmm(q3, k3t) [* scale]; no scale: q3 is
            already scaled, XGLM)
            -> view(B, H, L, S) -> [+ causal mask [-> max(., finfo.min)]] -> softmax -> [to] -> [dropout]
            -> view(B*H, L, S)
            -> bmm(., values.reshape(B*H, -1, D)) -> view(B, H, L, D)      the core is this last view
    bias    ALiBi: slopes * positions, through shape ops (repeat, reshape, view, to, getitem, expand, squeeze)
            slopes     a constant subgraph (torch.full / arange / pow / cat ..., no graph input) of one value per
                       query head, evaluated here once (exactly the model's fp32 values)
            positions  ``arange(n) [+ c]`` (the keys' global positions, up to a constant), or
                       ``(m.cumsum(-1) - 1) * m`` of the 2-D attention_mask m (BLOOM: the key's position among
                       the unmasked keys; passed on as ``alibi_pos``)
            anything else is refused, naming the node
    qkv     per-head interleaved fused projection cut by index: view(B, L, H, 3, D) -> getitem(..., i, :)
            (``IndexSplit``; placed like GPT-NeoX's per-head [q k v])

Rewrite (by ``AttentionMatch.replace_with``): the core as for every attention (partial_attention -> exchange ->
lse_merge), with ``alibi_slopes`` = the slopes of this rank's query heads (its TPA slice) and ``alibi_pos`` (the
2-D node above, or none); the constant head count of the (B, L, H, 3, D) view becomes -1 (the local heads).
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from .attention_masks import check_causal_mask, dropout_is_identity
from .attention_values import cache_source
from .common import UnsupportedModelError, is_call, is_method, shape, where

BMM = {torch.bmm}
BADDBMM = {torch.baddbmm}
# ops that move the bias around without changing which head / key a value belongs to
_BIAS_SHAPE_METHODS = {"repeat", "reshape", "view", "to", "expand", "squeeze", "unsqueeze", "contiguous", "float",
                       "bfloat16", "half", "type_as"}


@dataclasses.dataclass
class Alibi:
    slopes: list  # fp32 values, one per global query head (already times beta / any constant factor)
    positions: fx.Node | None  # (B, S_m) ALiBi positions from the attention mask; None: the keys' global positions
    bias: fx.Node  # the bias operand (for messages)

    def local_slopes(self, first: int, count: int) -> list:
        return self.slopes[first:first + count]


@dataclasses.dataclass
class IndexSplit:
    """A per-head interleaved fused qkv cut by index: view(B, L, H, 3, D) -> getitem(..., i, :) for i = 0, 1, 2."""

    view: fx.Node
    cuts: list  # the three getitem nodes
    width: int  # 3 * D: the per-head width of the fused rows

    def replace_with(self, env: dict) -> None:
        """The view's constant head count (global) -> -1: the rank's local heads."""
        node = env[self.view.name]
        sizes = list(node.args[1]) if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else list(node.args[1:])
        if -1 in sizes:
            return
        sizes[-3] = -1
        node.args = (node.args[0], *sizes)


def find_index_split(out: fx.Node, head_dim: int) -> IndexSplit | None:
    """view(out, (..., H, 3, D)) whose only users are getitem(..., i, :) for i in 0, 1, 2 (BLOOM's fused qkv)."""
    for view in out.users:
        if not is_method(view, {"view", "reshape"}):
            continue
        s = shape(view)
        if s is None or len(s) < 3 or s[-2:] != (3, head_dim):
            continue
        cuts = list(view.users)
        indices = []
        for cut in cuts:
            index = cut.args[1] if cut.op == "call_function" and cut.target is operator.getitem else None
            if not (isinstance(index, tuple) and len(index) == 3 and index[0] is Ellipsis and isinstance(index[1], int)
                    and index[2] == slice(None)):
                return None
            indices.append(index[1] % 3)
        if sorted(indices) == [0, 1, 2]:
            return IndexSplit(view, cuts, 3 * head_dim)
    return None


# -- the bmm form (BLOOM) ------------------------------------------------------------------------------------------
def _strip(node: fx.Node, methods) -> fx.Node:
    while is_method(node, methods):
        node = node.args[0]
    return node


def bmm_core(mm: fx.Node, keys_t: fx.Node, values: fx.Node):
    """(form, core, query, scale, softcap, alibi) for ``mm`` = baddbmm(bias, q3, k3^T) / bmm(q3, k3^T)."""
    if is_call(mm, BADDBMM) or is_method(mm, {"baddbmm"}):
        bias = mm.args[0]
        q3 = mm.kwargs.get("batch1", mm.args[1] if len(mm.args) > 1 else None)
        k3 = mm.kwargs.get("batch2", mm.args[2] if len(mm.args) > 2 else None)
        beta, alpha = mm.kwargs.get("beta", 1.0), mm.kwargs.get("alpha", 1.0)
        if not isinstance(alpha, (int, float)) or not isinstance(beta, (int, float)):
            raise UnsupportedModelError(f"baddbmm attention scores with non-constant alpha/beta: {where(mm)}")
    else:
        bias, (q3, k3), beta, alpha = None, mm.args[:2], 1.0, None
    if k3 is not keys_t:
        raise UnsupportedModelError(f"batched-matmul attention whose keys are not its second operand: {where(mm)}")
    query = _strip(q3, {"reshape", "view"})
    if shape(query) is None or len(shape(query)) != 4:
        raise UnsupportedModelError(f"batched-matmul attention: the query {where(q3)} is not a reshaped (B, H, L, D)")
    alibi = find_alibi(bias, shape(query)[1], float(beta)) if bias is not None else None
    node, masked, scale = mm, False, alpha
    while True:
        users = list(node.users)
        if len(users) != 1:
            raise UnsupportedModelError(f"attention scores are used more than once: {where(node)}")
        nxt = users[0]
        if is_method(nxt, {"view", "reshape"}):
            pass
        elif is_call(nxt, {operator.mul, torch.mul}) and isinstance(nxt.args[1], float) and scale is None:
            scale = nxt.args[1]
        elif is_call(nxt, {operator.add, torch.add}):
            if masked:
                raise UnsupportedModelError(f"attention adds to its scores twice: {where(nxt)}")
            masked = True
            check_causal_mask(nxt.args[1] if nxt.args[0] is node else nxt.args[0], nxt)
        elif is_call(nxt, {torch.nn.functional.softmax, torch.softmax}) or is_method(nxt, {"to", "float", "type_as"}):
            pass
        elif is_call(nxt, {torch.max, torch.maximum}) and masked and _is_dtype_min(nxt.args[1], nxt):
            pass  # XGLM: max(scores + mask, finfo.min), no change where a key is visible
        elif is_call(nxt, {torch.nn.functional.dropout}):
            if not dropout_is_identity(nxt):
                raise UnsupportedModelError(f"attention dropout must be 0 at inference: {where(nxt)}")
        elif is_call(nxt, BMM | {torch.matmul}) or is_method(nxt, {"bmm", "matmul"}):
            if not masked:
                check_causal_mask(None, nxt)
            if cache_source(nxt.args[1]) is not values:
                raise UnsupportedModelError(f"batched-matmul attention does not read the cache values: {where(nxt)}")
            if scale is None:
                scale = 1.0  # the scores are q3 @ k3^T exactly (XGLM scales q after its projection)
            core = nxt
            out = list(core.users)
            if len(out) == 1 and is_method(out[0], {"view", "reshape"}) and shape(out[0]) is not None and len(
                    shape(out[0])) == 4:
                core = out[0]  # (B*H, L, D) -> (B, H, L, D): the output partial attention replaces
            else:
                raise UnsupportedModelError(f"batched-matmul attention output {where(core)} is not viewed as (B, H, L, D)")
            return "bmm", core, query, float(scale), 0.0, alibi
        else:
            raise UnsupportedModelError(f"unexpected op in batched-matmul attention: {where(nxt)}")
        node = nxt


def _is_dtype_min(node, user: fx.Node) -> bool:
    value = _constant(node, {})
    dtype = user.meta["example_value"].dtype if "example_value" in user.meta else None
    return (isinstance(value, torch.Tensor) and value.numel() == 1 and dtype is not None and dtype.is_floating_point
            and value.item() == torch.finfo(dtype).min)


# -- ALiBi ---------------------------------------------------------------------------------------------------------
def _constant(node, cache: dict):
    """The value of a node computed from constants only (no graph input), or None."""
    if not isinstance(node, fx.Node):
        return node
    if node in cache:
        return cache[node]
    value = None
    if node.op in ("call_function", "call_method"):
        args, kwargs, ok = [], {}, True

        def ev(x):
            nonlocal ok
            if isinstance(x, fx.Node):
                v = _constant(x, cache)
                ok = ok and v is not None
                return v
            if isinstance(x, (list, tuple)):
                return type(x)(ev(i) for i in x)
            return x

        args = [ev(a) for a in node.args]
        kwargs = {k: ev(v) for k, v in node.kwargs.items()}
        if ok:
            with torch._subclasses.fake_tensor.unset_fake_temporarily():
                if node.op == "call_function":
                    value = node.target(*args, **kwargs)
                else:
                    value = getattr(args[0], node.target)(*args[1:], **kwargs)
    cache[node] = value
    return value


def _is_arange_positions(node: fx.Node, cache: dict) -> bool:
    """A 1-D constant of consecutive integers (arange(n) + c, in any integer or float dtype), through views."""
    value = _constant(node, cache)
    if not isinstance(value, torch.Tensor) or value.numel() < 1:
        return False
    flat = value.reshape(-1).double()
    if value.numel() != max(value.shape, default=1):  # more than one non-1 dim
        return False
    return bool(torch.all(flat[1:] - flat[:-1] == 1)) if flat.numel() > 1 else True


def _mask_rank_positions(node: fx.Node) -> bool:
    """``(m.cumsum(-1) - 1) * m`` of a 2-D graph input m (through ``to``), the two m the same."""
    if not is_call(node, {operator.mul, torch.mul}):
        return False
    a, b = node.args[:2]
    m = _strip(b, {"to", "long", "int", "float"}) if isinstance(b, fx.Node) else None
    if m is None or m.op != "placeholder" or len(shape(m) or ()) != 2:
        return False
    if not is_call(a, {operator.sub, torch.sub}) or a.args[1] != 1:
        return False
    cs = a.args[0]
    if not is_method(cs, {"cumsum"}) and not is_call(cs, {torch.cumsum}):
        return False
    dim = cs.kwargs.get("dim", cs.args[1] if len(cs.args) > 1 else None)
    return _strip(cs.args[0], {"to", "long", "int", "float"}) is m and dim in (-1, 1)


def alibi_or_none(bias, heads: int) -> Alibi | None:
    """``find_alibi(bias, heads, 1.0)``, or None when ``bias`` is not ALiBi (the eager form's addend: MPT adds its
    ALiBi bias to the scores, then masks them by masked_fill)."""
    if not isinstance(bias, fx.Node):
        return None
    try:
        return find_alibi(bias, heads, 1.0)
    except UnsupportedModelError:
        return None


def find_alibi(bias: fx.Node, heads: int, beta: float) -> Alibi:
    """Recognise ``bias`` as ALiBi (see the module doc) or refuse, naming the node."""
    node = bias
    while True:
        if is_method(node, _BIAS_SHAPE_METHODS):
            node = node.args[0]
        elif node.op == "call_function" and node.target is operator.getitem and (
                _only_new_axes(node.args[1]) or _key_slice(node)):
            node = node.args[0]
        else:
            break
    refuse = UnsupportedModelError(
        f"the attention scores carry an additive bias {where(bias)} that helix does not recognise as ALiBi "
        f"(slopes per head times key positions); helix supports causal masks and ALiBi only"
    )
    if not is_call(node, {operator.mul, torch.mul}) or len(node.args) != 2:
        raise refuse
    cache: dict = {}
    for slopes_node, pos_node in (node.args, node.args[::-1]):
        slopes = _constant(slopes_node, cache)
        if not isinstance(slopes, torch.Tensor) or slopes.numel() != heads:
            continue
        sshape = [s for s in slopes.shape if s != 1]
        if sshape != [heads]:
            continue
        if not isinstance(pos_node, fx.Node):
            continue
        pos_inner = pos_node
        while True:  # positions[:, None, :] and friends
            if pos_inner.op == "call_function" and pos_inner.target is operator.getitem and _only_new_axes(pos_inner.args[1]):
                pos_inner = pos_inner.args[0]
            elif is_method(pos_inner, {"view", "reshape", "unsqueeze", "to", "float"}):
                pos_inner = pos_inner.args[0]
            else:
                break
        _check_head_axis(node, slopes_node, bias, heads)
        values = [float(v) * beta for v in slopes.reshape(-1).float().tolist()]
        if _is_arange_positions(pos_inner, cache):
            return Alibi(values, None, bias)
        if _mask_rank_positions(pos_inner):
            return Alibi(values, pos_inner, bias)
        raise UnsupportedModelError(
            f"ALiBi bias {where(bias)}: its positions {where(pos_inner)} are neither the keys' positions (arange) nor "
            f"their positions among the unmasked keys ((cumsum(mask) - 1) * mask)"
        )
    raise refuse


def _key_slice(node: fx.Node) -> bool:
    """``bias[:, q:, s:]``: new and whole axes, axes the slice leaves whole (MPT's size-1 query axis cut at
    max(0, 1 - query_length) = 0), and the last (key) axis cut from a constant start ``s`` to its end, so the
    keys' positions stay consecutive (MPT cuts its (H, 1, max_seq_len) ALiBi to the cache's length)."""
    index, src, out = node.args[1], shape(node.args[0]), shape(node)
    items = index if isinstance(index, tuple) else (index,)
    if src is None or out is None or Ellipsis in items:
        return False
    axis = 0
    for position, item in enumerate(items):
        if item is None:
            continue
        if not isinstance(item, slice) or item.step not in (None, 1) or item.stop is not None:
            return False
        last, whole = axis == len(src) - 1, isinstance(src[axis], int) and out[position] == src[axis]
        if not (item.start in (None, 0) or whole or (last and isinstance(item.start, int))):
            return False
        axis += 1
    return True


def _only_new_axes(index) -> bool:
    """getitem indices that only add axes or take everything (x[:, None, :], x[..., None])."""
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or i == slice(None) for i in items)


def _check_head_axis(mul: fx.Node, slopes_node: fx.Node, bias: fx.Node, heads: int) -> None:
    """The slopes' head axis must be the one that becomes the bias's head axis: the product is (.., H, .., S) with
    H the slopes' non-1 dim, and the bias is (B*H, 1|L, S) / (B, H, 1|L, S) / (H, 1|L, S) (head fastest in B*H)."""
    out, s_shape, b_shape = shape(mul), shape(slopes_node), shape(bias)
    if out is None or s_shape is None or b_shape is None:
        raise UnsupportedModelError(f"ALiBi bias {where(bias)}: shapes unknown")
    pad = len(out) - len(s_shape)
    axis = pad + [i for i, s in enumerate(s_shape) if s != 1][0]
    if out[axis] != heads or axis >= len(out) - 1 or any(d != 1 for d in out[axis + 1:-1]):
        raise UnsupportedModelError(f"ALiBi bias {where(bias)}: the slopes do not span the heads axis of {where(mul)}")
    ok = (len(b_shape) == 3 and b_shape[0] % heads == 0) or (len(b_shape) == 4 and b_shape[1] == heads)
    if not ok:
        raise UnsupportedModelError(f"ALiBi bias {where(bias)} of shape {b_shape} is not (B*H, L, S) or (B, H, L, S)")
