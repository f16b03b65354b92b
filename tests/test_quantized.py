"""Checkpoints with FP8 weights and FP8 KV-cache scales (helix_compile/quantized.py): each rank de-quantises its
pieces as it reads them and then matches transformers on a checkpoint holding the same de-quantised floats;
KV-cache scales reach an FP8 StaticCache; any other quantization is refused by name before anything is read."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import helix_compile
from helix_compile import Layout, StaticCache, quantized
from helix_compile.convert import convert
from helix_compile.loading import Checkpoint, checkpoint_files
from helix_compile.preflight import check_checkpoint
from helix_compile.shards import ExpertShard
from distributed import run_ranks
from models import ATTENTION, model
from test_memory import _compare_sharded

import cli_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

FP8 = torch.float8_e4m3fn
QUANTISED = ("_proj.weight", ".w1.weight", ".w2.weight", ".w3.weight")  # the linear layers FP8 releases quantise


def _quantise(w: torch.Tensor, block):
    """(fp8 weight, fp32 grid of per-block scales, the fp32 floats they stand for), block by block with loops:
    an implementation of the format independent of helix's."""
    rows, cols = w.shape[-2:]
    br, bc = block
    grid = (math.ceil(rows / br), math.ceil(cols / bc))
    q = torch.empty(w.shape, dtype=FP8)
    scale = torch.empty((*w.shape[:-2], *grid))
    floats = torch.empty(w.shape)
    for a in range(grid[0]):
        for b in range(grid[1]):
            where = (..., slice(a * br, (a + 1) * br), slice(b * bc, (b + 1) * bc))
            piece = w[where].float()
            s = piece.abs().amax(dim=(-2, -1)).clamp(min=1e-8) / 448
            scale[(..., a, b)] = s
            q[where] = (piece / s[..., None, None]).to(FP8)
            floats[where] = q[where].float() * s[..., None, None]
    return q, scale, floats


def _fp8_checkpoint(src: Path, fp8: Path, plain: Path, block=(32, 32), method="fp8", kv_scales=None):
    """From the checkpoint in ``src``: ``fp8`` with its linear weights in FP8 (``method``'s tensor names and
    config) and ``plain`` holding the floats those stand for (fp32), the reference transformers loads."""
    tensors = load_file(src / "model.safetensors")
    quant, floats = {}, {}
    for name, w in tensors.items():
        if name.endswith(QUANTISED) and w.dim() >= 2:
            q, scale, f = _quantise(w, block)
            if method != "fp8":  # compressed-tensors: one scale per output row, (out, 1)
                q, scale, f = _quantise(w, (1, w.shape[-1]))
            quant[name], floats[name] = q, f
            quant[name + ("_scale_inv" if method == "fp8" else "_scale")] = scale
        else:
            quant[name] = floats[name] = w.float() if w.is_floating_point() else w
    for layer, (k, v) in (kv_scales or {}).items():
        quant[f"model.layers.{layer}.self_attn.k_scale"], quant[f"model.layers.{layer}.self_attn.v_scale"] = k, v
    config = json.loads((src / "config.json").read_text())
    for folder, weights in ((fp8, quant), (plain, floats)):
        folder.mkdir()
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        for f in src.iterdir():
            if f.name not in ("model.safetensors", "config.json"):
                (folder / f.name).write_bytes(f.read_bytes())
    (plain / "config.json").write_text(json.dumps(config))
    config["quantization_config"] = (
        {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}
        if method == "fp8" else
        {"quant_method": "compressed-tensors", "format": "float-quantized",
         "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float",
                                                                          "strategy": "channel"}}},
         "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor"}})
    (fp8 / "config.json").write_text(json.dumps(config))
    return fp8, plain


E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _mxfp4(w: torch.Tensor):
    """An expert parameter (E, in, out) as MXFP4: blocks (E, out, in / 32, 16) of two e2m1 nibbles per byte (low
    first), scales (E, out, in / 32) of biased exponents, and the fp32 floats they stand for, (E, in, out)."""
    rows = w.transpose(1, 2).float()
    e, r, c = rows.shape
    groups = rows.reshape(e, r, c // 32, 32)
    exp = torch.ceil(torch.log2(groups.abs().amax(-1).clamp(min=1e-30) / 6)).clamp(-120, 120)
    idx = (groups / torch.exp2(exp)[..., None])[..., None].sub(E2M1).abs().argmin(-1)  # the nearest e2m1 value
    blocks = (idx[..., 0::2] | (idx[..., 1::2] << 4)).to(torch.uint8)
    floats = (E2M1[idx] * torch.exp2(exp)[..., None]).reshape(e, r, c).transpose(1, 2).contiguous()
    return blocks, (exp + 127).to(torch.uint8), floats


def _mxfp4_checkpoint(src: Path, mx: Path, plain: Path):
    """gpt-oss's release format: the experts' gate_up_proj / down_proj as MXFP4 blocks and scales, the rest as
    it is; ``plain`` holds the floats they stand for."""
    tensors = load_file(src / "model.safetensors")
    quant, floats = {}, {}
    for name, w in tensors.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            quant[name + "_blocks"], quant[name + "_scales"], floats[name] = _mxfp4(w)
        else:
            quant[name] = floats[name] = w
    config = json.loads((src / "config.json").read_text())
    declared = {"quantization_config": {"quant_method": "mxfp4"}}
    for folder, weights, extra in ((mx, quant, declared), (plain, floats, {})):
        folder.mkdir()
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({**config, **extra}))
    return mx, plain


