"""`helix convert`: split a checkpoint into one safetensors file per rank, plus plan.json.

    helix convert ckpt/ --kvp 2 --tpa 2 -o ckpt-helix/        # HF safetensors directory (sharded or not)
    helix convert model.Q4_1.gguf --kvp 2 -o ckpt-helix/      # GGUF: transformers de-quantises it
    helix convert --verify ckpt-helix/                        # re-check every sha256

Contract
    in:  an HF checkpoint directory (config.json + *.safetensors) or a GGUF file; a Layout.
    out: OUT/rank<r>.safetensors for r in 0..N-1 holding exactly the tensors rank r loads: its shard
         (``loading.shard_spec``, the same function ``from_pretrained`` uses) of every sharded tensor and every
         other tensor in full; OUT/plan.json (format, layout, model config, the sha256 of every file);
         config.json, generation config and tokenizer files. ``from_pretrained(OUT, layout)`` reads only its rank's
         file.
    memory: the rank files are written side by side, tensor by tensor, so peak memory is about one tensor
         (a GGUF is de-quantised by transformers as a whole first).
    atomic: everything is written into a hidden temporary directory beside OUT, renamed to OUT at the end; on an
         error or Ctrl-C the temporary directory is removed. An existing OUT is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
from pathlib import Path

import torch

from .layout import Layout
from .loading import PLAN_FILE, PLAN_FORMAT, _files, read_plan, rank_file, sha256, shard_spec, spec_index
from .passes.plan import Heads

EPILOG = """examples:
  helix convert ckpt/ --kvp 2 --tpa 2 -o ckpt-helix/
  helix convert SmolLM2-135M-Instruct.Q4_1.gguf --kvp 2 --kv-block 16 -o smollm2-helix/
  helix convert --verify ckpt-helix/
