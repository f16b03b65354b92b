"""Checkpoints that ship FP8 or MXFP4 weights or FP8 KV-cache scales: their weights read as plain floats,
anything else quantized refused by name.

Many long-context checkpoints ship their linear weights in float8 (DeepSeek-V3 and R1 among them), gpt-oss its
experts in MXFP4. Each such weight comes with a scale tensor beside it, and the real weight is the stored value
times the scale of its block. ``loading.Checkpoint`` de-quantises every such pair when it reads it, cast to the
model's dtype: the same arithmetic as transformers' own de-quantising load (``FineGrainedFP8Config`` /
``Mxfp4Config(dequantize=True)``, what it does on a machine without a GPU), so helix holds the weights that
transformers' model holds. The model then
computes in its dtype (bf16), as transformers' de-quantised model does; activation scales (``input_scale``) are
not used.

Read (``quantization_config.quant_method`` of config.json):

- ``"fp8"``, transformers' fine-grained FP8 (DeepSeek-V3/R1): ``W.weight_scale_inv``, one fp32 scale per block
  of ``weight_block_size`` = [rows, cols] (a grid of ceil(out / rows) x ceil(in / cols)); E8M0 scales (uint8
  exponents, 2 ** (e - 127)) too;
- ``"compressed-tensors"`` with float weights of 8 bits (llm-compressor's FP8): ``W.weight_scale`` per tensor,
  per output channel (out, 1) or per block (``block_structure``);
- ``"modelopt"`` with ``quant_algo`` FP8 and ``"fbgemm_fp8"``: ``W.weight_scale`` per tensor or per channel;
- ``"mxfp4"`` (gpt-oss's experts): ``P_blocks`` (E, rows, G, 16) uint8, two e2m1 values per byte (low nibble
  first), and ``P_scales`` (E, rows, G) uint8 exponents, one per group of 32 values: value = e2m1 * 2 ** (s - 127);
  the rows x (G * 32) matrix of each expert is stored transposed, as parameter ``P`` (E, G * 32, rows) holds it.

Scale shapes are read from the file: a single number, one per output row ((out,) or (out, 1)), or a grid of
blocks. A grid's block size is the config's where it gives one, else the weight's size over the grid's, which
must divide it. Stacked expert weights (E, out, in) take a scale per expert with the same rules.

KV-cache scales (``kv_scales``): ``layers.{i}.self_attn.k_scale`` / ``v_scale`` (compressed-tensors, vLLM's
naming; also under ``self_attn.attn.``) or ``layers.{i}.self_attn.k_proj.k_scale`` / ``v_proj.v_scale``
(ModelOpt): one number per layer or one per KV head. An element e of an FP8 cache stands for e * scale, as in
``cache.StaticCache``'s FP8 form, which uses them instead of computing scales at the prefill.

Refused, before anything is read: every other ``quant_method`` (GPTQ, AWQ, bitsandbytes, NVFP4, ...) and
compressed-tensors with integer or other-width weights; a float8 weight without its scale; integer-packed weights
(``weight_packed``, ``qweight``).
"""

from __future__ import annotations

import math
import re

import torch

# safetensors tags of float8 types (torch dtypes that ``loading.DTYPE_TAGS`` does not write)
FP8_TAGS = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
if hasattr(torch, "float8_e8m0fnu"):
    FP8_TAGS["F8_E8M0"] = torch.float8_e8m0fnu
SCALE_SUFFIXES = ("_scale_inv", "_scale")  # W.weight's scale: fine-grained FP8's; compressed-tensors', ModelOpt's
PACKED_SUFFIXES = ("weight_packed", "qweight", "weight_zero_point", "qzeros", "weight_shape")
KV_SCALE = re.compile(r"layers\.(\d+)\.self_attn\.(?:attn\.|k_proj\.|v_proj\.)?([kv])_scale$")
SUPPORTED = "fp8 (fine-grained FP8, DeepSeek-V3/R1), compressed-tensors FP8, modelopt FP8, fbgemm_fp8, mxfp4 (gpt-oss)"
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # a nibble's value
DEQUANTISE_FIRST = ("de-quantise it to bf16 first (load it with transformers and save_pretrained the result), or "
                    "use the checkpoint's bf16 release")


