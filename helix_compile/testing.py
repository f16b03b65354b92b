"""Check a layout against the single-device model: the same prompt, greedy decoding, logits compared per step.

A test comparator: runs on every rank of an initialised process group (the tests, the GPU smoke run and
``tools/coverage.py`` use it; the commands do not). The reference is the unmodified transformers model with
transformers' own ``StaticCache``, run on each rank.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import torch

from .cache import StaticCache
from .layout import Layout


@dataclasses.dataclass
class Report:
    layout: str
    max_abs_err: float  # max |helix - reference| over all steps
    max_rel_err: float  # max_abs_err / max |reference|
    tokens_equal: bool
    steps: int
    cache_bytes: int
    reference_cache_bytes: int
    tokens: list  # helix greedy tokens, batch-major
    reference_tokens: list
    logits: list  # last step's helix logits as nested lists (plain data: crosses process boundaries)
    seconds: float


@functools.lru_cache(maxsize=None)
def _forward_params(cls) -> frozenset:
    """The parameter names of ``cls.forward`` (once per class: ``generate_inputs`` runs every decode step)."""
    import inspect

    return frozenset(inspect.signature(cls.forward).parameters)


def generate_inputs(model, input_ids: torch.Tensor, past: int) -> dict:
    """The inputs ``generate`` gives the model besides input_ids for an unpadded batch, ``past`` tokens cached:
    attention_mask = ones(B, past + L) and position_ids = past .. past + L - 1 (each only if the forward takes it).

    Some families (OPT, BioGPT, XGLM, CTRL, Fuyu in transformers 5.24) derive them from ``cache.get_seq_length()``
    when they are missing; over a static cache that is a 0-d tensor, so the bare call is not traceable, while
    ``generate``'s call is."""
    params = _forward_params(type(model))
    b, length = input_ids.shape
    out = {}
    if "attention_mask" in params:
        out["attention_mask"] = torch.ones(b, past + length, dtype=torch.long, device=input_ids.device)
    if "position_ids" in params:
        out["position_ids"] = (torch.arange(length, device=input_ids.device) + past).expand(b, -1)
    return out


@torch.no_grad()
def compare(
    model, layout: Layout | str, input_ids: torch.Tensor, steps: int, max_cache_len: int, executor="eager",
    reference=None, teacher_forcing=False, call="bare",
) -> Report:
    """Greedy-decode ``steps`` tokens with ``model`` under ``layout`` and with ``reference`` (default: ``model``
    itself, eagerly, on one device). With ``teacher_forcing`` both read the reference's tokens, so the logits
    stay comparable after a near-tie flips a low-precision argmax. ``call``: "bare" (input_ids and the cache
    only) or "generate" (also ``generate_inputs``: the attention_mask and position_ids generate passes)."""
    from transformers import StaticCache as HFStaticCache

    reference = reference if reference is not None else model
    batch = input_ids.shape[0]
    device = input_ids.device
    dtype = next(model.parameters()).dtype
    cache = StaticCache(model.config, batch, max_cache_len, layout, dtype=dtype, device=device)  # layout may be "auto"
    ref_cache = HFStaticCache(reference.config, max_cache_len=max_cache_len)
    compiled = torch.compile(model, backend="helix", options={"layout": layout, "executor": executor}, fullgraph=True)
    start = time.perf_counter()
    extra = (lambda ids, past: generate_inputs(model, ids, past)) if call == "generate" else (lambda ids, past: {})
    past = input_ids.shape[1]
    out = compiled(input_ids=input_ids, past_key_values=cache, **extra(input_ids, 0)).logits[:, -1:]
    ref = reference(input_ids=input_ids, past_key_values=ref_cache, **extra(input_ids, 0)).logits[:, -1:]
    err, scale = (out - ref).abs().max().item(), ref.abs().max().item()
    tok, ref_tok = out.argmax(-1), ref.argmax(-1)
    tokens, ref_tokens = [tok], [ref_tok]
    for _ in range(steps):
        out = compiled(input_ids=ref_tok if teacher_forcing else tok, past_key_values=cache, **extra(tok, past)).logits
        ref = reference(input_ids=ref_tok, past_key_values=ref_cache, **extra(ref_tok, past)).logits
        past += 1
        err, scale = max(err, (out.float() - ref.float()).abs().max().item()), max(scale, ref.abs().max().item())
        tok, ref_tok = out.argmax(-1), ref.argmax(-1)
        tokens.append(tok)
        ref_tokens.append(ref_tok)
    seconds = time.perf_counter() - start
    tokens, ref_tokens = torch.cat(tokens, 1).tolist(), torch.cat(ref_tokens, 1).tolist()
    ref_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in ref_cache.layers if layer.keys is not None)
    return Report(
        cache.layout.key(), err, err / max(scale, 1e-30), tokens == ref_tokens, steps, cache.nbytes, ref_bytes,
        tokens, ref_tokens, out.float().cpu().tolist(), seconds,
    )
