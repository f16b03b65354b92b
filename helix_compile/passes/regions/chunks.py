"""Chunked attention (Llama 4): a query sees only the keys of its own chunk of positions.

Match (for the attention matcher, per layer):
    chunk   from the config: ``layer_types[i] == "chunked_attention"`` -> ``attention_chunk_size`` (C)
    mask    the layer's attention mask must be transformers' chunked one, ``chunked_overlay``:
                (kv_idx - left_padding[b]) // C == (q_idx - left_padding[b]) // C     (and causal, and padding)
            i.e. an ``==`` of two floor divisions by the constant C among the mask's ancestors; a chunked layer
            whose mask has no such comparison (or divides by another chunk size), and a layer the config calls
            full or sliding whose mask compares chunks, are refused: helix would mask by a chunk the model does not
            apply.

Rewrite (exact): partial attention's ``chunk=C`` argument, a per-query lower bound on the keys' global positions:
    key p visible to the query at t  iff  p <= t  and  p >= t - (t - lp[b]) mod C
with lp[b] the leading zeros of the 2-D attention mask (transformers' ``left_padding_tokens``; 0 without a mask),
which partial attention computes from its ``key_mask`` itself. Like a sliding window, every position stays in the
helix cache, sharded along the sequence over kvp; a rank whose shard holds no key of a query's chunk returns
lse = -inf for it and the LSE merge ignores it.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .common import UnsupportedModelError, is_call, where

_FLOORDIV = {operator.floordiv, torch.floor_divide}
_EQ = {operator.eq, torch.eq}


def layer_chunk(config, layer: int | None) -> int:
    """Chunk size of a decoder layer (0: not a chunked-attention layer), as transformers' mask functions apply it."""
    types = getattr(config, "layer_types", None) if config is not None else None
    if types is None or layer is None or types[layer] != "chunked_attention":
        return 0
    chunk = getattr(config, "attention_chunk_size", None)
    if not isinstance(chunk, int) or chunk < 1:
        raise UnsupportedModelError(f"layer {layer} is a chunked-attention layer with attention_chunk_size={chunk!r}; "
                                    f"helix needs a positive chunk size")
    return chunk


def _chunk_comparisons(mask: fx.Node) -> list:
    """The divisors of every ``a // C == b // C`` among the ancestors of ``mask`` (C a constant)."""
    found, stack, seen = [], [mask], set()
    while stack and len(seen) < 400:
        node = stack.pop()
        if node in seen or not isinstance(node, fx.Node):
            continue
        seen.add(node)
        if is_call(node, _EQ) and len(node.args) == 2 and all(is_call(a, _FLOORDIV) for a in node.args):
            found.append(tuple(a.args[1] for a in node.args))
        stack.extend(node.all_input_nodes)
    return found


def check_chunk_mask(mask, attention: fx.Node, chunk: int, module: str) -> None:
    """Refuse a layer whose mask does not apply exactly the chunks ``chunk`` says (see the module doc)."""
    found = _chunk_comparisons(mask) if isinstance(mask, fx.Node) else []
    if chunk and (not found or any(divisors != (chunk, chunk) for divisors in found)):
        raise UnsupportedModelError(
            f"{module}: the config makes it a chunked-attention layer (attention_chunk_size={chunk}) but its mask at "
            f"{where(attention)} compares chunks {found or 'nowhere'} (helix expects transformers' chunked_overlay, "
            f"(kv - left_padding) // {chunk} == (q - left_padding) // {chunk}); helix cannot prove which keys it hides"
        )
    if not chunk and found:
        raise UnsupportedModelError(
            f"{module}: its mask at {where(attention)} compares chunks of positions (divisors {found}) but the config "
            f"does not make it a chunked-attention layer; helix cannot prove which keys it hides"
        )
