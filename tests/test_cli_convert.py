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
from models import model

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
    manifest = json.loads((out / "manifest.json").read_text())
    assert not (out / "plan.json").exists()
    assert manifest["format"] == "helix-convert/1"
    assert manifest["layout"] == dict(kvp=2, tpa=2, tpf=4, ep=1, kv_block=4, hopb_chunks=1)
    assert manifest["world_size"] == 4
    assert {"config.json", "tokenizer.json", "rank0.safetensors", "rank3.safetensors"} <= set(manifest["files"])
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


def test_a_manifest_named_plan_json_is_read_too(converted, tmp_path, capsys):
    """A conversion whose manifest is ``plan.json`` (the name earlier versions wrote) loads, verifies, is checked
    before a rank starts and is refused as a source, as one with ``manifest.json``; its format is checked too."""
    import shutil

    from helix_compile.preflight import check_checkpoint

    ckpt, good = converted
    out = tmp_path / "earlier"
    shutil.copytree(good, out)
    (out / "manifest.json").rename(out / "plan.json")
    layout = Layout(2, 2, kv_block=4)
    new = _as_rank(3, 4, lambda: _held(helix_compile.from_pretrained(good, layout)))
    earlier = _as_rank(3, 4, lambda: _held(helix_compile.from_pretrained(out, layout)))
    assert new.keys() == earlier.keys() and all(torch.equal(new[k], earlier[k]) for k in new)
    with pytest.raises(ValueError, match="converted for kvp=2 tpa=2 tpf=4 ep=1 .4 ranks. but the layout asked for"):
        _as_rank(0, 4, lambda: helix_compile.from_pretrained(out, Layout(4, 1)))
    assert main(["convert", "--verify", str(out)]) == 0
    check_checkpoint(out)
    assert main(["convert", str(out), "--kvp", "2", "-o", str(tmp_path / "again"), "--quiet"]) == 2
    assert "is already a helix convert output" in capsys.readouterr().err
    data = bytearray((out / "rank0.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (out / "rank0.safetensors").write_bytes(bytes(data))
    assert main(["convert", "--verify", str(out)]) == 1
    assert "rank0.safetensors: corrupted (sha256" in capsys.readouterr().out
    with pytest.raises(ValueError, match="rank0.safetensors is corrupted: its sha256 is .*, the manifest records"):
        check_checkpoint(out)
    (out / "plan.json").write_text(json.dumps({**json.loads((good / "manifest.json").read_text()), "format": "x/9"}))
    with pytest.raises(ValueError, match=r"plan.json has format 'x/9', this helix reads 'helix-convert/1'"):
        _as_rank(0, 4, lambda: helix_compile.from_pretrained(out, layout))


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


def test_unknown_models_refused(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "not-a-model", "hidden_size": 8}))
    assert main(["convert", str(bad), "--kvp", "2", "-o", str(tmp_path / "o1"), "--quiet"]) == 2
    assert "unknown model type 'not-a-model'" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "nowhere"), "--kvp", "2", "-o", str(tmp_path / "o3")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert not any(p.name.startswith(("o1", "o3", ".o")) for p in tmp_path.iterdir())


