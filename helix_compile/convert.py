"""Checkpoint conversion (what `helix convert` runs): one safetensors file per rank, plus a manifest.

    from helix_compile import Layout
    from helix_compile.convert import convert, verify
    convert("ckpt/", Layout(kvp=2, tpa=2), "ckpt-helix/")     # HF safetensors directory (sharded or not) or .gguf
    verify("ckpt-helix/")                                     # [] when every sha256 matches the manifest

The manifest is the file ``manifest.json`` (``loading.MANIFEST_FILE``): the format, the whole layout, the model
config and the sha256 of every file. ``plan.json``, the name earlier versions wrote, is read too (the same format),
so their conversions load, verify and are refused as sources as before.

Contract
    in:  an HF checkpoint directory (config.json + *.safetensors) or a GGUF file, of any family that
         ``helix_compile.from_pretrained`` reads (fused projections, GPT-2's Conv1D with biases, per-head interleaved
         qkv, MLA, mixture-of-experts with fused or per-expert tensors, FP8 and MXFP4 weights: ``quantized``);
         a Layout (kvp, tpa, ep; tpf = N / ep).
    out: OUT/rank<r>.safetensors for r in 0..N-1 holding exactly the tensors rank r loads
         (``loading.rank_tensors``, the same function ``from_pretrained`` reads a checkpoint with), named as the
         model names them: its piece of every sharded tensor (of a routed-expert weight: only its ep experts, each
         cut to its tpf slice, fused; FP8 and MXFP4 weights de-quantised to the config's dtype), every other
         tensor in full (FP8 KV-cache scales too, under their checkpoint names); the manifest OUT/manifest.json
         (format, the whole layout, model config, the sha256 of every file); config.json, generation config and
         tokenizer files.
         ``from_pretrained(OUT, layout)`` reads only its rank's file, and refuses a layout whose kvp, tpa, tpf or
         ep differ from the manifest's.
    refused: what the backend refuses (a layout that does not divide the heads, the FFN or the experts, MLA with
         tpa > 1, ...), a checkpoint lacking parameters of the model, an unknown model type; before anything is
         written.
    memory: the rank files are written side by side, tensor by tensor, each rank's piece read on its own, so peak
         memory is about one tensor (a GGUF is de-quantised by transformers as a whole first).
    atomic: everything is written into a hidden temporary directory beside OUT, renamed to OUT at the end; on an
         error or Ctrl-C the temporary directory is removed. An existing OUT is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch

from . import quantized
from .layout import Layout
from .loading import (DTYPE_TAGS, EARLIER_MANIFEST_FILE, MANIFEST_FILE, MANIFEST_FORMAT, Checkpoint, RankTensor,
                      checkpoint_files, manifest_file, model_from_config, not_held, rank_file, rank_tensors,
                      read_manifest, sha256)

# -- sources ---------------------------------------------------------------------------------------------------
class _Source:
    """A checkpoint to convert: its config, its tensors (``loading.Checkpoint``, read on demand) and side files."""

    config = None
    checkpoint: Checkpoint

    def write_side_files(self, folder: Path) -> None:
        raise NotImplementedError


class _HFDir(_Source):
    def __init__(self, path: Path):
        self.path = path
        raw = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        quantized.check(raw)  # FP8 / MXFP4 weights are written de-quantised; others refused
        self.config = _config(path)
        dtype = getattr(self.config, "dtype", None)
        self.checkpoint = Checkpoint(checkpoint_files(path), dtype=getattr(torch, dtype) if isinstance(dtype, str)
                                     else dtype, block=quantized.block_size(raw))

    def write_side_files(self, folder):
        for f in sorted(self.path.iterdir()):  # tokenizer, generation config, chat template, ...
            if f.is_file() and f.name not in ("config.json", "model.safetensors.index.json", MANIFEST_FILE,
                                              EARLIER_MANIFEST_FILE) \
                    and f.suffix not in (".safetensors", ".bin", ".pt", ".pth", ".gguf"):
                shutil.copy2(f, folder / f.name)


class _GGUF(_Source):
    def __init__(self, path: Path):
        from transformers import AutoModelForCausalLM

        self.path = path
        self.config = _config(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        state, seen = {}, set()
        for name, value in model.state_dict().items():
            if value.data_ptr() in seen:  # a tied lm_head: one end is enough, loading re-ties it
                continue
            seen.add(value.data_ptr())
            state[name] = value
        self.generation_config = model.generation_config
        self.checkpoint = Checkpoint(tensors=state)

    def write_side_files(self, folder):
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name).save_pretrained(folder)
        self.generation_config.save_pretrained(folder)


def _config(folder: Path, **kw):
    from transformers import AutoConfig, __version__
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(folder, **kw)
    except (ValueError, KeyError, OSError) as e:
        if kw:  # a GGUF: transformers names the architecture it does not map
            raise ValueError(f"{folder / kw['gguf_file']}: transformers {__version__} cannot read it ({e})") from None
        raw = folder / "config.json"
        model_type = json.loads(raw.read_text()).get("model_type") if raw.exists() else None
        if model_type is None:
            raise ValueError(f"{folder}: cannot read a config.json with a model_type ({e})") from None
        raise ValueError(f"{raw}: unknown model type {model_type!r}: transformers {__version__} does not know it") \
            from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"model type {config.model_type!r} is not a causal LM: transformers {__version__} has no "
                         f"AutoModelForCausalLM class for it, and helix runs causal LMs")
    if hasattr(config, "quantization_config"):  # a de-quantised GGUF, FP8 or MXFP4 checkpoint is plain floats now
        del config.quantization_config
    return config


def open_source(model) -> _Source:
    path = Path(model)
    if not path.exists():
        raise ValueError(f"{model}: no such file or directory (give an HF checkpoint directory or a .gguf file)")
    if path.is_file() and path.suffix == ".gguf":
        return _GGUF(path)
    if path.is_dir():
        if manifest_file(path):
            raise ValueError(f"{model} is already a helix convert output; convert the original checkpoint")
        return _HFDir(path)
    raise ValueError(f"{model}: not a checkpoint directory or a .gguf file")


def _empty_model(config):
    """The model of ``config`` without parameter storage: the names and shapes ``rank_tensors`` places."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return model_from_config(config, dtype=torch.float32)