def test_dequantize_scale_shapes():
    """A single scale, one per row ((out,) or (out, 1)), a grid that divides the weight, a grid of ceil blocks
    (the config's block size), E8M0 exponents and stacked experts, each against the explicit product."""
    torch.manual_seed(0)
    w = (torch.randn(3, 64, 96) * 3).to(FP8)
    f = w.float()
    rows = torch.rand(3, 64) + 0.5
    grid = torch.rand(3, 2, 3) + 0.5
    expand = grid.repeat_interleave(32, 1).repeat_interleave(32, 2)
    assert torch.equal(quantized.dequantize(w, torch.tensor(0.25), torch.float32), f * 0.25)
    assert torch.equal(quantized.dequantize(w, rows, torch.float32), f * rows[..., None])
    assert torch.equal(quantized.dequantize(w, rows[..., None], torch.float32), f * rows[..., None])
    assert torch.equal(quantized.dequantize(w, grid, torch.float32), f * expand)
    assert torch.equal(quantized.dequantize(w, grid, torch.bfloat16), (f * expand).bfloat16())
    ceil = torch.rand(3, 2, 2) + 0.5  # blocks of 48: 64 rows -> 2, 96 columns -> 2
    want = f * ceil.repeat_interleave(48, 1).repeat_interleave(48, 2)[:, :64, :96]
    assert torch.equal(quantized.dequantize(w, ceil, torch.float32, block=(48, 48)), want)
    e8m0 = torch.tensor([[120, 130, 127]], dtype=torch.uint8).expand(2, 3)  # 2**-7, 2**3, 1
    got = quantized.dequantize(w[0], e8m0, torch.float32)
    assert torch.equal(got, f[0] * (e8m0.float() - 127).exp2().repeat_interleave(32, 0).repeat_interleave(32, 1))
    with pytest.raises(ValueError, match=r"scale grid of \(2, 5\) does not divide the weight's \(64, 96\)"):
        quantized.dequantize(w[0], torch.ones(2, 5), torch.float32, name="w")
    with pytest.raises(ValueError, match=r"does not match the weight's \(64, 96\) in blocks of \(32, 32\)"):
        quantized.dequantize(w[0], torch.ones(2, 2), torch.float32, block=(32, 32))


def _load_and_compare(rank, cases):
    from transformers import AutoModelForCausalLM

    out = []
    for fp8, plain, fields, attn in cases:
        torch._dynamo.reset()
        layout = Layout(kv_block=4, **fields)
        sharded = helix_compile.from_pretrained(fp8, layout, dtype=torch.float32)
        assert not hasattr(sharded.config, "quantization_config")
        reference = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32, attn_implementation=attn).eval()
        out.append(_compare_sharded(sharded, reference, layout))
    return out


def test_fp8_checkpoints_load_per_rank(tmp_path):
    """DeepSeek-V3's fine-grained FP8 (blocks, ceil grids where 32 does not divide MLA's projections; per-expert
    tensors), Mixtral's (w1/w2/w3 experts) and gpt-oss's MXFP4 experts (stored (E, in, out); each rank
    de-quantises only its experts under ep = 2), with experts and heads split over 2 ranks: exact against
    transformers on the de-quantised floats."""
    cases, layouts = [], {"llama": dict(kvp=1, tpa=2), "mixtral": dict(kvp=1, tpa=2, ep=2),
                          "deepseek_v3": dict(kvp=2, ep=1), "gpt_oss": dict(kvp=2, ep=1)}
    for family, fields in layouts.items():
        src = tmp_path / family
        model(family).save_pretrained(src)
        make = _mxfp4_checkpoint if family == "gpt_oss" else _fp8_checkpoint
        quant, plain = make(src, tmp_path / f"{family}-quantized", tmp_path / f"{family}-plain")
        assert any(v.dtype in (FP8, torch.uint8) for v in load_file(quant / "model.safetensors").values())
        cases.append((str(quant), str(plain), fields, ATTENTION.get(family, "sdpa")))
    cases.append((*cases[-1][:2], dict(kvp=1, tpa=2, ep=2), cases[-1][3]))  # gpt-oss: 2 of 4 experts a rank
    for errs in run_ranks(2, _load_and_compare, cases):
        print("from_pretrained of FP8 checkpoints, max rel err per family:", [f"{e:.1e}" for e in errs])
        assert all(e < 1e-5 for e in errs)


