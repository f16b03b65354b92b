"""Checks of a checkpoint and of a request before any rank starts: one clear line per problem, with the numbers.

``helix generate`` calls these in the launching process (and, under torchrun, in every process before it joins
the group), so that a bad argument or a broken checkpoint never costs a rank start, a load or a compile.

- ``check_checkpoint(path)``: a config.json, a tokenizer and weights are there, the weights are plain or FP8
  (``quantized.check``), and every safetensors file is whole (its header parses and the file is as long as the
  header says; a helix convert output's files match its manifest's sha256).
- ``max_positions(config)``: the size of the model's learned position table (``None``: positions are unbounded).
- ``check_request(config, prompt_len, max_new_tokens)``: prompt plus new tokens within the model's positions.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

# config attributes that hold the size of a learned position table, in the order families use them
POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")
# families that look positions up in a learned table: a position past it is an index error inside the model.
# (Rotary and ALiBi families have no table: their config value is the training length, and going past it is
# the user's choice, as in transformers.)
LEARNED_POSITIONS = {
    "gpt2", "gpt_bigcode", "gpt_neo", "opt", "biogpt", "bert", "roberta", "camembert", "xlm-roberta",
    "xlm-roberta-xl", "electra", "ernie", "data2vec-text", "roberta-prelayernorm", "roc_bert", "xmod",
    "megatron-bert", "rembert", "big_bird", "bert-generation", "trocr", "git",
}


def check_safetensors(file: Path) -> None:
    """Raise ValueError if ``file`` is not a whole safetensors file (truncated, or its header does not parse)."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{file} is {size} bytes: too short for a safetensors file (truncated or empty)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"{file} is truncated or not safetensors: its header claims {n} bytes, the file has "
                             f"{size - 8} after the length field")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{file}: corrupted safetensors header ({e})") from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    want = 8 + n + max(ends, default=0)
    if size != want:
        raise ValueError(f"{file} is truncated or corrupted: its header describes {want} bytes, the file has {size}; "
                         f"copy or download it again")


def check_checkpoint(path: Path, checksums: bool = True) -> None:
    """A config, a tokenizer and whole weight files in ``path`` (an HF directory or a helix convert output).

    With ``checksums``, a helix convert output's files are also checked against its manifest's sha256 (a flipped
    byte is caught here, not only a truncation)."""
    from .loading import check_file, manifest_file, read_manifest

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json: give an HF checkpoint directory (save_pretrained's output), a "
                         f"helix convert output or a .gguf file")
    from . import quantized

    quantized.check(json.loads((path / "config.json").read_text()))  # FP8 weights are read; other formats refused
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
    if not any((path / f).is_file() for f in tokenizer_files):
        raise ValueError(f"{path} has no tokenizer (none of {', '.join(tokenizer_files)}): save the tokenizer beside "
                         f"the weights (tokenizer.save_pretrained({str(path)!r}))")
    manifest = manifest_file(path)
    if manifest is not None:
        files = [path / name for name in json.loads(manifest.read_text()).get("files", {})
                 if name.endswith(".safetensors")]
    else:
        index = path / "model.safetensors.index.json"
        if index.is_file():
            files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(path.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        hint = f" ({', '.join(other)} found: re-save it with safe_serialization)" if other else ""
        raise ValueError(f"{path} has no *.safetensors weights{hint}")
    for file in files:
        if not file.is_file():
            raise ValueError(f"{file} is missing: the checkpoint in {path} is incomplete")
        check_safetensors(file)
    if manifest is not None and checksums:
        recorded = read_manifest(path)
        for name in recorded.get("files", {}):
            check_file(path, name, recorded)


def max_positions(config) -> tuple[int, str] | None:
    """(positions, config field) of a model with a learned position table; None where positions are unbounded."""
    text = config.get_text_config(decoder=True)
    if getattr(text, "model_type", None) not in LEARNED_POSITIONS:
        return None
    for name in POSITION_FIELDS:
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value, name
    return None


def check_request(config, prompt_len: int, max_new_tokens: int) -> None:
    """Prompt plus new tokens within the model's positions; positive token counts."""
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if prompt_len < 1:
        raise ValueError("the prompt is 0 tokens")
    limit = max_positions(config)
    if limit is not None and prompt_len + max_new_tokens > limit[0]:
        raise ValueError(f"the prompt ({prompt_len} tokens) plus --max-new-tokens {max_new_tokens} is "
                         f"{prompt_len + max_new_tokens} positions, but {config.model_type} has {limit[0]} "
                         f"(config.{limit[1]}): shorten the prompt or ask for fewer tokens")
