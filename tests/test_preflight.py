"""Checks before any rank starts: whole checkpoint files, positions, token counts (helix_compile.preflight)."""

import json

import pytest
import torch

from cli_checkpoint import save
from helix_compile.preflight import check_checkpoint, check_request, check_safetensors, max_positions


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save(tmp_path_factory.mktemp("preflight") / "hf", "llama")


def test_whole_checkpoint_passes(ckpt):
    check_checkpoint(ckpt)


def test_truncated_file(ckpt, tmp_path):
    data = (ckpt / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match=rf"truncated or corrupted: its header describes {len(data)} bytes, the "
                                         rf"file has {len(data) - 100}"):
        check_safetensors(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").write_bytes(data[:5])
    with pytest.raises(ValueError, match="5 bytes: too short"):
        check_safetensors(tmp_path / "model.safetensors")


def test_corrupted_header(ckpt, tmp_path):
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[9] = 0xFF  # inside the JSON header
    (tmp_path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted safetensors header"):
        check_safetensors(tmp_path / "model.safetensors")


def test_missing_parts(ckpt, tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        check_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text((ckpt / "config.json").read_text())
    with pytest.raises(ValueError, match="has no tokenizer"):
        check_checkpoint(tmp_path)
    (tmp_path / "tokenizer.json").write_text((ckpt / "tokenizer.json").read_text())
    with pytest.raises(ValueError, match=r"has no \*.safetensors weights"):
        check_checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "part-1.safetensors"}}))
    with pytest.raises(ValueError, match="part-1.safetensors is missing"):
        check_checkpoint(tmp_path)


def test_positions():
    from transformers import AutoConfig

    gpt2 = AutoConfig.for_model("gpt2", n_positions=512)
    assert max_positions(gpt2) == (512, "max_position_embeddings")  # transformers maps it to n_positions
    assert max_positions(AutoConfig.for_model("llama", max_position_embeddings=128)) is None  # RoPE: no table
    check_request(gpt2, 500, 12)
    with pytest.raises(ValueError, match=r"the prompt \(510 tokens\) plus --max-new-tokens 3 is 513 positions, but "
                                         r"gpt2 has 512 \(config.max_position_embeddings\)"):
        check_request(gpt2, 510, 3)
    with pytest.raises(ValueError, match="--max-new-tokens must be at least 1, got 0"):
        check_request(gpt2, 5, 0)


def test_dtype_checkpoint_saves_in_that_dtype(tmp_path):
    from safetensors import safe_open

    folder = save(tmp_path / "bf16", "llama", dtype=torch.bfloat16)
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
