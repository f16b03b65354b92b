"""Load an HF safetensors checkpoint so that each rank reads and keeps only its own shards.

The model is built without parameter storage (``accelerate.init_empty_weights``; buffers such as RoPE's
``inv_freq`` stay real), then every checkpoint tensor is read with safetensors' ``get_slice``: sharded ones
(``regions.roles.role_shard`` by HF name, ``role_by_name``: q/k/v/o_proj, gate/up/down_proj, the fused
qkv_proj / query_key_value / c_attn and gate_up_proj, GPT-2's Conv1D c_attn / c_proj / c_fc) as this rank's slice only, registered behind
a global-shaped virtual parameter; the rest in full. Each tensor's file is opened for that tensor alone, so the
pages of a column slice are unmapped again right away: peak memory is about the shards plus one tensor.

The model can only run through ``torch.compile(model, backend="helix", ...)``: an eager call raises.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from . import shards
from .layout import Layout, current_world
from .lowering.ops import ShardedEagerError
from .passes.regions.roles import Heads, Pieces, role_by_name, role_shard


def _files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors checkpoint in {path}")
    return files


def _read(piece, shape, spec) -> torch.Tensor:
    """This rank's slice of a safetensors tensor: one range (``Shard``) or several concatenated (``Pieces``)."""
    ranges = spec.ranges if isinstance(spec, Pieces) else ((spec.start, spec.stop),)
    parts = [
        piece[tuple(slice(a, b) if d == spec.dim else slice(None) for d in range(len(shape)))] for a, b in ranges
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=spec.dim)


def _refuse_eager(module, args, kwargs):
    if not torch.compiler.is_compiling():
        raise ShardedEagerError(
            "this model was loaded with helix_compile.from_pretrained: each rank holds only its shards, so it "
            "cannot run eagerly. Call torch.compile(model, backend='helix', options={'layout': layout})"
        )


def from_pretrained(path, layout: Layout, dtype=None, device=None):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    rank, world = current_world()
    layout.validate(config.get_text_config(decoder=True), world_size=world)
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    device = torch.device(device) if device is not None else torch.device("cpu")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    heads = Heads.of(config.get_text_config(decoder=True))
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = set()
    for file in _files(path):
        with safe_open(file, framework="pt") as f:
            names = list(f.keys())
        for name in names:
            if name not in params:
                continue  # e.g. rotary buffers saved by old checkpoints
            with safe_open(file, framework="pt") as f:
                piece = f.get_slice(name)
                shape = tuple(piece.get_shape())
                if shape != tuple(params[name].shape):
                    raise ValueError(f"{file.name}: {name} has shape {shape}, the model expects {tuple(params[name].shape)}")
                role, kind = role_by_name(name)
                spec = role_shard(role, kind, shape, heads, layout, rank) if role else None
                if spec is None:
                    value = piece[:].to(device=device, dtype=dtype, copy=True)  # owned, not a view of the mmap
                else:
                    local = _read(piece, shape, spec).to(device=device, dtype=dtype, copy=True).contiguous()
                    value = shards.virtual(shape, dtype, device)
            param = _set_param(model, name, value)
            if spec is not None:
                shards.register(param, spec, local)
            loaded.add(name)
    if getattr(config, "tie_word_embeddings", False):  # the checkpoint may hold either end of the tie
        inp, out = model.get_input_embeddings(), model.get_output_embeddings()
        if inp.weight.device.type == "meta":
            inp.weight = out.weight
        else:
            out.weight = inp.weight
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} parameters, e.g. {missing[:3]}")
    model.eval()
    model.register_forward_pre_hook(_refuse_eager, with_kwargs=True)
    return model


def _set_param(model, name: str, value: torch.Tensor) -> torch.nn.Parameter:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    param = module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    return param
