"""Check a layout against the single-device model: the same prompt, greedy decoding, logits compared per step.

Runs on every rank of an initialised process group (tests, the GPU smoke run and ``examples/`` use it). The
reference is the unmodified transformers model with transformers' own ``StaticCache``, run on each rank.
"""

from __future__ import annotations

import dataclasses
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


@torch.no_grad()
def compare(
    model, layout: Layout | str, input_ids: torch.Tensor, steps: int, max_cache_len: int, executor="eager",
    reference=None, teacher_forcing=False, generate_inputs=False,
) -> Report:
    """Greedy-decode ``steps`` tokens with ``model`` under ``layout`` and with ``reference`` (default: ``model``
    itself, eagerly, on one device). With ``teacher_forcing`` both read the reference's tokens, so the logits
    stay comparable after a near-tie flips a low-precision argmax. With ``generate_inputs`` both also get a 2-D
    ``attention_mask`` of ones over the cached and new tokens and, where ``forward`` takes them, ``position_ids``,
    as ``generate`` passes them for a padded batch (it drops an all-ones mask): without them some BERT-style
    models slice their position buffer, or build an all-ones mask, by the cache length, a 0-d tensor of a static
    cache, which Dynamo cannot trace."""
    from transformers import StaticCache as HFStaticCache

    reference = reference if reference is not None else model
    batch = input_ids.shape[0]
    device = input_ids.device
    dtype = next(model.parameters()).dtype
    cache = StaticCache(model.config, batch, max_cache_len, layout, dtype=dtype, device=device)  # layout may be "auto"
    ref_cache = HFStaticCache(reference.config, max_cache_len=max_cache_len)
    compiled = torch.compile(model, backend="helix", options={"layout": layout, "executor": executor}, fullgraph=True)
    extra = _generate_inputs(model, batch, device) if generate_inputs else lambda past, new: {}
    start = time.perf_counter()
    length = input_ids.shape[1]
    out = compiled(input_ids=input_ids, past_key_values=cache, **extra(0, length)).logits[:, -1:]
    ref = reference(input_ids=input_ids, past_key_values=ref_cache, **extra(0, length)).logits[:, -1:]
    err, scale = (out - ref).abs().max().item(), ref.abs().max().item()
    tok, ref_tok = out.argmax(-1), ref.argmax(-1)
    tokens, ref_tokens = [tok], [ref_tok]
    for _ in range(steps):
        out = compiled(input_ids=ref_tok if teacher_forcing else tok, past_key_values=cache, **extra(length, 1)).logits
        ref = reference(input_ids=ref_tok, past_key_values=ref_cache, **extra(length, 1)).logits
        length += 1
        err, scale = max(err, (out.float() - ref.float()).abs().max().item()), max(scale, ref.abs().max().item())
        tok, ref_tok = out.argmax(-1), ref.argmax(-1)
        tokens.append(tok)
        ref_tokens.append(ref_tok)
    seconds = time.perf_counter() - start
    tokens, ref_tokens = torch.cat(tokens, 1).tolist(), torch.cat(ref_tokens, 1).tolist()
    ref_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in ref_cache.layers)
    return Report(
        cache.layout.key(), err, err / max(scale, 1e-30), tokens == ref_tokens, steps, cache.nbytes, ref_bytes,
        tokens, ref_tokens, out.float().cpu().tolist(), seconds,
    )


def _generate_inputs(model, batch: int, device):
    """(past, new) -> the keyword inputs ``generate`` adds for ``new`` tokens after ``past`` cached ones."""
    import inspect

    takes_positions = "position_ids" in inspect.signature(model.forward).parameters

    def extra(past: int, new: int) -> dict:
        out = {"attention_mask": torch.ones((batch, past + new), dtype=torch.long, device=device)}
        if takes_positions:
            out["position_ids"] = torch.arange(past, past + new, device=device)[None].expand(batch, new)
        return out

    return extra