"""

# torch dtype -> safetensors dtype tag
_TAGS = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
         torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
         torch.bool: "BOOL"}
_DTYPES = {v: k for k, v in _TAGS.items()}
# Structures helix refuses at compile time; refused here too, before hours of conversion. Suffixes of tensor names.
_FUSED = ("qkv_proj", "query_key_value", "c_attn", "W_pack", "gate_up_proj")
# What convert writes (the backend runs many more families: those load from the HF checkpoint with from_pretrained).
SUPPORTED = ("dense decoders with separate q_proj / k_proj / v_proj weights (llama, qwen2, qwen3, mistral, gemma, olmo, "
             "granite, phi and families built like them)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("convert", help="write one safetensors file per rank plus plan.json",
                              description=__doc__.split("\n")[0].split(": ", 1)[1], epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="HF checkpoint directory (config.json + *.safetensors) or a .gguf file")
    p.add_argument("-o", "--out", help="output directory (must not exist)")
    p.add_argument("--kvp", type=int, help="KV-parallel width")
    p.add_argument("--tpa", type=int, default=1, help="tensor-parallel width of attention (divides the KV heads)")
    p.add_argument("--tpf", type=int, help="tensor-parallel width of the FFN (default N / ep)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel width (MoE only)")
    p.add_argument("--kv-block", type=int, default=16, help="tokens per round-robin KV block (recorded in plan.json)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast floating tensors (default: keep)")
    p.add_argument("--verify", metavar="OUT", help="re-check every file of a conversion against plan.json")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    if args.verify:
        bad = verify(args.verify)
        for line in bad:
            print(f"helix convert --verify: {line}")
        if bad:
            print(f"{len(bad)} bad file(s) in {args.verify}: convert the original checkpoint again (or copy the "
                  f"named files again)")
            return 1
        print(f"{args.verify}: every file matches plan.json")
        return 0
    missing = [n for n, v in (("MODEL", args.model), ("-o/--out", args.out), ("--kvp", args.kvp)) if v is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} required (or --verify OUT)")
    layout = Layout(kvp=args.kvp, tpa=args.tpa, tpf=args.tpf, ep=args.ep, kv_block=args.kv_block)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    out = convert(args.model, layout, args.out, dtype=dtype, progress=not args.quiet)
    print(f"wrote {out}: {layout.world_size} rank files + plan.json (kvp={layout.kvp} tpa={layout.tpa} "
          f"tpf={layout.tpf} ep={layout.ep} kv_block={layout.kv_block})")
    return 0


# -- sources ---------------------------------------------------------------------------------------------------
class _Source:
    """The tensors of a checkpoint without reading their data: ``entries`` = [(name, shape, dtype)]."""

    config = None
    entries: list

    def read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def write_side_files(self, folder: Path) -> None:
        raise NotImplementedError


class _HFDir(_Source):
    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        self.config = _config(path)
        self.where, self.entries = {}, []
        for file in _files(path):
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    piece = f.get_slice(name)
                    tag = piece.get_dtype()
                    if tag not in _DTYPES:
                        raise ValueError(f"{file.name}: {name} has dtype {tag}, which helix convert does not handle")
                    self.where[name] = file
                    self.entries.append((name, tuple(piece.get_shape()), _DTYPES[tag]))

    def read(self, name):
        from safetensors import safe_open

        with safe_open(self.where[name], framework="pt") as f:  # opened per tensor: its pages are unmapped after
            return f.get_tensor(name)

    def write_side_files(self, folder):
        for f in sorted(self.path.iterdir()):  # tokenizer, generation config, chat template, ...
            if f.is_file() and f.name not in ("config.json", "model.safetensors.index.json", PLAN_FILE) \
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
        self.state, self.generation_config = state, model.generation_config
        self.entries = [(k, tuple(v.shape), v.dtype) for k, v in state.items()]

    def read(self, name):
        return self.state[name]

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
            raise ValueError(f"{folder / kw['gguf_file']}: transformers {__version__} cannot read it ({e}); helix "
                             f"convert writes {SUPPORTED}") from None
        raw = folder / "config.json"
        model_type = json.loads(raw.read_text()).get("model_type") if raw.exists() else None
        if model_type is None:
            raise ValueError(f"{folder}: cannot read a config.json with a model_type ({e})") from None
        raise ValueError(
            f"{raw}: unknown model type {model_type!r}: transformers {__version__} does not know it. helix "
            f"convert writes {SUPPORTED}"
        ) from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"model type {config.model_type!r} is not a causal LM; helix convert writes {SUPPORTED}")
    if hasattr(config, "quantization_config"):  # a de-quantised GGUF is plain floats now
        del config.quantization_config
    return config


def open_source(model) -> _Source:
    path = Path(model)
    if not path.exists():
        raise ValueError(f"{model}: no such file or directory (give an HF checkpoint directory or a .gguf file)")
    if path.is_file() and path.suffix == ".gguf":
        return _GGUF(path)
    if path.is_dir():
        if (path / PLAN_FILE).exists():
            raise ValueError(f"{model} is already a helix convert output; convert the original checkpoint")
        return _HFDir(path)
    raise ValueError(f"{model}: not a checkpoint directory or a .gguf file")


DIRECT = ("the backend runs such models: load the HF checkpoint directly with helix_compile.from_pretrained(path, "
          "layout), which reads only this rank's pieces")


def check_supported(config, names) -> None:
    """Refuse checkpoints whose structure the backend would refuse at compile time, naming the tensor."""
    text = config.get_text_config(decoder=True)
    if any(getattr(text, a, None) for a in ("num_local_experts", "num_experts", "n_routed_experts")):
        raise ValueError(f"{config.model_type}: helix convert does not write mixture-of-experts checkpoints yet; {DIRECT}")
    if getattr(text, "kv_lora_rank", None):
        raise ValueError(f"{config.model_type}: helix convert does not write MLA checkpoints yet; {DIRECT}")
    for name in names:
        if name.split(".")[-2:-1] and name.split(".")[-2] in _FUSED:
            raise ValueError(
                f"{config.model_type}: tensor {name} is a fused projection, which helix convert does not split into "
                f"rank files yet; {DIRECT}"
            )
    if not any(n.endswith("q_proj.weight") for n in names):
        raise ValueError(f"{config.model_type}: no q_proj weights found; helix convert writes {SUPPORTED}")


# -- writing ---------------------------------------------------------------------------------------------------
def _header(entries, metadata: dict) -> bytes:
    """A safetensors header for ``entries`` [(name, shape, dtype)] laid out back to back, in order."""
    head, offset = {"__metadata__": metadata}, 0
    for name, shape, dtype in entries:
        size = dtype.itemsize
        for s in shape:
            size *= s
        head[name] = {"dtype": _TAGS[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
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
    names = [e[0] for e in source.entries]
    check_supported(source.config, names)
    text = source.config.get_text_config(decoder=True)
    layout.validate(text)
    heads, n = Heads.of(text), layout.world_size
    if dtype is not None:
        source.config.dtype = dtype
    cast = lambda dt: dtype if dtype is not None and dt.is_floating_point else dt  # noqa: E731

    # per rank: (name, local shape, dtype) in one order, and each tensor's index into the full tensor
    plans = []
    for r in range(n):
        rows = []
        for name, shape, dt in source.entries:
            spec = shard_spec(name, shape, heads, layout, r)
            local = shape if spec is None else tuple(spec.stop - spec.start if d == spec.dim else s
                                                     for d, s in enumerate(shape))
            rows.append((name, local, cast(dt), None if spec is None else spec_index(spec, len(shape))))
        plans.append(rows)

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        meta = {"format": "pt", "helix_layout": json.dumps(_layout_dict(layout))}
        files = [open(tmp / rank_file(r), "wb") for r in range(n)]
        try:
            for r, f in enumerate(files):
                f.write(_header([row[:3] for row in plans[r]], {**meta, "helix_rank": str(r)}))
            total = sum(dt.itemsize * _numel(shape) for _, shape, dt in source.entries)
            with _bar(total, progress) as bar:
                for i, (name, shape, dt) in enumerate(source.entries):
                    full = source.read(name)
                    if dtype is not None and full.is_floating_point():
                        full = full.to(dtype)
                    for r, f in enumerate(files):
                        index = plans[r][i][3]
                        piece = (full if index is None else full[index]).detach().contiguous()
                        f.write(piece.view(-1).view(torch.uint8).numpy().data)
                    del full
                    bar.update(dt.itemsize * _numel(shape))
        finally:
            for f in files:
                f.close()
        source.write_side_files(tmp)
        source.config.save_pretrained(tmp)
        digests = {p.name: sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        plan = {
            "format": PLAN_FORMAT,
            "layout": _layout_dict(layout),
            "world_size": n,
            "ranks": {str(r): rank_file(r) for r in range(n)},
            "source": str(model),
            "model_type": source.config.model_type,
            "config": source.config.to_dict(),
            "files": digests,
        }
        (tmp / PLAN_FILE).write_text(json.dumps(plan, indent=1, sort_keys=True, default=str) + "\n")
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
    """Problems with a conversion, one line each naming the file (empty: every sha256 matches plan.json)."""
    out = Path(out)
    if not (out / PLAN_FILE).exists():
        return [f"{out / PLAN_FILE} is missing: {out} is not a complete helix convert output"]
    plan = read_plan(out)
    bad = []
    for name, want in sorted(plan["files"].items()):
        file = out / name
        if not file.exists():
            bad.append(f"{file}: missing")
        elif (got := sha256(file)) != want:
            bad.append(f"{file}: corrupted (sha256 {got[:16]}..., plan.json records {want[:16]}...)")
    return bad