def test_transformers_reads_the_same_floats(tmp_path):
    """The claim in quantized.py: transformers' own de-quantising load of a fine-grained FP8 checkpoint holds the
    floats helix reads, bit for bit (bf16, the model's dtype)."""
    from transformers import AutoModelForCausalLM

    model("llama").to(torch.bfloat16).save_pretrained(tmp_path / "src")
    fp8, _ = _fp8_checkpoint(tmp_path / "src", tmp_path / "fp8", tmp_path / "plain")
    theirs = AutoModelForCausalLM.from_pretrained(fp8, dtype=torch.bfloat16).state_dict()
    checkpoint = Checkpoint(checkpoint_files(fp8), dtype=torch.bfloat16, block=(32, 32))
    names = [n for n in checkpoint.scale_of]
    assert len(names) == 14  # 7 linear layers in each of 2 decoder layers
    for name in names:
        assert torch.equal(checkpoint.read(name), theirs[name]), name


def test_transformers_reads_the_same_mxfp4_floats(tmp_path):
    """The same for gpt-oss's MXFP4 experts: transformers' de-quantising load (Mxfp4Config(dequantize=True))
    holds the floats helix reads, bit for bit, in bf16 and fp32; both are the independent decoding above."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    model("gpt_oss").save_pretrained(tmp_path / "src")
    mx, plain = _mxfp4_checkpoint(tmp_path / "src", tmp_path / "mx", tmp_path / "plain")
    floats = load_file(plain / "model.safetensors")
    for dtype in (torch.bfloat16, torch.float32):
        theirs = AutoModelForCausalLM.from_pretrained(mx, dtype=dtype,
                                                      quantization_config=Mxfp4Config(dequantize=True)).state_dict()
        checkpoint = Checkpoint(checkpoint_files(mx), dtype=dtype)
        assert sorted(checkpoint.mxfp4) == sorted(n for n in floats if n.endswith(("gate_up_proj", "down_proj")))
        for name in checkpoint.mxfp4:
            assert checkpoint.entries[name] == (tuple(floats[name].shape), dtype)
            assert torch.equal(checkpoint.read(name), theirs[name]), (name, dtype)
            assert torch.equal(checkpoint.read(name), floats[name].to(dtype)), (name, dtype)
            piece = ExpertShard(2, 4, 2, 0, 16, 2) if "gate_up" in name else ExpertShard(2, 4, 1, 8, 16)
            assert torch.equal(checkpoint.read(name, piece), piece.take(floats[name].to(dtype))), (name, piece)


def _kv_scales(rank, fp8):
    layout = Layout(kvp=1, tpa=2, kv_block=4)
    sharded = helix_compile.from_pretrained(fp8, layout, dtype=torch.float32)
    cache = StaticCache(sharded, 2, 16, layout, kv_dtype="fp8")
    scales = lambda: [(layer.k_scale.tolist(), layer.v_scale.tolist()) for layer in cache.layers]  # noqa: E731
    before = scales()
    compiled = torch.compile(sharded, backend="helix", options={"layout": layout, "executor": "eager"})
    with torch.no_grad():
        logits = compiled(input_ids=torch.tensor([[3, 5, 7, 9]]), past_key_values=cache).logits
    after = scales()
    cache.reset()
    reset = scales()
    computed = StaticCache(sharded, 2, 16, layout, kv_dtype="fp8", kv_scales={})  # {}: all set at the prefill
    plain = StaticCache(sharded, 2, 16, layout)  # a cache of the model's dtype ignores them
    return before, after, reset, bool(torch.isfinite(logits).all()), \
        [float(layer.k_scale.sum()) for layer in computed.layers], plain.layers[0].k_scale is None


def test_checkpoint_kv_scales_reach_the_fp8_cache(tmp_path):
    """compressed-tensors' per-channel FP8 weights with k_scale/v_scale per layer (one number, and one per KV
    head): an FP8 StaticCache of the loaded model starts from them, sliced to the rank's KV heads, keeps them
    through the prefill and across a reset; ``helix convert`` carries them."""
    model("llama").save_pretrained(tmp_path / "src")
    per_head = torch.tensor([0.01, 0.02, 0.03, 0.04])
    scales = {0: (torch.tensor(0.05), torch.tensor([0.06])), 1: (per_head, per_head * 2)}
    fp8, _ = _fp8_checkpoint(tmp_path / "src", tmp_path / "fp8", tmp_path / "plain", method="compressed-tensors",
                             kv_scales=scales)
    converted = convert(fp8, Layout(kvp=1, tpa=2), tmp_path / "converted", progress=False)
    assert "quantization_config" not in json.loads((converted / "config.json").read_text())
    for folder in (fp8, converted):
        for rank, (before, after, reset, finite, computed, plain) in enumerate(run_ranks(2, _kv_scales, str(folder))):
            heads = slice(2 * rank, 2 * rank + 2)  # 4 KV heads over tpa = 2
            want = [(torch.full((2,), 0.05), torch.full((2,), 0.06)), (per_head[heads], per_head[heads] * 2)]
            want = [(k.tolist(), v.tolist()) for k, v in want]
            assert before == want and after == want and reset == want, (folder, rank, before, after, reset)
            assert finite and computed == [0.0, 0.0] and plain


def test_other_quantizations_are_refused(tmp_path):
    """GPTQ, a compressed-tensors int4 scheme, an FP8 weight without its scale and an int-packed weight: each a
    ValueError naming the problem, from the preflight, from_pretrained and convert alike."""
    cli_checkpoint.save(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    tensors = load_file(tmp_path / "src" / "model.safetensors")

    def variant(name, quantization=None, change=None):
        folder = tmp_path / name
        folder.mkdir()
        for f in (tmp_path / "src").iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        if quantization is not None:
            (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}))
        if change is not None:
            save_file(change(dict(tensors)), folder / "model.safetensors", metadata={"format": "pt"})
        return folder

    q = "model.layers.0.self_attn.q_proj.weight"
    cases = {
        variant("gptq", {"quant_method": "gptq", "bits": 4}): r"quantized with 'gptq', which helix does not read",
        variant("int4", {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
            "group_0": {"weights": {"num_bits": 4, "type": "int"}}}}): r"group_0: int of 4 bits",
        variant("noscale", change=lambda t: {**t, q: t[q].to(FP8)}):
            rf"{q} is stored as F8_E4M3 without a scale beside it",
        variant("packed", change=lambda t: {**t, "model.layers.0.mlp.down_proj.weight_packed":
                                            torch.zeros(2, 2, dtype=torch.int32)}):
            r"down_proj.weight_packed: an integer-packed quantized weight",
    }
    for folder, message in cases.items():
        calls = [lambda: helix_compile.from_pretrained(folder, Layout(kvp=1, tpa=1)),
                 lambda: convert(folder, Layout(kvp=1, tpa=1), tmp_path / f"{folder.name}-out", progress=False)]
        if folder.name in ("gptq", "int4"):  # decided from the config alone, before any rank starts
            calls.append(lambda: check_checkpoint(folder))
        for call in calls:
            with pytest.raises(ValueError, match=message):
                call()
        assert not (tmp_path / f"{folder.name}-out").exists()


def test_cache_kv_scales_errors():
    """kv_scales of the wrong size, for a layer the model lacks, or given to a cache that is not FP8."""
    m = model("llama")
    layout = Layout(kvp=1, tpa=1)
    with pytest.raises(ValueError, match=r"kv_scales\[0\] must be \(k_scale, v_scale\), each one positive number "
                                         r"or one per KV head \(4\), got \[\(3,\), \(\)\]"):
        StaticCache(m, 1, 8, layout, kv_dtype="fp8", kv_scales={0: (torch.ones(3), torch.tensor(1.0))})
    with pytest.raises(ValueError, match=r"kv_scales has layer 5, but the model's cache layers"):
        StaticCache(m, 1, 8, layout, kv_dtype="fp8", kv_scales={5: (1.0, 1.0)})
    with pytest.raises(ValueError, match=r"kv_scales are the scales of an FP8 cache, but this cache holds "
                                         r"torch.float32"):
        StaticCache(m, 1, 8, layout, kv_scales={0: (1.0, 1.0)})
    cache = StaticCache(m, 1, 8, layout, kv_dtype="fp8", kv_scales={1: (0.5, torch.full((4,), 0.25))})
    assert cache.layers[0].k_scale.sum() == 0 and torch.equal(cache.layers[1].v_scale, torch.full((4,), 0.25))