def check(config) -> None:
    """Raise ValueError if ``config`` (a transformers config or its dict) declares a quantization helix does not
    read (module docstring); None when it declares none or an FP8 one."""
    q = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    if q is None:
        return
    q = q if isinstance(q, dict) else q.to_dict()
    method = q.get("quant_method")
    if method in ("fp8", "fbgemm_fp8", "mxfp4"):
        return
    if method == "modelopt" and str(q.get("quant_algo", "FP8")).upper() == "FP8":
        return
    if method == "compressed-tensors":
        bad = [f"{name}: {w.get('type')} of {w.get('num_bits')} bits"
               for name, group in (q.get("config_groups") or {}).items()
               for w in [group.get("weights")] if w and (w.get("type") != "float" or w.get("num_bits") != 8)]
        if not bad:
            return
        raise ValueError(f"this checkpoint's compressed-tensors quantization has weights helix does not read "
                         f"({'; '.join(bad)}): helix reads float weights of 8 bits (FP8); {DEQUANTISE_FIRST}")
    what = method if method != "modelopt" else f"modelopt {q.get('quant_algo')}"
    raise ValueError(f"this checkpoint is quantized with {what!r}, which helix does not read (it reads plain bf16, "
                     f"fp16 and fp32 weights and FP8 ones: {SUPPORTED}); {DEQUANTISE_FIRST}")


def block_size(config) -> tuple[int, int] | None:
    """The (rows, cols) of the weights' scale blocks that ``config`` gives, or None."""
    q = getattr(config, "quantization_config", None) if not isinstance(config, dict) else config.get(
        "quantization_config")
    if q is None:
        return None
    q = q if isinstance(q, dict) else q.to_dict()
    size = q.get("weight_block_size")
    for group in (q.get("config_groups") or {}).values():
        size = size or (group.get("weights") or {}).get("block_structure")
    return tuple(size) if size else None


def pairs(tags: dict[str, str]) -> dict[str, str]:
    """{weight name: its scale's name} for every float8 weight among ``tags`` (name -> safetensors dtype tag).
    Raises ValueError naming the tensor for a float8 weight without a scale and for integer-packed weights."""
    out = {}
    for name, tag in tags.items():
        if name.endswith(PACKED_SUFFIXES):
            raise ValueError(f"{name}: an integer-packed quantized weight ({tag}); helix reads plain and FP8 weights "
                             f"({SUPPORTED}); {DEQUANTISE_FIRST}")
        if tag not in FP8_TAGS or not name.endswith("weight"):
            continue
        scale = next((name + s for s in SCALE_SUFFIXES if name + s in tags), None)
        if scale is None:
            raise ValueError(f"{name} is stored as {tag} without a scale beside it (none of "
                             f"{', '.join(name + s for s in SCALE_SUFFIXES)}): helix cannot tell the values it "
                             f"stands for")
        out[name] = scale
    return out


def mxfp4_pairs(tags: dict[str, str]) -> dict[str, tuple[str, str]]:
    """{parameter name P: (P_blocks, P_scales)} for the MXFP4 tensors among ``tags`` (both stored as U8)."""
    return {name[:-len("_blocks")]: (name, name[:-len("_blocks")] + "_scales") for name, tag in tags.items()
            if name.endswith("_blocks") and tag == "U8" and tags.get(name[:-len("_blocks")] + "_scales") == "U8"}


