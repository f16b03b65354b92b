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
    reference=None, teacher_forcing=False,
) -> Report:
    """Greedy-decode ``steps`` tokens with ``model`` under ``layout`` and with ``reference`` (default: ``model``
    itself, eagerly, on one device). With ``teacher_forcing`` both read the reference's tokens, so the logits
    stay comparable after a near-tie flips a low-precision argmax."""
    from transformers import StaticCache as HFStaticCache

    reference = reference if reference is not None else model
    batch = input_ids.shape[0]
    device = input_ids.device
    dtype = next(model.parameters()).dtype
    cache = StaticCache(model.config, batch, max_cache_len, layout, dtype=dtype, device=device)  # layout may be "auto"
    ref_cache = HFStaticCache(reference.config, max_cache_len=max_cache_len)
    compiled = torch.compile(model, backend="helix", options={"layout": layout, "executor": executor}, fullgraph=True)
    start = time.perf_counter()
    out = compiled(input_ids=input_ids, past_key_values=cache).logits[:, -1:]
    ref = reference(input_ids=input_ids, past_key_values=ref_cache).logits[:, -1:]
    err, scale = (out - ref).abs().max().item(), ref.abs().max().item()
    tok, ref_tok = out.argmax(-1), ref.argmax(-1)
    tokens, ref_tokens = [tok], [ref_tok]
    for _ in range(steps):
        out = compiled(input_ids=ref_tok if teacher_forcing else tok, past_key_values=cache).logits
        ref = reference(input_ids=ref_tok, past_key_values=ref_cache).logits
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