def test_layout_that_does_not_fit_the_model_refused(converted, tmp_path, capsys):
    """What the backend refuses is refused before anything is written: heads, experts, MLA with tpa > 1, and a
    checkpoint that lacks a parameter of the model."""
    from safetensors.torch import load_file, save_file

    ckpt, _ = converted
    assert main(["convert", str(ckpt), "--kvp", "1", "--tpa", "3", "-o", str(tmp_path / "o"), "--quiet"]) == 2
    assert "tpa=3 does not divide num_key_value_heads=4" in capsys.readouterr().err
    moe, mla = tmp_path / "moe", tmp_path / "mla"
    model("mixtral").save_pretrained(moe)
    model("deepseek_v3").save_pretrained(mla)
    assert main(["convert", str(moe), "--kvp", "8", "--ep", "8", "-o", str(tmp_path / "o"), "--quiet"]) == 2
    assert "ep=8 does not divide the 4 routed experts" in capsys.readouterr().err
    assert main(["convert", str(mla), "--kvp", "1", "--tpa", "2", "-o", str(tmp_path / "o"), "--quiet"]) == 2
    assert "multi-head latent attention (MLA): its cache holds one latent KV head, so tpa must be 1" in \
        capsys.readouterr().err
    state = load_file(moe / "model.safetensors")
    save_file({k: v for k, v in state.items() if k != "model.norm.weight"}, moe / "model.safetensors",
              metadata={"format": "pt"})
    assert main(["convert", str(moe), "--kvp", "2", "-o", str(tmp_path / "o"), "--quiet"]) == 2
    assert "the checkpoint lacks 1 of the mixtral model's parameters, e.g. ['model.norm.weight']" in \
        capsys.readouterr().err
    del state["model.layers.1.block_sparse_moe.experts.3.w2.weight"]  # on rank 1 of ep=2
    save_file(state, moe / "model.safetensors", metadata={"format": "pt"})
    assert main(["convert", str(moe), "--kvp", "2", "--ep", "2", "-o", str(tmp_path / "o"), "--quiet"]) == 2
    assert "checkpoint lacks expert 3's down projection of model.layers.1.mlp.experts.down_proj" in \
        capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mla", "moe"]