def mxfp4_shape(blocks_shape) -> tuple:
    """The parameter's shape (E, G * 32, rows) for blocks of shape (E, rows, G, 16)."""
    e, rows, groups, half = blocks_shape
    return (e, groups * half * 2, rows)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, name: str = "weight"):
    """MXFP4 ``blocks`` (E, rows, G, 16) and ``scales`` (E, rows, G) as the (E, G * 32, rows) parameter in
    ``dtype``: each nibble's e2m1 value in ``dtype`` times 2 ** (scale - 127) (exact: a power of two)."""
    if blocks.dim() != 4 or tuple(scales.shape) != tuple(blocks.shape[:-1]):
        raise ValueError(f"{name}: MXFP4 blocks of shape {tuple(blocks.shape)} need scales of shape "
                         f"{tuple(blocks.shape[:-1])}, got {tuple(scales.shape)}")
    lut = torch.tensor(E2M1, dtype=dtype)
    blocks = blocks.to(torch.uint8)
    values = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], dim=-1)  # low nibble first
    values = torch.ldexp(values, (scales.to(torch.int32) - 127)[..., None, None]).to(dtype)
    e, rows, groups, half = blocks.shape
    return values.reshape(e, rows, groups * half * 2).transpose(1, 2).contiguous()


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, block=None, name: str = "weight"):
    """``weight`` (float8, (..., out, in)) times ``scale`` of its block, in fp32, cast to ``dtype`` (module
    docstring: a single scale, one per output row, or a grid of blocks, ``block`` = (rows, cols) if given)."""
    w = weight.to(torch.float32)
    s = (scale.to(torch.float32) - 127.0).exp2() if scale.dtype == torch.uint8 else scale.to(torch.float32)
    if s.numel() == 1:
        return (w * s.reshape(())).to(dtype)
    rows, cols = w.shape[-2:]
    lead = w.shape[:-2]
    if s.dim() == w.dim() - 1 and s.shape[-1] == rows:  # one per output row, (..., out)
        s = s.unsqueeze(-1)
    if s.dim() != w.dim() or tuple(s.shape[:-2]) != tuple(lead):
        raise ValueError(f"{name}: a scale of shape {tuple(scale.shape)} does not fit the weight's "
                         f"{tuple(weight.shape)}")
    grid = s.shape[-2:]
    if block is not None and grid != (1, 1) and grid != (rows, 1):
        br, bc = block
        if grid != (math.ceil(rows / br), math.ceil(cols / bc)):
            raise ValueError(f"{name}: a scale grid of {tuple(grid)} does not match the weight's {(rows, cols)} in "
                             f"blocks of {(br, bc)} (the config's block size)")
    else:
        if rows % grid[0] or cols % grid[1]:
            raise ValueError(f"{name}: a scale grid of {tuple(grid)} does not divide the weight's {(rows, cols)}")
        br, bc = rows // grid[0], cols // grid[1]
    s = s.repeat_interleave(br, dim=-2).repeat_interleave(bc, dim=-1)[..., :rows, :cols]
    return (w * s).to(dtype)


def kv_scale_names(names) -> dict[int, dict[str, str]]:
    """{layer: {"k": name, "v": name}} of the KV-cache scales among the tensor ``names``."""
    out = {}
    for name in names:
        m = KV_SCALE.search(name)
        if m:
            out.setdefault(int(m.group(1)), {})[m.group(2)] = name
    return out


def kv_scales(tensors: dict) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (k_scale, v_scale)}, fp32 vectors (one number, or one per KV head: ``cache.StaticCache`` checks
    which and that they are positive), from a checkpoint's KV-cache scale tensors {name: tensor}. A layer with only
    one of the two is an error naming it."""
    out = {}
    for layer, found in sorted(kv_scale_names(tensors).items()):
        if set(found) != {"k", "v"}:
            have, lacks = ("key", "value") if "k" in found else ("value", "key")
            raise ValueError(f"{next(iter(found.values()))}: layer {layer} has a {have} cache scale but no {lacks} one")
        out[layer] = tuple(tensors[found[kind]].to(torch.float32).reshape(-1) for kind in ("k", "v"))
    return out
