"""Attention (part): checking the mask. What may stand between an attention core's scores and its softmax besides
the scale: transformers' causal mask, the 2-D attention_mask of padded batches it is built from, dropout that is
the identity.

helix masks keys by their global position itself (p <= t, the layer's window and chunk, and the 2-D mask when
one is given: ``helix::partial_attention``), so the model's own mask must mean exactly that, and is then left
unused by the rewrite.

Contract
    check_causal_mask(mask, attention)   None, or refuses (``UnsupportedModelError`` naming the node) a mask that
                                         is missing (bidirectional attention, torch's top-left ``is_causal``), a
                                         constant, not built from a comparison of positions, or carrying an
                                         additive bias (ALiBi, relative positions)
    mask_operand(form, core)             the mask node a core applies: SDPA's attn_mask, or the addend / masked_fill
                                         mask of the eager scores (None: none)
    find_key_mask(form, core)            the 2-D (B, S_m) attention_mask placeholder that mask is built from (None:
                                         no user mask); refuses any other user mask (4-D, several inputs)
    dropout_is_identity(node)            an F.dropout call with p = 0 or training=False
    fills_min(node)                      ``x.masked_fill(mask, value)`` with the dtype's lowest value or -inf
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .common import UnsupportedModelError, is_call, is_method, shape, where

_COMPARISONS = {operator.le, operator.lt, operator.ge, operator.gt, torch.le, torch.lt, torch.ge, torch.gt}


def check_causal_mask(mask, attention: fx.Node) -> None:
    """Refuse attention whose mask is not transformers' causal (or sliding-window) mask over positions.

    helix masks keys by their global position (p <= t, and the layer's window), so the model's own mask must mean
    exactly that: built from a comparison of positions, carrying no additive bias (ALiBi, relative positions).
    No mask at all over a static cache means bidirectional attention (an encoder used as a decoder) or torch's
    top-left ``is_causal``; neither is what helix computes.
    """
    if mask is None:
        raise UnsupportedModelError(
            f"{where(attention)} attends without a mask over the cache (bidirectional attention, e.g. an encoder "
            f"model without is_decoder=True, or a model whose transformers code builds its causal mask only from "
            f"an attention_mask: pass one, as generate does); helix computes causal attention only"
        )
    if not isinstance(mask, fx.Node):
        raise UnsupportedModelError(f"{where(attention)}: a constant attention mask helix does not understand")
    seen, stack, causal = set(), [mask], False
    while stack and len(seen) < 400:
        node = stack.pop()
        if node in seen or not isinstance(node, fx.Node):
            continue
        seen.add(node)
        if is_call(node, _COMPARISONS) or is_method(node, {"le", "lt", "ge", "gt", "tril", "triu"}):
            causal = True
            continue  # positions compared: what lies before is index arithmetic
        val = node.meta.get("example_value")
        floating = isinstance(val, torch.Tensor) and val.is_floating_point()
        arithmetic = is_call(node, {operator.add, operator.sub, operator.mul, torch.add, torch.mul, torch.sub, torch.baddbmm})
        if floating and (arithmetic or is_method(node, {"add", "mul", "sub", "baddbmm"})):
            raise UnsupportedModelError(
                f"{where(attention)}: its mask carries a bias ({where(node)}), e.g. ALiBi; helix masks by position "
                f"only"
            )
        stack.extend(node.all_input_nodes)
    if not causal:
        raise UnsupportedModelError(
            f"{where(attention)}: its mask is not built from a comparison of positions (not a causal mask helix "
            f"understands)"
        )


def mask_operand(form: str, core: fx.Node) -> fx.Node | None:
    """The mask the attention core applies: SDPA's attn_mask, or the addend of the eager scores."""
    if form == "sdpa":
        mask = core.args[3] if len(core.args) > 3 else core.kwargs.get("attn_mask")
        return mask if isinstance(mask, fx.Node) else None
    node = core.args[0]  # eager: walk back from the probabilities to ``scores + mask``
    if form == "bmm":  # core = view(bmm(probabilities, values))
        node = node.args[0]
    while isinstance(node, fx.Node) and node.op != "placeholder":
        if is_method(node, {"masked_fill"}):  # MPT: scores.masked_fill(mask, min), after its ALiBi bias
            return node.args[1] if isinstance(node.args[1], fx.Node) else None
        if node.op == "call_function" and node.target in (operator.add, torch.add):
            return node.args[1] if isinstance(node.args[1], fx.Node) else None
        if node.op == "call_function" and node.target in (torch.matmul, operator.matmul, torch.bmm, torch.baddbmm):
            return None
        node = node.args[1] if is_call(node, {torch.where}) else node.args[0]  # where(cond, scores, m): the scores
    return None


_SHAPE_ONLY = {torch.zeros_like, torch.ones_like, torch.empty_like}
_SHAPE_ONLY_METHODS = {"new_zeros", "new_ones", "new_empty"}


def find_key_mask(form: str, core: fx.Node) -> fx.Node | None:
    """The 2-D attention_mask placeholder the core's mask is built from (None: no user mask); refuses others.

    When the model is called with a 2-D ``attention_mask`` (B, S_m) (padded batches, ``generate``), HF builds its
    4-D mask from it inside the graph (causal & mask[b, p]); partial attention applies it by global key position
    itself (``key_mask``)."""
    mask = mask_operand(form, core)
    if mask is None:
        return None
    found, stack, seen = [], [mask], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        val = node.meta.get("example_value")
        if not isinstance(val, torch.Tensor):
            continue  # a size (SymInt) read from some input carries no mask values
        if node.op == "placeholder":
            if val.dim() >= 2:
                found.append(node)
            continue
        if is_call(node, _SHAPE_ONLY) or is_method(node, _SHAPE_ONLY_METHODS):
            continue  # its values do not depend on its input's (GIT: token types zeros_like(embeddings))
        stack.extend(node.all_input_nodes)
    if any(shape(n) is not None and len(shape(n)) != 2 for n in found) or len(found) > 1:
        raise UnsupportedModelError(
            f"the attention mask of {where(core)} is built from {[f'{n.name} {shape(n)}' for n in found]}; helix "
            f"supports only the 2-D (batch, length) attention_mask of padded batches"
        )
    return found[0] if found else None


def dropout_is_identity(node: fx.Node) -> bool:
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
    return p in (0.0, 0) or training is False


def fills_min(node: fx.Node) -> bool:
    """``x.masked_fill(mask, value)`` with value the lowest float of x's dtype or -inf (a hidden key), or at or below
    bfloat16's lowest in wider scores (MPT in bf16 fills its fp32 scores, promoted by the fp32 ALiBi bias, with
    ``finfo(bfloat16).min``): exp(value - row max) is 0 there as for float32's lowest."""
    value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value")
    val = node.meta.get("example_value")
    return isinstance(value, float) and isinstance(val, torch.Tensor) and val.is_floating_point() and (
        value == float("-inf") or value == torch.finfo(val.dtype).min
        or (val.dtype.itemsize >= 4 and value <= torch.finfo(torch.bfloat16).min))