def test_interrupt_leaves_nothing_behind(converted, tmp_path, monkeypatch, capsys):
    """Ctrl-C (KeyboardInterrupt) after some tensors were written: exit 130, no OUT, no temporary directory."""
    from helix_compile import convert as convert_mod

    ckpt, _ = converted
    real, calls = convert_mod.Checkpoint.read, []

    def read(self, name, spec=None):
        calls.append(name)
        if len(calls) == 5:
            assert any(p.name.startswith(".o.tmp-") for p in tmp_path.iterdir())  # it was writing
            raise KeyboardInterrupt
        return real(self, name, spec)

    monkeypatch.setattr(convert_mod.Checkpoint, "read", read)
    assert main(["convert", str(ckpt), "--kvp", "2", "-o", str(tmp_path / "o"), "--quiet"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# name -> (family, layout fields, how the source checkpoint stores the weights)
FAMILIES = {
    "mixtral_ep2": ("mixtral", dict(kvp=2, tpa=1, ep=2), "save_pretrained"),  # per-expert w1/w3/w2: 2 experts a rank
    "mixtral_tpf2": ("mixtral", dict(kvp=1, tpa=2, ep=1), "fused"),  # fused 3-D experts, each split over tpf=2
    "deepseek_v3": ("deepseek_v3", dict(kvp=2, tpa=1), "save_pretrained"),  # MLA + per-expert MoE + router buffer
    "phi3": ("phi3", dict(kvp=1, tpa=2), "save_pretrained"),  # fused qkv_proj, gate_up_proj
    "gpt2": ("gpt2", dict(kvp=1, tpa=2), "save_pretrained"),  # Conv1D c_attn / c_proj / c_fc with biases, tied lm_head
    # per-head interleaved [q_h k_h v_h] query_key_value; its state dict (transformers 5.24's save_pretrained drops
    # the untied embed_out)
    "gpt_neox": ("gpt_neox", dict(kvp=1, tpa=2), "fused"),
}


def _exact(sharded, reference, layout, steps=3) -> float:
    """Prefill then ``steps`` greedy decode steps of the compiled sharded model against transformers, no attention
    mask; max relative error of the last logits, asserting identical tokens."""
    from transformers import StaticCache as HFStaticCache

    from helix_compile import StaticCache
    from models import prompt

    cache, ref_cache = StaticCache(sharded.config, 2, 16, layout), HFStaticCache(reference.config, max_cache_len=16)
    compiled = torch.compile(sharded, backend="helix", options={"layout": layout, "executor": "eager"}, fullgraph=True)
    ids, err = prompt(), 0.0
    with torch.no_grad():
        for _ in range(1 + steps):
            out = compiled(input_ids=ids, past_key_values=cache).logits[:, -1]
            ref = reference(input_ids=ids, past_key_values=ref_cache).logits[:, -1]
            err = max(err, ((out - ref).abs().max() / ref.abs().max()).item())
            assert torch.equal(out.argmax(-1), ref.argmax(-1))
            ids = ref.argmax(-1, keepdim=True)
    return err


def _load_converted(rank, outs):
    out = []
    for name, folder in outs.items():
        family, fields, _ = FAMILIES[name]
        torch._dynamo.reset()
        layout = Layout(kv_block=4, **fields)
        sharded = helix_compile.from_pretrained(folder, layout)
        out.append((name, _exact(sharded, model(family), layout)))
    return out


def test_every_family_converts_and_runs_exact(tmp_path):
    """MoE (per-expert and fused sources; ep=2, and ep=1 x tpf=2), MLA, fused projections, Conv1D with biases and
    per-head interleaved qkv: converted, then from_pretrained(OUT) on 2 gloo ranks, exact against transformers."""
    from safetensors.torch import save_file

    from distributed import run_ranks

    outs = {}
    for name, (family, fields, form) in FAMILIES.items():
        src, out = tmp_path / f"{name}-hf", tmp_path / f"{name}-helix"
        m = model(family)
        if form == "fused":  # the model's own tensors (experts.gate_up_proj (E, 2I, H), experts.down_proj (E, H, I))
            src.mkdir()
            m.config.save_pretrained(src)
            save_file({k: v.contiguous() for k, v in m.state_dict().items()}, src / "model.safetensors",
                      metadata={"format": "pt"})
        else:
            m.save_pretrained(src)
        flags = [f"--{k}={v}" for k, v in fields.items()]
        assert main(["convert", str(src), *flags, "--kv-block", "4", "-o", str(out), "--quiet"]) == 0
        assert main(["convert", "--verify", str(out)]) == 0
        outs[name] = str(out)

    # the rank files hold only the rank's experts (ep) or their tpf slice, fused, and nothing per expert
    full = model("mixtral").model.layers[1].mlp.experts
    for name, experts, cut in (("mixtral_ep2", slice(2, 4), slice(None)), ("mixtral_tpf2", slice(None), slice(16, 32))):
        manifest = json.loads((Path(outs[name]) / "manifest.json").read_text())
        fields = dict(kvp=2, tpa=1, tpf=1, ep=2) if name == "mixtral_ep2" else dict(kvp=1, tpa=2, tpf=2, ep=1)
        assert manifest["layout"] == {**fields, "kv_block": 4, "hopb_chunks": 1}
        with safe_open(Path(outs[name]) / "rank1.safetensors", framework="pt") as f:
            assert not any(".experts.0." in k or "block_sparse_moe" in k for k in f.keys())
            gate_up, down = f.get_tensor("model.layers.1.mlp.experts.gate_up_proj"), \
                f.get_tensor("model.layers.1.mlp.experts.down_proj")
        want = full.gate_up_proj[experts]
        want = torch.cat([want[:, :32][:, cut], want[:, 32:][:, cut]], dim=1)  # the same rows of gate and of up
        assert torch.equal(gate_up, want) and torch.equal(down, full.down_proj[experts][:, :, cut])

    # a layout whose ep / tpf differ from the conversion's is refused, naming both
    with pytest.raises(ValueError, match="converted for kvp=2 tpa=1 tpf=1 ep=2 .2 ranks. but the layout asked for is "
                                         "kvp=2 tpa=1 tpf=2 ep=1 .2 ranks.*--kvp 2 --tpa 1"):
        _as_rank(0, 2, lambda: helix_compile.from_pretrained(outs["mixtral_ep2"], Layout(2)))
    with pytest.raises(ValueError, match="converted for kvp=1 tpa=2 tpf=2 ep=1 .2 ranks. but the layout asked for is "
                                         "kvp=1 tpa=2 tpf=1 ep=2 .2 ranks.*--kvp 1 --tpa 2 --ep 2"):
        _as_rank(0, 2, lambda: helix_compile.from_pretrained(outs["mixtral_tpf2"], Layout(1, 2, ep=2)))

    for per_rank in run_ranks(2, _load_converted, outs):
        for name, err in per_rank:
            print(f"{name}: converted, from_pretrained on 2 ranks, max rel err {err:.2e}")
            assert err < 1e-5, name
