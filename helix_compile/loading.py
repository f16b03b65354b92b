"""Load an HF safetensors checkpoint so that each rank reads and keeps only its own shards.

The model is built without parameter storage (``accelerate.init_empty_weights``; buffers such as RoPE's
``inv_freq`` stay real), then every checkpoint tensor is read with safetensors' ``get_slice``: sharded ones
(``regions.roles.role_shard`` by HF name, ``role_by_name``: q/k/v/o_proj, gate/up/down_proj, the fused
qkv_proj / query_key_value / c_attn and gate_up_proj, GPT-2's Conv1D c_attn / c_proj / c_fc) as this rank's slice only, registered behind
a global-shaped virtual parameter; the rest in full. Each tensor's file is opened for that tensor alone, so the
pages of a column slice are unmapped again right away: peak memory is about the shards plus one tensor.

Mixture-of-experts weights: the model holds fused 3-D ``experts.gate_up_proj`` (E, 2I, H) and
``experts.down_proj`` (E, H, I); checkpoints hold either those (read as this rank's ``ExpertShard``) or, as
transformers 5.x's ``save_pretrained`` writes them, one tensor per expert (``experts.{e}.gate_proj/up_proj/down_proj``,
Mixtral's ``block_sparse_moe.experts.{e}.w1/w3/w2``): then each rank reads only its experts (ep) and their rows or
columns (tpf), and stacks them into its local fused piece, which is what ``role_shard`` would cut from the fused
tensor.

The model can only run through ``torch.compile(model, backend="helix", ...)``: an eager call raises.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from . import shards
from .layout import Layout, current_world
from .lowering.ops import ShardedEagerError
from .passes.regions.roles import Heads, Pieces, role_by_name, role_shard
from .shards import ExpertShard


def _files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors checkpoint in {path}")
    return files


def _read(piece, shape, spec) -> torch.Tensor:
    """This rank's slice of a safetensors tensor: one range (``Shard``) or several concatenated (``Pieces``,
    ``ExpertShard``)."""
    if isinstance(spec, ExpertShard):
        parts = [piece[index] for index in spec.indices(shape)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=spec.dim)
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
    buffers = {n: b for n, b in model.named_buffers() if b.device.type != "meta"}
    per_expert: dict[str, dict] = {}  # fused parameter -> {(expert, part): (file, checkpoint name)}
    for file in _files(path):
        with safe_open(file, framework="pt") as f:
            names = list(f.keys())
        for key in names:
            name = key.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's checkpoint module name (transformers 5.x renames it)
            if name in buffers:  # persistent buffers saved with the weights (DeepSeek's e_score_correction_bias)
                with safe_open(file, framework="pt") as f:
                    value = f.get_tensor(key)
                if value.shape != buffers[name].shape:
                    raise ValueError(f"{file.name}: buffer {key} has shape {tuple(value.shape)}, the model expects {tuple(buffers[name].shape)}")
                buffers[name].copy_(value)
                continue
            if name not in params:
                fused = _per_expert(key)
                if fused is not None and fused[0] in params:
                    per_expert.setdefault(fused[0], {})[fused[1:]] = (file, key)
                continue  # e.g. rotary buffers saved by old checkpoints
            with safe_open(file, framework="pt") as f:
                piece = f.get_slice(key)
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
    for name, found in per_expert.items():
        if name in loaded:
            continue
        shape = tuple(params[name].shape)
        role, _ = role_by_name(name)
        spec = role_shard(role, "weight", shape, heads, layout, rank)
        local = _stack_experts(name, found, spec, shape).to(device=device, dtype=dtype, copy=True).contiguous()
        param = _set_param(model, name, shards.virtual(shape, dtype, device))
        shards.register(param, spec, local)
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


_EXPERT = re.compile(r"^(.*)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_PART = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}


def _per_expert(name: str):
    """(fused parameter name, expert, part) of a per-expert checkpoint tensor, or None."""
    found = _EXPERT.match(name)
    if found is None:
        return None
    prefix = found.group(1).replace(".block_sparse_moe", ".mlp")  # Mixtral's checkpoint module name
    part = _PART[found.group(3)]
    return f"{prefix}.experts.{'down_proj' if part == 'down' else 'gate_up_proj'}", int(found.group(2)), part


def _stack_experts(name: str, found: dict, spec: ExpertShard, shape) -> torch.Tensor:
    """This rank's piece of a fused expert weight, read from one tensor per expert: only its experts, and of each
    only its rows (gate and up, (I, H)) or columns (down, (H, I)); the same piece ``spec.take`` cuts from the
    fused (E, 2I, H) / (E, H, I) tensor."""
    parts = ("gate", "up") if name.endswith("gate_up_proj") else ("down",)
    experts = []
    for e in range(spec.e_start, spec.e_stop):
        pieces = []
        for part in parts:
            if (e, part) not in found:
                raise ValueError(f"checkpoint lacks expert {e}'s {part} projection of {name}")
            file, key = found[(e, part)]
            with safe_open(file, framework="pt") as f:
                piece = f.get_slice(key)
                want = (shape[1] // len(parts), shape[2])
                if tuple(piece.get_shape()) != want:
                    raise ValueError(f"{file.name}: {key} has shape {tuple(piece.get_shape())}, expected {want} for {name}")
                rows = slice(spec.start, spec.stop)
                pieces.append(piece[rows, :] if part != "down" else piece[:, rows])
        experts.append(torch.cat(pieces, dim=0))
    return torch.stack(experts)


def _set_param(model, name: str, value: torch.Tensor) -> torch.nn.Parameter:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    param = module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    return param
