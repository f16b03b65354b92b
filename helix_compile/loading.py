"""Load a checkpoint so that each rank reads and keeps only its own shards.

Two kinds of checkpoint:

- a plain HF safetensors checkpoint (one file or an index of several): every tensor is read with safetensors'
  ``get_slice``, sharded ones as this rank's slice only;
- a ``helix convert`` output (a manifest, ``manifest.json``, beside ``rank<r>.safetensors`` files): the rank opens
  only its own file, after checking its sha256 against the manifest, and only if the layout is the manifest's.

The model is built without parameter storage (``accelerate.init_empty_weights``; buffers such as RoPE's
``inv_freq`` stay real). A sharded parameter (``shard_spec``: q/k/v/o_proj, gate/up/down_proj, the fused qkv_proj / query_key_value /
c_attn and gate_up_proj, GPT-2's Conv1D, MoE experts; decided by
``passes.regions.roles.role_shard`` -- the one place that says which rows or columns a rank owns; ``helix convert`` uses
it too) becomes a global-shaped virtual parameter with the rank's piece registered behind it. Each tensor's
file is opened for that tensor alone, so the pages of a column slice are unmapped again right away: peak memory
is about the shards plus one tensor.

Mixture-of-experts weights: the model holds fused 3-D ``experts.gate_up_proj`` (E, 2I, H) and
``experts.down_proj`` (E, H, I); checkpoints hold either those (read as this rank's ``ExpertShard``) or, as
transformers 5.x's ``save_pretrained`` writes them, one tensor per expert (``experts.{e}.gate_proj/up_proj/down_proj``,
Mixtral's ``block_sparse_moe.experts.{e}.w1/w3/w2``): then each rank reads only its experts (ep) and their rows or
columns (tpf), and stacks them into its local fused piece, which is what ``role_shard`` would cut from the fused
tensor.

Quantized checkpoints (``quantized``): FP8 and MXFP4 weights are de-quantised as they are read (``Checkpoint``),
so a rank holds the floats transformers' de-quantising load holds; FP8 KV-cache scales go to the cache; every
other quantization is refused by name.

``rank_tensors`` is the one place that turns a checkpoint (``Checkpoint``: safetensors files or tensors in memory),
a layout and a rank into the rank's tensors, named as the model names them; ``from_pretrained`` loads them and
``helix convert`` writes them into the rank's file.

The model can only run through ``torch.compile(model, backend="helix", ...)``: an eager call raises.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from . import quantized, shards
from .layout import Layout, current_world
from .lowering.ops import ShardedEagerError
from .passes.regions.moe import INTERLEAVED
from .passes.regions.roles import Heads, Pieces, role_by_name, role_shard
from .shards import ExpertShard, Shard


MANIFEST_FILE = "manifest.json"  # what helix convert writes
EARLIER_MANIFEST_FILE = "plan.json"  # the name earlier versions wrote, read too (the same format)
MANIFEST_FORMAT = "helix-convert/1"
# Fields of a Layout that decide which weights a rank holds. kv_block and hopb_chunks shape only the KV cache
# and the schedule, so a converted checkpoint runs with any of them.
WEIGHT_FIELDS = ("kvp", "tpa", "tpf", "ep")


def rank_file(rank: int) -> str:
    """File name of rank ``rank``'s weights in a ``helix convert`` output."""
    return f"rank{rank}.safetensors"


def checkpoint_files(path: Path) -> list[Path]:
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


def shard_spec(name: str, shape, heads: Heads, layout: Layout, rank: int, forms: dict | None = None):
    """The ``Shard`` of checkpoint tensor ``name`` (global ``shape``) that ``rank`` holds, or None (replicated).
    ``forms`` (``stored_forms`` of the model) tells what the name does not: "transposed", a weight stored
    (in, out): GPT-2's Conv1D, a fused expert weight (E, in, out) (Aria, gpt-oss, Llama 4); "interleaved", a fused
    gate_up weight or bias whose features alternate gate and up (gpt-oss), cut as the plan cuts it
    (``passes.regions.moe.expert_shard``); "gated", an ``fc1`` holding [gate; up] (Moshi), cut as a fused pair."""
    role, kind = role_by_name(name)
    forms = forms or {}
    if name in forms.get("transposed", ()) and kind == "weight":
        kind = "weight_t"
    if name in forms.get("interleaved", ()) and role == "experts_gate_up":
        kind += INTERLEAVED
    if name in forms.get("gated", ()) and role == "ffn_in":
        role = "ffn_in_pair"
    return role_shard(role, kind, tuple(shape), heads.of_name(name), layout, rank) if role else None


def sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def manifest_file(path: Path) -> Path | None:
    """The manifest of the ``helix convert`` output ``path``: ``manifest.json``, else ``plan.json`` (the name
    earlier versions wrote); None where ``path`` has neither (not a conversion)."""
    for name in (MANIFEST_FILE, EARLIER_MANIFEST_FILE):
        if (Path(path) / name).is_file():
            return Path(path) / name
    return None


def read_manifest(path: Path) -> dict:
    """The manifest of the ``helix convert`` output ``path`` (``manifest_file``), checked for its format."""
    file = manifest_file(path)
    if file is None:
        raise ValueError(f"{path} has no {MANIFEST_FILE}: not a helix convert output")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON ({e}): the conversion is damaged; run helix convert again")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{file} has format {manifest.get('format')!r}, this helix reads {MANIFEST_FORMAT!r}")
    return manifest


def manifest_layout(manifest: dict) -> Layout:
    """The whole layout a conversion was written for."""
    return Layout(**manifest["layout"])


def check_layout(manifest: dict, layout: Layout, path) -> None:
    """Refuse ``layout`` if its weight placement differs from the one ``manifest`` was converted for."""
    want = manifest_layout(manifest)
    if any(getattr(want, f) != getattr(layout, f) for f in WEIGHT_FIELDS):
        fmt = lambda l: " ".join(f"{f}={getattr(l, f)}" for f in WEIGHT_FIELDS)  # noqa: E731
        raise ValueError(
            f"{path} was converted for {fmt(want)} ({want.world_size} ranks) but the layout asked for is "
            f"{fmt(layout)} ({layout.world_size} ranks): use the manifest's layout, or convert the original checkpoint "
            f"again with helix convert --kvp {layout.kvp} --tpa {layout.tpa}"
            + (f" --ep {layout.ep}" if layout.ep != 1 else "")
        )


def check_file(path: Path, name: str, manifest: dict) -> Path:
    """``path/name`` after checking it exists and its sha256 is the one recorded in ``manifest``."""
    file = Path(path) / name
    if not file.exists():
        raise ValueError(f"{file} is missing: copy the whole helix convert output, or convert again")
    want, got = manifest["files"].get(name), sha256(file)
    if want != got:
        raise ValueError(
            f"{file} is corrupted: its sha256 is {got[:16]}..., the manifest records {str(want)[:16]}...; "
            f"copy it again or convert again (helix convert --verify {path} checks every file)"
        )
    return file


def _group_device() -> torch.device:
    """The default device of this rank's weights: its GPU under an NCCL process group, else the CPU."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _refuse_eager(module, args, kwargs):
    # allowed: inside a compiled call (torch.compile(model)), or when the instance's forward was replaced by a
    # compiled one (model.forward = torch.compile(model.forward, ...), the way model.generate runs it): the hook
    # fires in module.__call__, before that compiled forward starts tracing
    compiled_forward = hasattr(module.__dict__.get("forward"), "_torchdynamo_orig_callable")
    if not torch.compiler.is_compiling() and not compiled_forward:
        raise ShardedEagerError(
            "this model was loaded with helix_compile.from_pretrained: each rank holds only its shards, so it "
            "cannot run eagerly. Call torch.compile(model, backend='helix', options={'layout': layout})"
        )


def model_from_config(config, **kwargs):
    """``AutoModelForCausalLM.from_config(config, **kwargs)`` with SDPA attention, or with the family's eager
    attention where transformers has no SDPA form of it (Gemma 2, gpt-oss and GPT-Neo in transformers 5.24): helix
    replaces either form with partial attention. Any other error of transformers propagates."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", **kwargs)
    except ValueError as e:
        if "scaled_dot_product_attention" not in str(e):
            raise
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager", **kwargs)


