"""Load a checkpoint so that each rank reads and keeps only its own shards.

Two kinds of checkpoint:

- a plain HF safetensors checkpoint (one file or an index of several): every tensor is read with safetensors'
  ``get_slice``, sharded ones as this rank's slice only;
- a ``helix convert`` output (a ``plan.json`` beside ``rank<r>.safetensors`` files): the rank opens only its own
  file, after checking its sha256 against the plan, and only if the layout is the plan's.

The model is built without parameter storage (``accelerate.init_empty_weights``; buffers such as RoPE's
``inv_freq`` stay real). A sharded parameter (``shard_spec``: q/k/v/o_proj, gate/up/down_proj, decided by
``passes.plan.role_shard`` -- the one place that says which rows or columns a rank owns; ``helix convert`` uses
it too) becomes a global-shaped virtual parameter with the rank's piece registered behind it. Each tensor's
file is opened for that tensor alone, so the pages of a column slice are unmapped again right away: peak memory
is about the shards plus one tensor.

The model can only run through ``torch.compile(model, backend="helix", ...)``: an eager call raises.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

from . import shards
from .layout import Layout, current_world
from .lowering.ops import ShardedEagerError
from .passes.plan import ROLE_BY_NAME, Heads, role_shard

PLAN_FILE = "plan.json"
PLAN_FORMAT = "helix-convert/1"
# Fields of a Layout that decide which weights a rank holds. kv_block and hopb_chunks shape only the KV cache
# and the schedule, so a converted checkpoint runs with any of them.
WEIGHT_FIELDS = ("kvp", "tpa", "tpf", "ep")


def rank_file(rank: int) -> str:
    """File name of rank ``rank``'s weights in a ``helix convert`` output."""
    return f"rank{rank}.safetensors"


def _files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors checkpoint in {path}")
    return files


def _role(name: str) -> tuple[str | None, str]:
    parts = name.split(".")
    return (ROLE_BY_NAME.get(parts[-2]) if len(parts) >= 2 else None), parts[-1]


def shard_spec(name: str, shape, heads: Heads, layout: Layout, rank: int):
    """The ``Shard`` of checkpoint tensor ``name`` (global ``shape``) that ``rank`` holds, or None (replicated)."""
    role, kind = _role(name)
    return role_shard(role, kind, tuple(shape), heads, layout, rank) if role else None


def sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_plan(path: Path) -> dict:
    """The ``plan.json`` of a ``helix convert`` output, checked for its format."""
    file = Path(path) / PLAN_FILE
    try:
        plan = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON ({e}): the conversion is damaged; run helix convert again")
    if plan.get("format") != PLAN_FORMAT:
        raise ValueError(f"{file} has format {plan.get('format')!r}, this helix reads {PLAN_FORMAT!r}")
    return plan


def plan_layout(plan: dict) -> Layout:
    return Layout(**plan["layout"])


def check_layout(plan: dict, layout: Layout, path) -> None:
    """Refuse ``layout`` if its weight placement differs from the one ``plan`` was converted for."""
    want = plan_layout(plan)
    if any(getattr(want, f) != getattr(layout, f) for f in WEIGHT_FIELDS):
        fmt = lambda l: " ".join(f"{f}={getattr(l, f)}" for f in WEIGHT_FIELDS)  # noqa: E731
        raise ValueError(
            f"{path} was converted for {fmt(want)} ({want.world_size} ranks) but the layout asked for is "
            f"{fmt(layout)} ({layout.world_size} ranks): use the plan's layout, or convert the original checkpoint "
            f"again with helix convert --kvp {layout.kvp} --tpa {layout.tpa}"
        )


def check_file(path: Path, name: str, plan: dict) -> Path:
    """``path/name`` after checking it exists and its sha256 is the one recorded in ``plan``."""
    file = Path(path) / name
    if not file.exists():
        raise ValueError(f"{file} is missing: copy the whole helix convert output, or convert again")
    want, got = plan["files"].get(name), sha256(file)
    if want != got:
        raise ValueError(
            f"{file} is corrupted: its sha256 is {got[:16]}..., plan.json records {str(want)[:16]}...; "
            f"copy it again or convert again (helix convert --verify {path} checks every file)"
        )
    return file


def _refuse_eager(module, args, kwargs):
    if not torch.compiler.is_compiling():
        raise ShardedEagerError(
            "this model was loaded with helix_compile.from_pretrained: each rank holds only its shards, so it "
            "cannot run eagerly. Call torch.compile(model, backend='helix', options={'layout': layout})"
        )


def from_pretrained(path, layout: Layout, dtype=None, device=None, verify: bool = True):
    """Build the HF model of checkpoint ``path`` holding only this rank's shards (see the module docstring).

    ``path`` is an HF safetensors checkpoint directory or a ``helix convert`` output. For the latter ``layout``
    must place the weights as the plan does (``WEIGHT_FIELDS``), and with ``verify`` the rank's file is checked
    against its sha256 first. ``dtype`` defaults to the config's; ``device`` to CPU.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    plan = read_plan(path) if (path / PLAN_FILE).exists() else None
    rank, world = current_world()
    if plan is not None:
        check_layout(plan, layout, path)
    config = AutoConfig.from_pretrained(path)
    layout.validate(config.get_text_config(decoder=True), world_size=world)
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    device = torch.device(device) if device is not None else torch.device("cpu")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    heads = Heads.of(config.get_text_config(decoder=True))
    params = dict(model.named_parameters(remove_duplicate=False))
    if plan is None:
        files, local_files = _files(path), False
    else:
        name = rank_file(rank)
        files, local_files = [check_file(path, name, plan) if verify else path / name], True
    for file in files:
        with safe_open(file, framework="pt") as f:
            names = list(f.keys())
        for name in names:
            if name not in params:
                continue  # e.g. rotary buffers saved by old checkpoints
            shape = tuple(params[name].shape)
            spec = shard_spec(name, shape, heads, layout, rank)
            with safe_open(file, framework="pt") as f:
                piece = f.get_slice(name)
                stored = tuple(piece.get_shape())
                want = shape if spec is None or not local_files else _local_shape(shape, spec)
                if stored != want:
                    raise ValueError(f"{file.name}: {name} has shape {stored}, the model expects {want}")
                if spec is None:
                    value = piece[:].to(device=device, dtype=dtype, copy=True)  # owned, not a view of the mmap
                else:
                    index = slice(None) if local_files else spec_index(spec, len(shape))
                    local = piece[index].to(device=device, dtype=dtype, copy=True).contiguous()
                    value = shards.virtual(shape, dtype, device)
            param = _set_param(model, name, value)
            if spec is not None:
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


def spec_index(spec, ndim: int) -> tuple:
    """The indexing tuple that takes ``spec``'s piece of an ``ndim``-d tensor (or a safetensors slice)."""
    return tuple(slice(spec.start, spec.stop) if d == spec.dim else slice(None) for d in range(ndim))


def _local_shape(shape, spec) -> tuple:
    return tuple(spec.stop - spec.start if d == spec.dim else s for d, s in enumerate(shape))


def _set_param(model, name: str, value: torch.Tensor) -> torch.nn.Parameter:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    param = module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    return param
