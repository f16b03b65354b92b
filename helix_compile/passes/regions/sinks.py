"""Attention sinks: a learned per-head logit s_h in the softmax denominator that attends to nothing.

    o = sum_j exp(x_j) v_j / (exp(s_h) + sum_j exp(x_j)) = o_plain * sigmoid(lse - s_h),  lse = logsumexp_j x_j

Match (in the eager attention chain, ``attention_core._eager_core``), either form:
    concat   softmax(cat([scores, sinks.reshape(1, -1, 1, 1).expand(...)], -1))[..., :-1]        (Flint)
             or with the row max subtracted first (``max_shift``; softmax is invariant to it):
             c = cat([scores, sinks...], -1); softmax(c - c.max(-1, keepdim=True)[0])[..., :-1]   (gpt-oss)
    scale    scores -> logsumexp(-1) -> - sinks.view(1, -1, 1) -> [to] -> sigmoid -> sink_scale, and the
             attention output matmul(p, v) * sink_scale.unsqueeze(-1)[.to]                        (GraniteSWA)
    where ``sinks`` is a 1-D parameter of Q values (one per query head).

Rewrite (exact): the sink is one more partial with lse = s_h and o = 0. The first KVP rank of each KVP group
folds it into its own partial before the exchange:
    lse_0' = logaddexp(lse_0, s_h),  o_0' = o_0 * exp(lse_0 - lse_0')
and the usual LSE merge does the rest (its weights exp(lse_r - lse) then sum to sigmoid(lse - s_h)). The
parameter is sharded like the query heads of the TPA slice (role ``q_heads``).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .common import SHAPE_METHODS, UnsupportedModelError, is_call, is_method, shape, where


def sink_parameter(node: fx.Node, region: str) -> fx.Node:
    """The 1-D placeholder a sink operand reads through views / expand / casts (refused otherwise)."""
    start = node
    while is_method(node, SHAPE_METHODS | {"to", "float"}) or is_call(node, {operator.getitem}):
        node = node.args[0]
    if node.op != "placeholder" or len(shape(node) or ()) != 1:
        raise UnsupportedModelError(f"{region}: the extra softmax logit {where(start)} is not a 1-D per-head parameter")
    return node


def concat_sink(cat: fx.Node, scores: fx.Node, region: str) -> fx.Node | None:
    """``cat([scores, sinks...], -1)`` feeding a softmax whose result is cut back by ``[..., :-1]``: the sink
    parameter (None: not this form)."""
    parts = cat.args[0]
    dim = cat.kwargs.get("dim", cat.args[1] if len(cat.args) > 1 else 0)
    if not (isinstance(parts, (list, tuple)) and len(parts) == 2 and parts[0] is scores and dim in (-1, 3)):
        return None
    if shape(parts[1]) is None or shape(parts[1])[-1] != 1:
        return None
    return sink_parameter(parts[1], region)


def max_shift(node: fx.Node) -> fx.Node | None:
    """``node - node.max(-1, keepdim=True)[0]`` (or ``amax``), the only two uses of ``node``, the difference going
    straight (through casts only) into a softmax over the last dim, which ignores it (softmax(x - m) = softmax(x)
    for any m per row): the subtraction node; None: not this form (an op between them, such as soft-capping,
    would not ignore the shift)."""
    users = list(node.users)
    if len(users) != 2:
        return None
    subs = [u for u in users if is_call(u, {operator.sub, torch.sub}) and len(u.args) == 2 and u.args[0] is node]
    if len(subs) != 1:
        return None
    sub = subs[0]
    peak = next(u for u in users if u is not sub)
    if sub.args[1] is not peak:  # max(...)[0]: the values of (values, indices)
        if not (is_call(sub.args[1], {operator.getitem}) and sub.args[1].args[0] is peak and sub.args[1].args[1] == 0
                and len(peak.users) == 1):
            return None
        reduce_ok = is_method(peak, {"max"}) or is_call(peak, {torch.max})
    else:
        reduce_ok = is_method(peak, {"amax"}) or is_call(peak, {torch.amax})
    dim = peak.kwargs.get("dim", peak.args[1] if len(peak.args) > 1 else None)
    keepdim = peak.kwargs.get("keepdim", peak.args[2] if len(peak.args) > 2 else False)
    if not reduce_ok or peak.args[0] is not node or dim not in (-1, 3, (-1,), [-1]) or keepdim is not True:
        return None
    after = sub
    while len(after.users) == 1 and is_method(next(iter(after.users)), {"to", "float"}):
        after = next(iter(after.users))
    soft = next(iter(after.users)) if len(after.users) == 1 else None
    if not is_call(soft, {torch.nn.functional.softmax, torch.softmax}) or soft.args[0] is not after or soft.kwargs.get(
            "dim", soft.args[1] if len(soft.args) > 1 else None) not in (-1, 3):
        return None
    return sub


def is_drop_last(node: fx.Node) -> bool:
    """``x[..., :-1]``: the concatenated sink column removed from the probabilities."""
    if not is_call(node, {operator.getitem}) or not isinstance(node.args[1], tuple):
        return False
    index = node.args[1]
    return len(index) == 2 and index[0] is Ellipsis and index[1] == slice(None, -1, None)


def scale_sink(lse: fx.Node, matmul: fx.Node, region: str):
    """The GraniteSWA form: (sink parameter, the node ``matmul * sink_scale``) (refused if not exactly that)."""
    if not (is_call(lse, {torch.logsumexp}) or is_method(lse, {"logsumexp"})):
        return None
    dim = lse.kwargs.get("dim", lse.args[1] if len(lse.args) > 1 else None)
    if dim not in (-1, 3, (-1,), [-1]) or lse.kwargs.get("keepdim", False):
        raise UnsupportedModelError(f"{region}: {where(lse)} is not a logsumexp over the keys")
    node, sink = lse, None
    while True:  # lse -> - sinks -> [to] -> sigmoid
        users = list(node.users)
        if len(users) != 1:
            raise UnsupportedModelError(f"{region}: {where(node)} is used by {len(users)} nodes in a sink scale")
        nxt = users[0]
        if is_call(nxt, {operator.sub, torch.sub}) and nxt.args[0] is node and sink is None:
            sink = sink_parameter(nxt.args[1], region)
        elif is_method(nxt, {"to", "float"}):
            pass
        elif (is_call(nxt, {torch.sigmoid}) or is_method(nxt, {"sigmoid"})) and sink is not None:
            break
        else:
            raise UnsupportedModelError(f"{region}: unexpected op in an attention sink scale: {where(nxt)}")
        node = nxt
    node = nxt  # sigmoid -> [unsqueeze(-1)] -> [to] -> mul(matmul, .)
    while True:
        users = list(node.users)
        if len(users) != 1:
            raise UnsupportedModelError(f"{region}: {where(node)} is used by {len(users)} nodes in a sink scale")
        nxt = users[0]
        if is_method(nxt, {"to", "float"}) or is_method(nxt, {"unsqueeze"}) and nxt.args[1] in (-1, 3):
            node = nxt
            continue
        users_mm = list(matmul.users)
        if is_call(nxt, {operator.mul, torch.mul}) and len(users_mm) == 1 and users_mm[0] is nxt and matmul in nxt.args:
            return sink, nxt
        raise UnsupportedModelError(f"{region}: the sink scale {where(node)} does not scale the attention output "
                                    f"{where(matmul)}")


def add_sink(graph: fx.Graph, packed: fx.Node, sinks: fx.Node, head_dim: int, dtype: torch.dtype) -> fx.Node:
    """Fold the sink logits (this rank's TPA heads) into a packed partial (Hq, B, L, D + e): see the docstring."""
    lse_dtype = torch.float32 if dtype.itemsize <= 4 else dtype
    call = graph.call_function
    o = call(operator.getitem, (packed, (Ellipsis, slice(None, head_dim))))
    raw = graph.call_method("contiguous", (call(operator.getitem, (packed, (Ellipsis, slice(head_dim, None)))),))
    lse = graph.call_method("float", (graph.call_method("view", (raw, lse_dtype)),))  # (Hq, B, L, 1)
    s = graph.call_method("view", (graph.call_method("float", (sinks,)), -1, 1, 1, 1))
    merged = call(torch.logaddexp, (lse, s))
    weight = call(torch.exp, (call(operator.sub, (lse, merged)),))  # exp(-inf) = 0 for a partial without keys
    o_new = graph.call_method("to", (call(operator.mul, (graph.call_method("float", (o,)), weight)), dtype))
    if dtype.itemsize == 2:  # the fp32 bits as two 16-bit halves, low first, as the kernel packs them: a view of
        # another element size would need stride 1 on the size-1 LSE dim, which Inductor on CUDA does not keep
        bits = graph.call_method("view", (merged, torch.int32))
        low = call(torch.bitwise_and, (bits, 0xFFFF))
        high = call(torch.bitwise_and, (call(torch.bitwise_right_shift, (bits, 16)), 0xFFFF))
        halves = [graph.call_method("view", (graph.call_method("to", (x, torch.int16)), dtype)) for x in (low, high)]
        lse_new = call(torch.cat, (halves, -1))
    else:
        lse_new = graph.call_method("view", (graph.call_method("to", (merged, lse_dtype)), dtype))
    return call(torch.cat, ([o_new, lse_new], -1))