def checkpoint_renamer(model):
    """A function from checkpoint tensor names to ``model``'s parameter names by transformers' own renamings for the
    family (Aria's experts.fc1/fc2.weight are experts.gate_up_proj/down_proj); the identity on a transformers
    without them. Only renamings: the converters that merge per-expert tensors are ``_per_expert``'s job, which
    reads each rank's piece of them without loading all."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings
    except ImportError:
        return lambda key: key
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    return lambda key: apply_renamings(key, renamings)


# safetensors dtype tags <-> torch dtypes
DTYPE_TAGS = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
TAG_DTYPES = {v: k for k, v in DTYPE_TAGS.items()}


class Checkpoint:
    """A checkpoint's tensors by name, read on demand: safetensors files (each opened for one read, so the pages
    of a column slice are unmapped again right away) or tensors in memory (a de-quantised GGUF).

    ``entries``: name -> (shape, dtype) in file order, read from the headers only (dtype None: a safetensors type
    torch has no dtype for here). An FP8 weight with its scale, or MXFP4 blocks with theirs (``quantized``), is one
    entry of ``dtype`` (default bf16) under the parameter's name, de-quantised when read (FP8 in blocks of
    ``block``, the config's ``quantized.block_size``); the scales have no entry of their own."""

    def __init__(self, files=(), tensors: dict | None = None, dtype: torch.dtype | None = None, block=None):
        self.entries, self.where, self.tensors = {}, {}, dict(tensors or {})
        tags = {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    tags[key] = piece.get_dtype()
                    self.entries[key] = (tuple(piece.get_shape()), TAG_DTYPES.get(tags[key]))
                    self.where[key] = Path(file)
        for key, value in self.tensors.items():
            self.entries[key] = (tuple(value.shape), value.dtype)
        self.scale_of, self.dtype, self.block = quantized.pairs(tags), dtype or torch.bfloat16, block
        self.scale_shapes = {}
        for key, scale in self.scale_of.items():
            self.entries[key] = (self.entries[key][0], self.dtype)
            self.scale_shapes[scale] = self.entries.pop(scale)[0]
        self.mxfp4 = quantized.mxfp4_pairs(tags)
        for key, (blocks, scales) in self.mxfp4.items():
            self.entries[key] = (quantized.mxfp4_shape(self.entries.pop(blocks)[0]), self.dtype)
            self.where[key] = self.where[blocks]
            del self.entries[scales]

    def file_name(self, key: str) -> str:
        """Where ``key`` is stored, for messages."""
        return self.where[key].name if key in self.where else "the checkpoint"

    def read(self, key: str, spec=None) -> torch.Tensor:
        """Tensor ``key`` whole (``spec`` None), or only the piece ``spec`` (``Shard``, ``Pieces``,
        ``ExpertShard``) of it."""
        if key in self.tensors:
            value = self.tensors[key]
            return value if spec is None else _read(value, value.shape, spec)
        if key in self.scale_of or key in self.mxfp4:  # de-quantised, then cut
            experts = slice(None)  # stacked experts: only the rank's (ep), so memory is its piece, not the tensor
            if isinstance(spec, ExpertShard):
                experts = slice(spec.e_start, spec.e_stop)
                spec = dataclasses.replace(spec, e_start=0, e_stop=spec.e_stop - spec.e_start)
            if key in self.scale_of:
                scale, shape = self.scale_of[key], self.entries[key][0]
                per_expert = len(shape) == 3 and self.scale_shapes[scale][:1] == shape[:1]  # (E, ...) by (E, out, in)
                value = quantized.dequantize(self._raw(key, experts), self._raw(scale, experts if per_expert else
                                                                                slice(None)), self.dtype, self.block,
                                             key)
            else:
                blocks, scales = self.mxfp4[key]
                value = quantized.dequantize_mxfp4(self._raw(blocks, experts), self._raw(scales, experts),
                                                   self.dtype, key)
            return value if spec is None else _read(value, value.shape, spec)
        with safe_open(self.where[key], framework="pt") as f:
            return f.get_tensor(key) if spec is None else _read(f.get_slice(key), self.entries[key][0], spec)

    def _raw(self, key: str, first=slice(None)) -> torch.Tensor:
        """Tensor ``key`` as stored, or only ``first`` of its first dim."""
        with safe_open(self.where[key], framework="pt") as f:
            return f.get_tensor(key) if first == slice(None) else f.get_slice(key)[first]


@dataclasses.dataclass
class RankTensor:
    """One tensor a rank holds: parameter or persistent buffer ``name`` of the model, of global ``shape``;
    ``spec`` the rank's piece of it (``Shard``, ``Pieces``, ``ExpertShard``; None: the whole tensor);
    ``read()`` reads that piece from the checkpoint (only it); ``dtype`` as stored (an FP8 weight's: the dtype it is
    de-quantised to). ``buffer``: a persistent buffer; ``kv_scale``: an FP8 KV-cache scale (``quantized``), whole,
    named as in the checkpoint, held by the cache rather than the model."""

    name: str
    shape: tuple
    spec: object
    dtype: torch.dtype | None
    read: Callable[[], torch.Tensor]
    buffer: bool = False
    kv_scale: bool = False

    @property
    def local_shape(self) -> tuple:
        if self.spec is None:
            return tuple(self.shape)
        return tuple(self.spec.take(torch.empty(self.shape, device="meta")).shape)


def rank_tensors(checkpoint: Checkpoint, model, layout: Layout, rank: int, local: bool = False) -> list[RankTensor]:
    """What ``rank`` holds of ``checkpoint`` for ``model`` (built without storage, e.g. ``init_empty_weights``)
    under ``layout``: the one place that turns a source checkpoint into a rank's tensors (``from_pretrained`` loads
    them, ``helix convert`` writes them). Names are the model's (transformers' renamings applied; per-expert
    tensors become this rank's piece of the fused expert parameter, see ``_stack_experts``); every shape is checked
    here, from the headers, before anything is read. Tensors that are neither a parameter nor a persistent buffer
    of the model are left out, except KV-cache scales (``kv_scale``). ``local``: ``checkpoint`` is a ``helix convert``
    rank file, holding the pieces."""
    heads = Heads.of(model.config.get_text_config(decoder=True))
    params = dict(model.named_parameters(remove_duplicate=False))
    forms = stored_forms(model)
    buffers = {n: b for n, b in model.named_buffers() if b.device.type != "meta"}
    rename = checkpoint_renamer(model)
    splits = checkpoint_splits(model)
    out, loaded, per_expert = [], set(), {}  # per_expert: fused parameter -> {(expert, part): checkpoint name}
    for key, (stored, dtype) in checkpoint.entries.items():
        name = rename(key)
        parts = _split_parts(key, name, stored, splits, params)
        if parts is not None:  # one checkpoint tensor that transformers cuts into several parameters
            for target, dim, start, stop in parts:
                shape = tuple(params[target].shape)
                spec = shard_spec(target, shape, heads, layout, rank, forms)
                out.append(RankTensor(target, shape, spec, dtype,
                                      functools.partial(_read_part, checkpoint, key, dim, start, stop, spec)))
                loaded.add(target)
            continue
        if name not in params and name not in buffers:  # Mixtral's checkpoint module name (GraniteMoE keeps it)
            name = name.replace(".block_sparse_moe.", ".mlp.")
        where = checkpoint.file_name(key)
        if quantized.KV_SCALE.search(key):
            out.append(RankTensor(key, stored, None, dtype, functools.partial(checkpoint.read, key), kv_scale=True))
            continue
        if name in buffers:  # persistent buffers saved with the weights (DeepSeek's e_score_correction_bias)
            if stored != tuple(buffers[name].shape):
                raise ValueError(f"{where}: buffer {key} has shape {stored}, the model expects "
                                 f"{tuple(buffers[name].shape)}")
            out.append(RankTensor(name, stored, None, dtype, functools.partial(checkpoint.read, key), buffer=True))
            continue
        if name not in params:
            fused = _per_expert(key)
            if fused is not None and fused[0] in params:
                per_expert.setdefault(fused[0], {})[fused[1:]] = key
            continue  # e.g. rotary buffers saved by old checkpoints
        shape = tuple(params[name].shape)
        if dtype is None or not (dtype.is_floating_point or params[name].dtype == dtype):
            raise ValueError(f"{where}: {key} is stored as {dtype or 'a type torch cannot read here'}, not as the "
                             f"floats of {name}: a quantized tensor helix cannot read (it reads plain weights and FP8 "
                             f"ones: {quantized.SUPPORTED})")
        spec = shard_spec(name, shape, heads, layout, rank, forms)
        item = RankTensor(name, shape, spec, dtype, functools.partial(checkpoint.read, key))
        if local:  # a helix convert file holds the rank's piece itself
            if stored != item.local_shape:
                raise ValueError(f"{where}: {name} has shape {stored}, this rank's piece of {shape} is "
                                 f"{item.local_shape}")
        elif stored != shape:
            raise ValueError(f"{where}: {name} has shape {stored}, the model expects {shape}")
        elif spec is not None:
            item.read = functools.partial(checkpoint.read, key, spec)
        out.append(item)
        loaded.add(name)
    for name, found in per_expert.items():
        if name in loaded:
            continue
        shape = tuple(params[name].shape)
        if name in forms["transposed"]:
            raise ValueError(f"{name}: per-expert checkpoint tensors for experts stored (E, in, out) are not supported; "
                             f"use a checkpoint with the fused {name.rsplit('.', 1)[1]}")
        role, _ = role_by_name(name)
        spec = role_shard(role, "weight", shape, heads, layout, rank)
        parts = ("gate", "up") if name.endswith("gate_up_proj") else ("down",)
        want = (shape[1] // len(parts), shape[2])
        for e in range(spec.e_start, spec.e_stop):
            for part in parts:
                if (e, part) not in found:
                    raise ValueError(f"checkpoint lacks expert {e}'s {part} projection of {name}")
                key = found[(e, part)]
                if checkpoint.entries[key][0] != want:
                    raise ValueError(f"{checkpoint.file_name(key)}: {key} has shape {checkpoint.entries[key][0]}, "
                                     f"expected {want} for {name}")
        dtype = checkpoint.entries[next(iter(found.values()))][1]
        out.append(RankTensor(name, shape, spec, dtype,
                              functools.partial(_stack_experts, checkpoint, name, found, spec, parts)))
    return out


def checkpoint_splits(model) -> list[tuple[str, list[str], int]]:
    """transformers' converters for ``model`` that cut one checkpoint tensor into several parameters along a dim
    (its ``Chunk`` and ``Split`` ops: Sarvam-MoE's query_key_value into q/k/v_proj, HRM's gqkv_proj), as
    (source pattern, target patterns, dim); empty on a transformers without them."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter
    except ImportError:
        return []
    return [(t.source_patterns[0], list(t.target_patterns), t.operations[0].dim)
            for t in get_model_conversion_mapping(model)
            if isinstance(t, WeightConverter) and len(t.source_patterns) == 1 and len(t.target_patterns) > 1
            and "*" not in t.source_patterns[0] and len(t.operations) == 1
            and type(t.operations[0]).__name__ in ("Chunk", "Split")]


def _split_parts(key: str, name: str, stored, splits, params):
    """[(parameter, dim, start, stop)] when checkpoint tensor ``key`` (``name`` after renaming) is the source of
    one of ``splits`` whose targets are all parameters, in order along the dim (their sizes must add up to the
    stored size); else None."""
    for source, targets, dim in splits:
        for base in (name, key):
            if source not in base:
                continue
            names = [base.replace(source, target) for target in targets]
            if not all(n in params for n in names):
                continue
            sizes = [params[n].shape[dim] for n in names]
            if sum(sizes) != stored[dim]:
                raise ValueError(f"{key} of shape {tuple(stored)} is cut by transformers into {', '.join(names)}, "
                                 f"whose sizes along dim {dim} add up to {sum(sizes)}, not {stored[dim]}")
            bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
            return [(n, dim, bounds[i], bounds[i + 1]) for i, n in enumerate(names)]
    return None


def _read_part(checkpoint: Checkpoint, key: str, dim: int, start: int, stop: int, spec) -> torch.Tensor:
    """Rows [start, stop) along ``dim`` of checkpoint tensor ``key`` (read whole), then the piece ``spec`` of them."""
    part = checkpoint.read(key).narrow(dim, start, stop - start).contiguous()
    return part if spec is None else _read(part, part.shape, spec)


def stored_forms(model) -> dict[str, set]:
    """Parameter names of ``model`` stored in a form their names do not tell (``shard_spec``'s ``forms``). The
    experts' forms come from transformers' own flags on the experts module (``is_transposed``,
    ``is_concatenated``); a module without ``is_transposed`` is read from its two weights' shapes: (E, 2I, H)
    beside (E, H, I), or (E, H, 2I) beside (E, I, H) transposed (Llama 4). A transformers ``Conv1D`` (GPT-2; not
    GPT-BigCode's ``nn.Linear`` of the same name) stores its weight transposed. A module's ``fc1`` is "gated" when
    it has twice the rows ``fc2`` takes (Moshi's [gate; up])."""
    from transformers.pytorch_utils import Conv1D

    forms = {"transposed": set(), "interleaved": set(), "gated": set()}
    for m, mod in model.named_modules():
        prefix = f"{m}." if m else ""
        if isinstance(mod, Conv1D):
            forms["transposed"].add(prefix + "weight")
        fc1, fc2 = getattr(mod, "fc1", None), getattr(mod, "fc2", None)
        if isinstance(fc1, torch.nn.Linear) and isinstance(fc2, torch.nn.Linear) \
                and fc1.out_features == 2 * fc2.in_features:
            forms["gated"].update({prefix + "fc1.weight", prefix + "fc1.bias"})
        gate_up, down = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
        if not (isinstance(gate_up, torch.nn.Parameter) and isinstance(down, torch.nn.Parameter) and gate_up.dim() == 3
                and down.dim() == 3):
            continue
        flag = getattr(mod, "is_transposed", None)
        if flag is None:  # (E, a, b) and (E, c, d): transposed iff a == d (H) and b == 2c (2I)
            flag = gate_up.shape[1] == down.shape[2] and gate_up.shape[2] == 2 * down.shape[1]
        if flag:
            forms["transposed"].update({prefix + "gate_up_proj", prefix + "down_proj"})
        if getattr(mod, "is_concatenated", True) is False:
            forms["interleaved"].update({prefix + "gate_up_proj", prefix + "gate_up_proj_bias"})
    return forms


def tied_pairs(model) -> dict:
    """{parameter name: the parameter name it is tied to} (see ``_tie``)."""
    expanded = getattr(model, "get_expanded_tied_weights_keys", None)
    pairs = dict(expanded(all_submodels=True)) if expanded is not None else {}
    if getattr(model.config, "tie_word_embeddings", False):
        inp, out = model.get_input_embeddings(), model.get_output_embeddings()
        if out is not None:
            names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
            pairs.setdefault(names[id(out.weight)], names[id(inp.weight)])
    return pairs


def not_held(model, names) -> list[str]:
    """The parameters of ``model`` that neither ``names`` nor a tie to one of them provides."""
    names, pairs = set(names), tied_pairs(model)
    return [n for n, _ in model.named_parameters()
            if n not in names and not any(n in pair and (set(pair) & names) for pair in pairs.items())]


def from_pretrained(path, layout: Layout, dtype=None, device=None, verify: bool = True, experts_implementation=None):
    """Build the HF model of checkpoint ``path`` holding only this rank's shards (see the module docstring).

    ``path`` is an HF safetensors checkpoint directory or a ``helix convert`` output. For the latter ``layout``
    must place the weights as its manifest does (``WEIGHT_FIELDS``), and with ``verify`` the rank's file is checked
    against its sha256 first. ``dtype`` defaults to the config's; ``device`` to the rank's GPU under an NCCL
    process group (``torch.cuda.current_device()``), else the CPU. ``experts_implementation`` (MoE models):
    transformers' ``"grouped_mm"`` (its default) or ``"batched_mm"``, as transformers' own ``from_pretrained``
    takes it.

    A checkpoint with FP8 weights (``quantized``: DeepSeek-V3/R1's fine-grained FP8, compressed-tensors, ModelOpt,
    fbgemm) or MXFP4 experts (gpt-oss) is de-quantised while read, as transformers does without a GPU; its
    KV-cache scales, if any, become ``model.helix_kv_scales`` ({layer: (k_scale, v_scale)}, fp32 per KV head),
    which an FP8 ``StaticCache`` of the model uses. Any other quantization is refused by name.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    path = Path(path)
    manifest = read_manifest(path) if manifest_file(path) else None
    rank, world = current_world()
    if manifest is not None:
        check_layout(manifest, layout, path)
    config = AutoConfig.from_pretrained(path)
    quantized.check(config)
    layout.validate(config.get_text_config(decoder=True), world_size=world)
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    device = torch.device(device) if device is not None else _group_device()
    with init_empty_weights(include_buffers=False):
        extra = {} if experts_implementation is None else {"experts_implementation": experts_implementation}
        model = model_from_config(config, dtype=dtype, **extra)
    if manifest is None:
        checkpoint = Checkpoint(checkpoint_files(path), dtype=dtype, block=quantized.block_size(config))
    else:
        name = rank_file(rank)
        checkpoint = Checkpoint([check_file(path, name, manifest) if verify else path / name])
    kv_scales = {}
    for item in rank_tensors(checkpoint, model, layout, rank, local=manifest is not None):
        if item.kv_scale:
            kv_scales[item.name] = item.read()
            continue
        if item.buffer:
            model.get_buffer(item.name).copy_(item.read())
            continue
        value = item.read().to(device=device, dtype=dtype, copy=True)  # owned, not a view of the mmap
        if item.spec is None:
            _set_param(model, item.name, value)
        else:
            param = _set_param(model, item.name, shards.virtual(item.shape, dtype, device))
            shards.register(param, item.spec, value.contiguous())
    _tie(model, config)
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} parameters, e.g. {missing[:3]}")
    if kv_scales:  # what an FP8 StaticCache of this model starts from (cache.StaticCache)
        model.helix_kv_scales = quantized.kv_scales(kv_scales)
    if hasattr(model.config, "quantization_config"):  # the model holds plain floats: nothing is quantized any more
        del model.config.quantization_config
    if (path / "generation_config.json").is_file():  # decoding defaults, as transformers' from_pretrained reads them
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
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


def _stack_experts(checkpoint: Checkpoint, name: str, found: dict, spec: ExpertShard, parts: tuple) -> torch.Tensor:
    """This rank's piece of a fused expert weight, read from one tensor per expert: only its experts, and of each
    only its rows (gate and up, (I, H)) or columns (down, (H, I)); the same piece ``spec.take`` cuts from the
    fused (E, 2I, H) / (E, H, I) tensor. Shapes are checked by ``rank_tensors``."""
    experts = []
    for e in range(spec.e_start, spec.e_stop):
        pieces = []
        for part in parts:
            key = found[(e, part)]
            pieces.append(checkpoint.read(key, Shard(0 if part != "down" else 1, spec.start, spec.stop)))
        experts.append(torch.cat(pieces, dim=0))
    return torch.stack(experts)


def _tie(model, config) -> None:
    """Tie what the model declares tied (the checkpoint holds either end of each tie): the word embeddings and
    lm_head when ``tie_word_embeddings``, and transformers' other ``_tied_weights_keys`` (BERT's
    ``cls.predictions.decoder.bias`` is ``cls.predictions.bias``)."""
    for target, source in tied_pairs(model).items():
        t, s = model.get_parameter(target), model.get_parameter(source)
        if t.device.type == "meta" and s.device.type != "meta":
            _share(model, target, s)
        elif s.device.type == "meta" and t.device.type != "meta":
            _share(model, source, t)


def _share(model, name: str, param: torch.nn.Parameter) -> None:
    """Make parameter ``name`` the very object ``param`` (a tie, as transformers makes it)."""
    module_name, _, attr = name.rpartition(".")
    model.get_submodule(module_name)._parameters[attr] = param


def _set_param(model, name: str, value: torch.Tensor) -> torch.nn.Parameter:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    param = module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    return param
