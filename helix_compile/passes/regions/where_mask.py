"""Score masks of the form ``torch.where(cond, scores, min)`` that helix can prove add nothing to the causal mask.

partial attention masks keys by their global position itself (p <= t, and the layer's window); a ``where`` over
the eager scores is therefore dropped only when helix proves that every key the causal mask lets through also
passes ``cond``. Anything else is refused by name (``UnsupportedModelError``), never ignored.

Match (in the eager attention chain, ``attention_core._eager_core``):
    where(bias[:, :, S - L : S, :S], scores, m)          (GPT-Neo's global layers)
    scores  the (B, H, L, S) scores: L queries over the S positions of the static cache
    bias    a bool buffer (1, 1, P, P), P >= S, whose live value (the placeholder's Dynamo ``GraphArg``) is
            exactly ``tril(ones(P, P))``: row r lets keys 0..r through
    m       a constant at or below the lowest value of the scores' dtype (-inf or finfo.min)

Why it is exact: query l of a call sits at position t_l = c + l, where c <= S - L is the number of tokens cached
before the call (the helix runtime refuses a call that would not fit); its row of the slice is r_l = S - L + l
>= t_l, so every key the causal mask lets through (p <= t_l) passes ``cond`` too, and the keys ``cond`` masks
(p > r_l >= t_l) are masked by the model's own causal mask as well, which the matcher requires to be present
(an additive mask that is checked causal; a where alone is not a causal mask by position). So on the keys that
count the where is the identity, and helix applies the causal mask itself.

Refused:
    GPT-Neo's local layers: bias = tril(ones) ^ tril(ones, -w), a window of w keys ending at row r_l = S - L + l,
        the end of the static cache, not at the query's position t_l; on a static cache (transformers' own
        included) that window misses the cached keys until the cache is almost full, and the scores of every
        key are then the constant m: the result depends on max_cache_len, and no per-position window (what
        partial attention computes) reproduces it
    any other buffer value, a condition that is not such a slice of a placeholder, or another fill value
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .common import UnsupportedModelError, is_call, module_path, shape, where


def check_where_mask(node: fx.Node, scores: fx.Node) -> None:
    """Return if ``node = torch.where(cond, scores, m)`` is implied by the causal mask (see the module doc);
    refuse otherwise, naming the node and what was found."""
    region = f"eager attention masks its scores with {where(node)}"
    args = list(node.args) + [None] * (3 - len(node.args))
    cond, kept, fill = args[:3]
    if node.kwargs or kept is not scores or not isinstance(cond, fx.Node):
        raise UnsupportedModelError(f"{region}: helix understands only where(mask, scores, min)")
    dims = shape(scores)
    if dims is None or len(dims) != 4:
        raise UnsupportedModelError(f"{region}: the scores are not (batch, heads, queries, keys)")
    length, keys = dims[2], dims[3]
    _check_fill(fill, scores, region)
    bias, rows, cols = _buffer_slice(cond, region)
    value = _live(bias, region)
    size = value.shape[-1]
    if value.dtype != torch.bool or tuple(value.shape) != (1, 1, size, size) or not isinstance(keys, int) or keys > size:
        raise UnsupportedModelError(
            f"{region}: the mask {where(bias)} is {tuple(value.shape)} {value.dtype}; helix proves only a bool "
            f"(1, 1, P, P) buffer with P >= the {keys} cached positions"
        )
    start, stop = rows.start, rows.stop
    if not (_equal(stop, keys) and _equal(start, keys - length)) or cols.start not in (None, 0) or not (
            _equal(cols.stop, keys) or (cols.stop is None and size == keys)) or rows.step is not None or cols.step is not None:
        raise UnsupportedModelError(
            f"{region}: the mask takes rows {_text(rows)} and columns {_text(cols)} of {where(bias)}; helix proves "
            f"only rows [S - L, S) and columns [0, S) (S = {keys} cached positions, L = the queries)"
        )
    causal = torch.ones(size, size, dtype=torch.bool).tril()
    if torch.equal(value[0, 0].cpu(), causal):
        return  # every causal key passes: the where is the identity where it counts (module doc)
    window = _window(value[0, 0].cpu(), causal)
    if window is not None:
        raise UnsupportedModelError(  # the reason first: tables of results cut long messages
            f"{module_path(node)}: local attention over a window of {window} keys that ends at the end of the static "
            f"cache, not at the query's position (GPT-Neo's local layer: where(bias[:, :, S-L:S, :S], scores, min), "
            f"bias = tril(ones) ^ tril(ones, -{window}), S = {keys}): on a static cache it sees none of the cached "
            f"keys until the cache is nearly full and transformers' own StaticCache gives results that depend on "
            f"max_cache_len; helix computes sliding windows by position only. At {where(node)}"
        )
    raise UnsupportedModelError(
        f"{region}: its mask {where(bias)} is not tril(ones({size}, {size})), a causal mask helix can prove"
    )


def _check_fill(fill, scores: fx.Node, region: str) -> None:
    """The fill value is a constant at or below the lowest finite value of the scores' dtype."""
    dtype = scores.meta["example_value"].dtype
    value = fill
    if is_call(fill, {torch.tensor}) and len(fill.args) == 1 and isinstance(fill.args[0], (int, float)):
        value = fill.args[0]
    if not isinstance(value, (int, float)) or not value <= torch.finfo(dtype).min:
        raise UnsupportedModelError(
            f"{region}: it fills masked scores with {fill if not isinstance(fill, fx.Node) else where(fill)}, not a "
            f"constant at or below {torch.finfo(dtype).min} (the lowest {dtype} value)"
        )


