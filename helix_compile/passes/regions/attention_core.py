"""Attention (part): finding the core. From a cache write to the attention nodes that read its keys, and what
each one computes (its form, query, scale, soft-cap, ALiBi bias, sink and value route).

Forms (the core is the node whose output is the attention output (B, Hq, L, D)):
    sdpa    scaled_dot_product_attention(q, repeat_kv(keys), repeat_kv(values), mask[, scale])
    eager   matmul(q, k^T) (or baddbmm(zeros, q, k^T, alpha=scale)) -> [- row max] -> *scale | /sqrt(D)
            -> [/softcap -> tanh -> *softcap] -> [+ALiBi] -> [+mask | .masked_fill(mask, min) | where(mask, s, min)]
            -> softmax -> [to] -> [dropout] -> matmul(., v); attention sinks in either form of ``sinks.py``
    bmm     the (B*H, L, D) batched-matmul form with an optional ALiBi bias (BLOOM, XGLM): ``alibi.bmm_core``
The keys and values are reached from the cache placeholders through repeat_kv views (and fp32 casts); masks are
checked by ``attention_masks.py``, values routed by ``attention_values.py``.

Contract
    find_cores(write) -> (own, readers)   each a list of (form, core, query, scale, softcap, alibi, sink, route):
                        the cores in the writing module (several only over one query, one scale, with neither ALiBi
                        nor sinks: DiffLLaMA), and those of kv-shared readers in other modules (Gemma 3n)
    refuses (``UnsupportedModelError`` naming the node): a cache no attention reads, attention dropout, scores
                        used twice, soft-capping or scaling helix does not understand, any other op in the chain,
                        a second read of the cache in the writing module
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from .alibi import BADDBMM, BMM, alibi_or_none, bmm_core
from .attention_masks import check_causal_mask, dropout_is_identity, fills_min
from .attention_values import ValueRoute, value_route
from .common import SHAPE_METHODS, UnsupportedModelError, is_call, is_method, module_path, order, shape, where
from .sinks import concat_sink, is_drop_last, max_shift, scale_sink
from .where_mask import check_where_mask

SDPA_TARGETS = {torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention}
KV_WRITE = {torch.ops.helix.kv_write, torch.ops.helix.kv_write.default}  # Dynamo records the packet
MATMUL = {torch.matmul, operator.matmul}  # ``a @ b`` (Falcon's eager attention) traces to operator.matmul
DIV = {operator.truediv, operator.itruediv, torch.div}  # ``scores /= sqrt(D)`` (Falcon): operator.itruediv


def find_cores(write: fx.Node):
    """([the writer's cores], [cores of kv-shared readers]) among the attentions over the cache ``write`` fills, each
    as (form, core, query, scale, softcap, alibi, sink, route): the writer's are those in the write's module (or
    the only one); several there must share one query, each over its own values (DiffLLaMA's two calls)."""
    keys, values = write.args[:2]
    cores = _find_core(keys, values, write)
    module = module_path(write)
    own = [c for c in cores if module_path(c[1]) == module] if len(cores) > 1 else cores
    own.sort(key=lambda c: order(c[1]))
    same = len({(c[0], c[2], c[3], c[4]) for c in own}) == 1 and all(c[5] is None and c[6] is None for c in own)
    if not own or len(own) > 1 and not same:
        raise UnsupportedModelError(
            f"the cache written by {where(write)} is read by {len(cores)} attentions "
            f"{[where(c[1]) for c in cores]}, {len(own)} of them in the writing module; helix expects one there, or "
            f"several over one query with one scale and neither ALiBi nor sinks (the others read it as kv-shared "
            f"layers)"
        )
    readers = [c for c in cores if c not in own]
    for c in readers:
        if module_path(c[1]).startswith(module) or not module_path(c[1]):
            raise UnsupportedModelError(f"{where(c[1])} reads the cache written by {where(write)} a second time")
    return own, readers


def _find_core(keys: fx.Node, values: fx.Node, write: fx.Node) -> list:
    """Every (form, core, query, scale, softcap, alibi, sink, route) of an attention that reads the cache placeholders."""
    found = []
    for user in _repeat_kv_users(keys):
        if user.op == "call_function" and user.target in SDPA_TARGETS:
            query, value = user.args[0], user.args[2] if len(user.args) > 2 else user.kwargs["value"]
            route = value_route(value, values, keys, user)
            if user.kwargs.get("dropout_p", 0.0) not in (0.0, 0):
                raise UnsupportedModelError(f"attention dropout must be 0 at inference: {where(user)}")
            mask = user.kwargs.get("attn_mask", user.args[3] if len(user.args) > 3 else None)
            check_causal_mask(mask, user)
            scale = user.kwargs.get("scale")
            if scale is None:
                scale = 1.0 / math.sqrt(shape(query)[-1])
            found.append(("sdpa", user, query, float(scale), 0.0, None, None, route))
        elif user.op == "call_method" and user.target == "transpose":
            for mm in user.users:
                if mm.op == "call_function" and mm.target in MATMUL and mm.args[1] is user or (
                        is_call(mm, {torch.baddbmm}) and len(mm.args) > 2 and mm.args[2] is user and _zero_init(mm)):
                    found.append(_eager_core(mm, values, keys))  # GPT-NeoX-Japanese: baddbmm(zeros, q, k^T, alpha)
                    break
                if is_call(mm, BMM | BADDBMM) or is_method(mm, {"bmm", "baddbmm"}):  # BLOOM: (B*H, L, D) batched
                    form, core, *rest = bmm_core(mm, user, values)  # matmuls, ALiBi through baddbmm's input
                    found.append((form, core, *rest, None, ValueRoute(core, values, values, [])))
                    break
    if found:
        return found
    raise UnsupportedModelError(
        f"the cache write {where(write)} is not followed by an attention helix understands (SDPA or "
        f"matmul-softmax-matmul over the whole cache)"
    )


def _repeat_kv_users(placeholder: fx.Node):
    """Nodes that consume the cache (directly or through repeat_kv views), excluding the write itself."""
    out, frontier = [], [placeholder]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if (user.op == "call_method" and user.target in SHAPE_METHODS - {"transpose"}) or (
                user.op == "call_function" and user.target is operator.getitem
            ) or _is_float_cast(user):
                frontier.append(user)
            elif user.op == "call_function" and user.target in KV_WRITE:
                continue
            else:
                out.append(user)
    return out


def _is_float_cast(node: fx.Node) -> bool:
    """``x.float()`` / ``x.to(torch.float32)``: partial attention computes in fp32 anyway (Flint, GPT-Neo)."""
    return is_method(node, {"float"}) or (is_method(node, {"to"}) and node.args[1:] == (torch.float32,) and not node.kwargs)


def _zero_init(mm: fx.Node) -> bool:
    """baddbmm's input is zeros (scores = alpha * q k^T), not a bias such as BLOOM's ALiBi."""
    init = mm.args[0]
    return is_call(init, {torch.zeros}) or is_method(init, {"zero_"})


def _baddbmm_scores(mm: fx.Node):
    """(query (B, H, L, D), scale) of ``baddbmm(zeros, q.view(B*H, L, D), k^T, beta=1, alpha=scale)``."""
    init, q3 = mm.args[0], mm.args[1]
    beta, alpha = mm.kwargs.get("beta", 1), mm.kwargs.get("alpha", 1)
    zeros = is_call(init, {torch.zeros}) or is_method(init, {"zero_"})
    if not zeros or beta not in (0, 1, 0.0, 1.0) or not isinstance(alpha, (int, float)) or not is_method(q3, {"view"}):
        raise UnsupportedModelError(f"eager attention scores {where(mm)}: a baddbmm helix does not understand (it "
                                    f"needs baddbmm(zeros, q, k^T, beta=1, alpha=scale))")
    query = q3.args[0]
    if len(shape(query) or ()) != 4:
        raise UnsupportedModelError(f"eager attention scores {where(mm)}: the query is not a (B, H, L, D) view")
    return query, float(alpha)


def _eager_core(matmul: fx.Node, values: fx.Node, keys: fx.Node):
    """(form, core, query, scale, softcap, alibi, sink, route) of matmul(q, k^T) -> *scale -> [/c -> tanh -> *c]
    -> [+ALiBi] -> [+mask | .masked_fill(mask, min)] -> softmax -> [to] -> [dropout] -> matmul(., v), with an
    attention sink in either form of ``sinks.py`` (MPT: scores + ALiBi bias, then masked_fill by the causal mask);
    v from the cache's ``values`` (``value_route``)."""
    query, node, scale, softcap, capping, masked = matmul.args[0], matmul, None, 0.0, None, False
    sink, sink_lse, alibi = None, None, None
    if is_call(matmul, {torch.baddbmm}):  # baddbmm(zeros, q.view(B*H, L, D), k^T, beta=1, alpha=scale)
        query, scale = _baddbmm_scores(matmul)
    while _is_float_cast(query):
        query = query.args[0]
    while True:
        shifted = _max_shift(node)
        if shifted is not None:  # scores - scores.max(-1, keepdim=True).values: softmax is unchanged (MiMo-V2-Flash)
            node = shifted
            continue
        users = list(node.users)
        lse = [u for u in users if is_call(u, {torch.logsumexp}) or is_method(u, {"logsumexp"})]
        if len(users) == 2 and len(lse) == 1 and sink_lse is None:
            sink_lse = lse[0]  # GraniteSWA's sink scale: sigmoid(logsumexp(scores) - sink)
            users.remove(sink_lse)
        if sink is not None and is_call(node, {torch.cat}) and max_shift(node) is not None:
            node = max_shift(node)  # gpt-oss: cat - cat.max(-1, keepdim=True)[0] before the softmax, which ignores it
            continue
        if len(users) != 1:
            raise UnsupportedModelError(f"eager attention scores are used more than once: {where(node)}")
        nxt = users[0]
        if is_call(nxt, {operator.mul, torch.mul}) and isinstance(nxt.args[1], float):
            if capping is not None:  # the second half of soft-capping: tanh(s / c) * c
                if capping[1] != "tanh" or nxt.args[1] != capping[0]:
                    raise UnsupportedModelError(f"eager attention: soft-capping helix does not understand at {where(nxt)}")
                softcap, capping = capping[0], None
            elif scale is None:
                scale = nxt.args[1]
            else:
                raise UnsupportedModelError(f"eager attention scaled twice: {where(nxt)}")
        elif is_call(nxt, DIV) and isinstance(nxt.args[1], float) and scale is not None:
            capping = (nxt.args[1], "div")  # Gemma 2: scores / softcap -> tanh -> * softcap
        elif is_call(nxt, DIV) and isinstance(nxt.args[1], float):
            scale = 1.0 / nxt.args[1]  # scores / sqrt(D)
        elif is_call(nxt, {torch.tanh}) or is_method(nxt, {"tanh"}):
            if capping is None or capping[1] != "div":
                raise UnsupportedModelError(f"eager attention: tanh outside soft-capping at {where(nxt)}")
            capping = (capping[0], "tanh")
        elif capping is not None:
            raise UnsupportedModelError(f"eager attention: incomplete soft-capping before {where(nxt)}")
        elif is_call(nxt, {operator.add, torch.add}):
            addend = nxt.args[1] if nxt.args[0] is node else nxt.args[0]
            bias = alibi_or_none(addend, shape(query)[1]) if alibi is None and not masked else None
            if bias is not None:
                alibi = bias  # MPT: the ALiBi bias added before the mask
            elif masked:
                raise UnsupportedModelError(f"eager attention adds to its scores twice (a bias such as ALiBi?): {where(nxt)}")
            else:
                masked = True  # the causal mask; helix masks by global positions itself
                check_causal_mask(addend, nxt)
        elif is_method(nxt, {"masked_fill"}) and not masked and fills_min(nxt):
            masked = True  # MPT: scores.masked_fill(causal_mask, finfo.min), True where a key is hidden
            check_causal_mask(nxt.args[1], nxt)
        elif is_call(nxt, {torch.nn.functional.softmax, torch.softmax}):
            pass
        elif is_call(nxt, {torch.cat}) and sink is None and sink_lse is None and concat_sink(nxt, node, "attention"):
            sink = concat_sink(nxt, node, f"eager attention at {where(nxt)}")  # Flint: cat([scores, sinks], -1)
        elif sink is not None and is_drop_last(nxt):
            pass  # [..., :-1]: the sink's column dropped from the probabilities
        elif is_method(nxt, {"to", "float", "type_as"}):
            pass
        elif is_call(matmul, {torch.baddbmm}) and node is matmul and is_method(nxt, {"view"}) and len(shape(nxt)) == 4:
            pass  # the (B*H, L, S) scores viewed back as (B, H, L, S)
        elif is_call(nxt, {torch.where}):
            check_where_mask(nxt, node)  # GPT-Neo: where(tril bias[...], scores, min), implied by the causal mask
        elif is_call(nxt, {torch.nn.functional.dropout}):
            if not dropout_is_identity(nxt):
                raise UnsupportedModelError(f"attention dropout must be 0 at inference: {where(nxt)}")
        elif is_call(nxt, MATMUL):
            if not masked:
                check_causal_mask(None, nxt)
            route = value_route(nxt.args[1], values, keys, nxt)
            core = nxt
            if sink_lse is not None:
                sink, core = scale_sink(sink_lse, nxt, f"eager attention at {where(nxt)}")
            route.core = core
            return "eager", core, query, float(scale if scale is not None else 1.0), float(softcap), alibi, sink, route
        else:
            raise UnsupportedModelError(f"unexpected op in eager attention: {where(nxt)}")
        node = nxt


def _max_shift(node: fx.Node) -> fx.Node | None:
    """The ``sub`` node of ``node - node.max(dim=-1, keepdim=True).values`` when those are ``node``'s only users (the
    row maximum subtracted before the softmax, for bf16 stability: the probabilities do not change), else None."""
    users = list(node.users)
    if len(users) != 2:
        return None
    peak = next((u for u in users if is_method(u, {"max", "amax"}) or is_call(u, {torch.max, torch.amax})), None)
    sub = next((u for u in users if is_call(u, {operator.sub, torch.sub}) and u.args[0] is node), None)
    if peak is None or sub is None or peak.args[0] is not node:
        return None
    dim = peak.kwargs.get("dim", peak.args[1] if len(peak.args) > 1 else None)
    keepdim = peak.kwargs.get("keepdim", peak.args[2] if len(peak.args) > 2 else False)
    if dim not in (-1, (-1,), [-1], len(shape(node) or ()) - 1) or keepdim is not True:
        return None
    value = sub.args[1]
    if peak.target in ("max", torch.max):  # max(dim) returns (values, indices): .values is getitem 0
        if not (is_call(value, {operator.getitem}) and value.args == (peak, 0) and len(peak.users) == 1):
            return None
    elif value is not peak:
        return None
    return sub