def rank_contents(source: _Source, layout: Layout) -> list[list[RankTensor]]:
    """Each rank's tensors (``loading.rank_tensors``, what ``from_pretrained`` reads), checked before anything is
    written: the layout fits the model (``Layout.validate``, ``role_shard``), every parameter is in the
    checkpoint, every dtype can be written."""
    text = source.config.get_text_config(decoder=True)
    layout.validate(text)
    model = _empty_model(source.config)
    ranks = [rank_tensors(source.checkpoint, model, layout, r) for r in range(layout.world_size)]
    missing = not_held(model, [t.name for t in ranks[0]])
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} of the {source.config.model_type} model's parameters, "
                         f"e.g. {missing[:3]}")
    for t in ranks[0]:
        if t.dtype is None:
            raise ValueError(f"{t.name} is stored in a dtype helix convert does not write (it writes "
                             f"{', '.join(DTYPE_TAGS.values())})")
    return ranks


# -- writing ---------------------------------------------------------------------------------------------------
def _header(entries, metadata: dict) -> bytes:
    """A safetensors header for ``entries`` [(name, shape, dtype)] laid out back to back, in order."""
    head, offset = {"__metadata__": metadata}, 0
    for name, shape, dtype in entries:
        size = dtype.itemsize * _numel(shape)
        head[name] = {"dtype": DTYPE_TAGS[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text


def convert(model, layout: Layout, out, dtype: torch.dtype | None = None, progress: bool = True,
            source: _Source | None = None) -> Path:
    """Convert ``model`` (HF directory or .gguf) for ``layout`` into ``out``; see the module docstring.

    ``source`` is ``open_source(model)`` when the caller already opened it (a GGUF is de-quantised on opening).
    """
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} already exists: helix convert never overwrites; remove it or choose another -o")
    source = source or open_source(model)
    ranks = rank_contents(source, layout)
    n = layout.world_size
    if dtype is not None:
        source.config.dtype = dtype
    cast = lambda dt: dtype if dtype is not None and dt.is_floating_point else dt  # noqa: E731
    entries = [[(t.name, t.local_shape, torch.float32 if t.kv_scale else cast(t.dtype)) for t in tensors]
               for tensors in ranks]

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        meta = {"format": "pt", "helix_layout": json.dumps(_layout_dict(layout))}
        files = [open(tmp / rank_file(r), "wb") for r in range(n)]
        try:
            for r, f in enumerate(files):
                f.write(_header(entries[r], {**meta, "helix_rank": str(r)}))
            total = sum(dt.itemsize * _numel(shape) for rows in entries for _, shape, dt in rows)
            with _bar(total, progress) as bar:
                # tensor by tensor, every rank's piece of it in turn: one piece in memory at a time, and the ranks'
                # reads of one source tensor follow each other (its pages are still cached)
                for i in range(len(entries[0])):
                    for r, f in enumerate(files):
                        _, shape, dt = entries[r][i]
                        piece = ranks[r][i].read().to(dt).contiguous()
                        if tuple(piece.shape) != shape:  # rank_tensors checked the headers; this is the data
                            raise ValueError(f"{ranks[r][i].name}: read {tuple(piece.shape)} for rank {r}, "
                                             f"expected {shape}")
                        f.write(piece.view(-1).view(torch.uint8).numpy().data)
                        bar.update(dt.itemsize * _numel(shape))
                        del piece
        finally:
            for f in files:
                f.close()
        source.write_side_files(tmp)
        source.config.save_pretrained(tmp)
        digests = {p.name: sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {
            "format": MANIFEST_FORMAT,
            "layout": _layout_dict(layout),
            "world_size": n,
            "ranks": {str(r): rank_file(r) for r in range(n)},
            "source": str(model),
            "model_type": source.config.model_type,
            "config": source.config.to_dict(),
            "files": digests,
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str) + "\n")
        if out.exists():
            raise ValueError(f"{out} appeared while converting; nothing was overwritten")
        os.rename(tmp, out)
    except BaseException:  # errors and Ctrl-C: leave nothing half-written
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _layout_dict(layout: Layout) -> dict:
    return {f: getattr(layout, f) for f in ("kvp", "tpa", "tpf", "ep", "kv_block", "hopb_chunks")}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="helix convert", disable=not enabled, leave=False)


def verify(out) -> list[str]:
    """Problems with a conversion, one line each naming the file (empty: every sha256 matches the manifest)."""
    out = Path(out)
    recorded = manifest_file(out)
    if recorded is None:
        return [f"{out / MANIFEST_FILE} is missing: {out} is not a complete helix convert output"]
    manifest = read_manifest(out)
    bad = []
    for name, want in sorted(manifest["files"].items()):
        file = out / name
        if not file.exists():
            bad.append(f"{file}: missing")
        elif (got := sha256(file)) != want:
            bad.append(f"{file}: corrupted (sha256 {got[:16]}..., the manifest {recorded.name} records {want[:16]}...)")
    return bad
