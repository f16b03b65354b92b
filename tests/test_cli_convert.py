"""`helix convert`: per-rank files equal to what from_pretrained reads from the HF checkpoint; checksums;
refusals (existing OUT, unknown or unsupported model, another layout, another world size); nothing half-written."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from torch.testing._internal.distributed.fake_pg import FakeStore

import helix_compile
from helix_compile import Layout, shards
from helix_compile.cli import main
from helix_compile.convert import convert
from cli_checkpoint import save

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _as_rank(rank, world, fn):
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        return fn()
    finally:
        dist.destroy_process_group()


def _held(model):
    """name -> the tensor this rank holds for it (its registered shard, or the parameter itself)."""
    out = {}
    for name, p in model.named_parameters():
        keys = shards.keys_of(p)
        out[name] = shards.lookup(p, keys[0]) if keys else p
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    ckpt = save(root / "hf", "qwen2")  # q/k/v biases: sharded 1-d tensors too
    assert main(["convert", str(ckpt), "--kvp", "2", "--tpa", "2", "--kv-block", "4", "-o", str(root / "out"),
                 "--quiet"]) == 0
    return ckpt, root / "out"


def test_rank_files_hold_exactly_what_from_pretrained_reads(converted):
    ckpt, out = converted
    layout = Layout(2, 2, kv_block=4)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["layout"] == dict(kvp=2, tpa=2, tpf=4, ep=1, kv_block=4, hopb_chunks=1) and plan["world_size"] == 4
    assert {"config.json", "tokenizer.json", "rank0.safetensors", "rank3.safetensors"} <= set(plan["files"])
    sharded_elems = 0
    for rank in range(4):
        from_hf = _as_rank(rank, 4, lambda: _held(helix_compile.from_pretrained(ckpt, layout)))
        from_out = _as_rank(rank, 4, lambda: _held(helix_compile.from_pretrained(out, layout)))
        assert from_hf.keys() == from_out.keys()
        for name in from_hf:
            assert torch.equal(from_hf[name], from_out[name]), (rank, name)
        with safe_open(out / f"rank{rank}.safetensors", framework="pt") as f:
            stored = {k: f.get_slice(k).get_shape() for k in f.keys()}
        assert stored["model.layers.0.self_attn.q_proj.weight"] == [32, 64]  # 8 heads / tpa=2 = 4 heads x 8
        assert stored["model.layers.0.self_attn.o_proj.weight"] == [64, 16]  # 2 heads x 8 after the all-to-all
        assert stored["model.layers.0.mlp.down_proj.weight"] == [64, 24]  # 96 / tpf=4
        sharded_elems += sum(s[0] * (s[1] if len(s) > 1 else 1) for k, s in stored.items() if "proj" in k)
    with safe_open(ckpt / "model.safetensors", framework="pt") as f:
        full = sum(f.get_slice(k).get_shape()[0] * (f.get_slice(k).get_shape() + [1])[1] for k in f.keys()
                   if "proj" in k and not any(p in k for p in ("q_proj", "k_proj", "v_proj")))
        qkv = sum(f.get_slice(k).get_shape()[0] * (f.get_slice(k).get_shape() + [1])[1] for k in f.keys()
                  if any(p in k for p in ("q_proj", "k_proj", "v_proj")))
    assert sharded_elems == full + 2 * qkv  # a TPA slice's q/k/v rows are replicated over its kvp=2 ranks


def test_verify_names_a_corrupted_or_missing_file(converted, tmp_path, capsys):
    import shutil

    _, good = converted
    out = tmp_path / "copy"
    shutil.copytree(good, out)
    assert main(["convert", "--verify", str(out)]) == 0
    data = bytearray((out / "rank1.safetensors").read_bytes())
    data[-3] ^= 0xFF  # one flipped byte in the last tensor
    (out / "rank1.safetensors").write_bytes(bytes(data))
    assert main(["convert", "--verify", str(out)]) == 1
    text = capsys.readouterr().out
    assert "rank1.safetensors: corrupted" in text and "rank0" not in text.replace(str(out), "")
    with pytest.raises(ValueError, match="rank1.safetensors is corrupted: its sha256"):
        _as_rank(1, 4, lambda: helix_compile.from_pretrained(out, Layout(2, 2)))
    (out / "rank2.safetensors").unlink()
    assert main(["convert", "--verify", str(out)]) == 1
    assert "rank2.safetensors: missing" in capsys.readouterr().out
    with pytest.raises(ValueError, match="rank2.safetensors is missing"):
        _as_rank(2, 4, lambda: helix_compile.from_pretrained(out, Layout(2, 2)))


def test_other_layout_or_world_size_refused(converted):
    _, out = converted
    with pytest.raises(ValueError, match="converted for kvp=2 tpa=2 tpf=4 ep=1 .4 ranks. but the layout asked for "
                                         "is kvp=4 tpa=1 tpf=4 ep=1"):
        _as_rank(0, 4, lambda: helix_compile.from_pretrained(out, Layout(4, 1)))
    with pytest.raises(ValueError, match="needs N=4 ranks, but the default process group has world size 2"):
        _as_rank(0, 2, lambda: helix_compile.from_pretrained(out, Layout(2, 2)))
    # kv_block and hopb_chunks do not move weights: allowed
    _as_rank(3, 4, lambda: helix_compile.from_pretrained(out, Layout(2, 2, kv_block=32, hopb_chunks=2)))


def test_existing_out_refused(converted, capsys):
    ckpt, out = converted
    before = sorted(os.listdir(out))
    assert main(["convert", str(ckpt), "--kvp", "4", "-o", str(out), "--quiet"]) == 2
    assert "already exists: helix convert never overwrites" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == before


def test_unknown_and_unsupported_models_refused(tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "not-a-model", "hidden_size": 8}))
    assert main(["convert", str(bad), "--kvp", "2", "-o", str(tmp_path / "o1"), "--quiet"]) == 2
    assert "unknown model type 'not-a-model'" in capsys.readouterr().err
    cfg = AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "gpt2")
    assert main(["convert", str(tmp_path / "gpt2"), "--kvp", "2", "-o", str(tmp_path / "o2"), "--quiet"]) == 2
    assert "tensor transformer.h.0.attn.c_attn.bias is a fused projection" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "nowhere"), "--kvp", "2", "-o", str(tmp_path / "o3")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert not any(p.name.startswith(("o1", "o2", "o3", ".o")) for p in tmp_path.iterdir())


def test_layout_that_does_not_fit_the_model_refused(converted, tmp_path, capsys):
    ckpt, _ = converted
    assert main(["convert", str(ckpt), "--kvp", "1", "--tpa", "3", "-o", str(tmp_path / "o"), "--quiet"]) == 2
    assert "tpa=3 does not divide num_key_value_heads=4" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_interrupt_leaves_nothing_behind(converted, tmp_path, monkeypatch, capsys):
    """Ctrl-C (KeyboardInterrupt) after some tensors were written: exit 130, no OUT, no temporary directory."""
    from helix_compile import convert as convert_mod

    ckpt, _ = converted
    real, calls = convert_mod._HFDir.read, []

    def read(self, name):
        calls.append(name)
        if len(calls) == 5:
            assert any(p.name.startswith(".o.tmp-") for p in tmp_path.iterdir())  # it was writing
            raise KeyboardInterrupt
        return real(self, name)

    monkeypatch.setattr(convert_mod._HFDir, "read", read)
    assert main(["convert", str(ckpt), "--kvp", "2", "-o", str(tmp_path / "o"), "--quiet"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