def _buffer_slice(cond: fx.Node, region: str):
    """(placeholder, row slice, column slice) of ``cond = placeholder[:, :, rows, cols]``."""
    index = cond.args[1] if is_call(cond, {operator.getitem}) else None
    if not (isinstance(index, tuple) and len(index) == 4 and all(isinstance(i, slice) for i in index)
            and index[0] == slice(None) and index[1] == slice(None) and cond.args[0].op == "placeholder"):
        raise UnsupportedModelError(
            f"{region}: its mask {where(cond)} is not a slice [:, :, rows, cols] of a buffer (helix proves only "
            f"such a slice of a causal buffer)"
        )
    return cond.args[0], index[2], index[3]


def _live(bias: fx.Node, region: str) -> torch.Tensor:
    """The buffer's value: Dynamo records the live tensor of each graph input in its ``GraphArg``."""
    arg = bias.meta.get("grapharg")
    value = getattr(arg, "example", None) if arg is not None else None
    if not isinstance(value, torch.Tensor) or isinstance(value, torch._subclasses.FakeTensor) or (
            value.numel() > 1 and all(s == 0 for s in value.stride())):
        raise UnsupportedModelError(f"{region}: helix cannot read the value of its mask {where(bias)}")
    return value


def _equal(value, want) -> bool:
    """``value`` (an int, or a node computing a size) equals ``want`` (an int or a SymInt) for every call."""
    if isinstance(value, fx.Node):
        value = value.meta.get("example_value")
    if isinstance(value, int) and isinstance(want, int):
        return value == want
    if isinstance(value, torch.SymInt) or isinstance(want, torch.SymInt):
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        return bool(statically_known_true(value == want))
    return False


def _text(cut: slice) -> str:
    name = lambda v: v.name if isinstance(v, fx.Node) else v  # noqa: E731
    return f"[{name(cut.start)}:{name(cut.stop)}" + (f":{name(cut.step)}]" if cut.step is not None else "]")


def _window(value: torch.Tensor, causal: torch.Tensor) -> int | None:
    """w when ``value`` is ``tril(ones) ^ tril(ones, -w)`` (GPT-Neo's local attention), else None."""
    width = int(value[-1].sum())
    if 0 < width < value.shape[-1] and torch.equal(value, causal ^ causal.tril(-width)):
        return width
    return None
