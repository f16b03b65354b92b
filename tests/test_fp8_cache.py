"""The FP8 KV cache (``StaticCache(kv_dtype=torch.float8_e4m3fn)``): its shards and scales, the scale rule, the
quantisation error, partial attention over FP8 shards (reference and Triton kernel, in Triton's interpreter), the
whole model on 1 and 2 ranks, the CLI flag, the planner's bytes, and the refusals.

Exactness. An FP8 cache is an approximation of the model; what helix computes with it is exact with respect to a
precise definition: transformers' own model over a cache whose keys and values are rounded the same way
(``RoundedCache``: each call's keys pass through fp8 at the scale rule's scale and back). The helix logits match
that to fp32 rounding, and the unrounded model within the bound the rounding allows.
"""

import math

import pytest
import torch
from transformers import StaticCache as HFStaticCache

from distributed import run_ranks
from helix_compile import Layout, StaticCache
from helix_compile.lowering import ops
from models import config, model, prompt

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

FP8 = torch.float8_e4m3fn
DELTA = 2.0 ** -4  # e4m3 rounds to 3 mantissa bits: relative error <= half an ulp = 2**-4 of the value (normal range)
TINY = 2.0 ** -10  # below the normal range (|x| / scale < 2**-6) the step is 2**-9: absolute error <= 2**-10 * scale


class RoundedCache(HFStaticCache):
    """transformers' StaticCache whose keys and values are rounded to fp8 as the helix FP8 cache stores them:
    per layer and KV head, the scale of the first call that has non-zero values (``ops.fp8_scale``), then
    x -> fp8(x / scale) * scale. The reference an FP8 helix cache must match to fp32 rounding."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scales = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        heads = key_states.shape[1]
        zero = torch.zeros(heads)
        k_scale, v_scale = self.scales.get(layer_idx, (zero, zero))
        k_scale, v_scale = ops.fp8_scale(key_states, k_scale), ops.fp8_scale(value_states, v_scale)
        self.scales[layer_idx] = (k_scale, v_scale)
        k = ops.fp8_dequantise(ops.fp8_quantise(key_states, k_scale), k_scale).to(key_states.dtype)
        v = ops.fp8_dequantise(ops.fp8_quantise(value_states, v_scale), v_scale).to(value_states.dtype)
        return super().update(k, v, layer_idx, *args, **kwargs)


# -- the cache ----------------------------------------------------------------------------------------------------
def test_shards_and_scales():
    """fp8 shards of the bf16 cache's shape, one fp32 scale per KV head per layer for keys and for values (0: not
    set), half the bytes (plus the scales); the virtual keys the model traces keep the model's dtype."""
    cfg = config("llama")  # 8 query and 4 KV heads of 8 dims, 2 layers
    fp8 = StaticCache(cfg, 2, 40, Layout(1, kv_block=4), dtype=torch.bfloat16, kv_dtype=FP8)
    bf16 = StaticCache(cfg, 2, 40, Layout(1, kv_block=4), dtype=torch.bfloat16)
    for layer, ref in zip(fp8.layers, bf16.layers):
        assert layer.local_keys.dtype == layer.local_values.dtype == FP8
        assert layer.local_keys.shape == ref.local_keys.shape == (2, 4, 41, 8)
        assert layer.keys.dtype == torch.bfloat16 and layer.dtype == torch.bfloat16
        for scale in (layer.k_scale, layer.v_scale):
            assert scale.dtype == torch.float32 and scale.shape == (4,) and not scale.any()
        assert ref.k_scale is None
    scales = 2 * 2 * 4 * 4  # layers x (k, v) x heads x fp32
    assert bf16.nbytes == 2 * (fp8.nbytes - scales)
    assert fp8.kv_dtype == FP8 and bf16.kv_dtype == torch.bfloat16
    assert StaticCache(cfg, 2, 40, Layout(1), dtype=torch.bfloat16, kv_dtype=torch.bfloat16).kv_dtype == torch.bfloat16


def test_scales_per_local_head_under_tpa():
    """tpa = 2 on rank 1 of a fake world of 2: the rank's 2 of the 4 KV heads, a scale each."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=2)
    try:
        cache = StaticCache(config("llama"), 1, 16, Layout(kvp=1, tpa=2), kv_dtype=FP8)
    finally:
        dist.destroy_process_group()
    assert cache.layers[0].local_keys.shape == (1, 2, 17, 8) and cache.layers[0].k_scale.shape == (2,)


@pytest.mark.parametrize("kv_dtype, message", [
    (torch.float16, "kv_dtype must be None (the model's dtype, torch.float32) or torch.float8_e4m3fn, got torch.float16"),
    (torch.float8_e5m2, "got torch.float8_e5m2"),
    ("fp4", "got 'fp4'"),
])
def test_bad_kv_dtype_is_one_clear_error(kv_dtype, message):
    with pytest.raises(ValueError) as e:
        StaticCache(config("llama"), 1, 16, Layout(1), kv_dtype=kv_dtype)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_mla_is_refused():
    with pytest.raises(ValueError, match="caches MLA's compressed latent, which has no FP8 form"):
        StaticCache(config("deepseek_v3"), 1, 16, Layout(1), kv_dtype=FP8)


def test_gpu_below_compute_capability_8_9_is_refused(monkeypatch):
    """On CUDA the cache needs compute capability >= 8.9 (Ada, Hopper): an A100 (8.0) is refused naming it, before
    anything is allocated; an H100 (9.0) passes the check."""
    import helix_compile.cache as cache_module

    monkeypatch.setattr(cache_module, "cuda_capability", lambda device: (8, 0))
    with pytest.raises(ValueError, match=r"compute capability >= 8.9 \(Ada, Hopper or newer\); cuda has 8.0"):
        StaticCache(config("llama"), 1, 16, Layout(1), device="cuda", kv_dtype=FP8)
    monkeypatch.setattr(cache_module, "cuda_capability", lambda device: (9, 0))
    assert cache_module.kv_storage_dtype(FP8, torch.bfloat16, config("llama"), "cuda") == FP8


# -- the scale rule and the rounding --------------------------------------------------------------------------------
def _write(k_shard, v_shard, k_scale, v_scale, k, v, pos, kvp_rank=0, kvp=1, kv_block=4):
    torch.ops.helix.kv_write_local_fp8(k_shard, v_shard, k_scale, v_scale, k, v, pos, kvp_rank, kvp, kv_block)


def test_scale_rule():
    """scale = amax over the call's batch rows, positions and dims of each head / 448 * 2, set by the first write
    and kept after; a head whose keys are all zero keeps scale 0 (stored zeros, no NaN) until a write sets it;
    values above twice the first write's largest saturate at +-448 * scale; the same scales on every KVP rank."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 3, 5, 8, generator=g)
    k[:, 1] = 0  # head 1: all zero
    v = torch.randn(2, 3, 5, 8, generator=g) * 10
    pos = torch.arange(5)
    per_rank = []
    for rank in (0, 1):
        shards = [torch.zeros(2, 3, 9, 8, dtype=FP8) for _ in range(2)]
        scales = [torch.zeros(3) for _ in range(2)]
        _write(*shards, *scales, k, v, pos, kvp_rank=rank, kvp=2)
        per_rank.append((shards, scales))
    (shards, (k_scale, v_scale)), (other, other_scales) = per_rank
    want_k = k.abs().amax(dim=(0, 2, 3)) / 448 * 2
    assert torch.equal(k_scale, want_k) and k_scale[1] == 0
    assert torch.equal(v_scale, v.abs().amax(dim=(0, 2, 3)) / 448 * 2)
    assert all(torch.equal(a, b) for a, b in zip((k_scale, v_scale), other_scales))  # every KVP rank alike
    assert not torch.equal(shards[0].float(), other[0].float())  # ... though each holds its own positions
    assert torch.isfinite(shards[0].float()).all() and not shards[0][:, 1].float().any()
    # rank 0 holds positions 0-3 in slots 0-3 (kv_block 4, kvp 2): at most 224 = 448 / 2 after scaling
    stored = shards[0][:, :, :4].float()
    assert stored.abs().max() == 224 and torch.equal(stored[:, 1], torch.zeros_like(stored[:, 1]))
    # a later write keeps the scales it finds set, sets head 1's, and saturates at +-448 * scale
    big = torch.zeros(2, 3, 1, 8)
    big[:, 0, :, 0] = 3 * 224 * want_k[0]  # 3x the first write's amax on head 0 (224 * scale)
    big[:, 1] = 1.0
    _write(*shards, k_scale, v_scale, big, big, torch.tensor([8]), kvp_rank=0, kvp=2)  # block 2: rank 0, slot 4
    assert k_scale[0] == want_k[0] and k_scale[2] == want_k[2] and k_scale[1] == 1.0 / 448 * 2
    slot = shards[0][:, :, 4].float()
    assert (slot[:, 0, 0] == 448).all() and (slot[:, 1] == 224).all() and not slot[:, 2].any()
    assert torch.isfinite(ops.fp8_dequantise(shards[0], k_scale)).all()


def test_round_trip_error():
    """x -> fp8(x / s) * s: relative error <= 2**-4 where |x| / s >= 2**-6 (normal e4m3), absolute error
    <= 2**-10 * s below; exact at 0; over magnitudes from 2**-12 to the first write's largest (224 s)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 4096, 4, generator=g) * torch.exp2(torch.empty(1, 2, 4096, 4).uniform_(-12, 2, generator=g))
    x[0, 0, 0, 0] = 0
    s = ops.fp8_scale(x, torch.zeros(2))
    back = ops.fp8_dequantise(ops.fp8_quantise(x, s), s)
    err = (back - x).abs()
    scale = s[None, :, None, None].expand_as(x)
    normal = x.abs() / scale >= 2.0 ** -6
    assert normal.sum() > 1000 and (~normal).sum() > 1000  # both ranges are exercised
    assert (err[normal] <= DELTA * x.abs()[normal]).all()
    assert (err[~normal] <= TINY * scale[~normal]).all()
    assert back[0, 0, 0, 0] == 0
    assert (err[normal] / x.abs()[normal]).max() > DELTA / 2  # the bound is reached closely, not loose


# -- partial attention over FP8 shards -----------------------------------------------------------------------------
def _fp8_case(b, hq, hk, length, d, capacity, seed, key_scale=3.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, length, d, generator=g)
    k = torch.randn(b, hk, capacity + 1, d, generator=g) * key_scale
    v = torch.randn(b, hk, capacity + 1, d, generator=g)
    k_scale, v_scale = ops.fp8_scale(k, torch.zeros(hk)), ops.fp8_scale(v, torch.zeros(hk))
    return q, k, v, ops.fp8_quantise(k, k_scale), ops.fp8_quantise(v, v_scale), k_scale, v_scale


@pytest.mark.parametrize("first_pos", [5, 13, 37])
def test_reference_over_fp8_shards(first_pos):
    """The reference over fp8 shards is fp32 attention over the dequantised keys/values (the same numbers), and
    differs from attention over the unrounded keys/values by at most the bound the rounding allows: with every
    key element off by e_i <= 2**-4 |k_i| + 2**-10 s_k, each score moves by at most
    eps = scale * sum_i |q_i| e_i; the softmax weights then change by a factor within exp(+-2 eps), so
    sum_j |p'_j - p_j| <= exp(2 eps) - 1; with the values off by at most 2**-4 max|v| + 2**-10 s_v:
        |o' - o| <= (exp(2 eps) - 1) max|v| + 2**-4 max|v| + 2**-10 s_v,    |lse' - lse| <= eps."""
    b, hq, hk, length, d, capacity, kvp, rank, block, scale = 2, 4, 2, 3, 16, 40, 2, 1, 4, 0.25
    q, k, v, k8, v8, k_scale, v_scale = _fp8_case(b, hq, hk, length, d, capacity, first_pos)
    pos = torch.arange(length) + first_pos
    got = ops.partial_attention_reference(q, k8, v8, pos, rank, kvp, block, scale, k_scale=k_scale, v_scale=v_scale)
    on_rounded = ops.partial_attention_reference(q, ops.fp8_dequantise(k8, k_scale), ops.fp8_dequantise(v8, v_scale),
                                                 pos, rank, kvp, block, scale)
    assert torch.equal(got, on_rounded)
    exact = ops.partial_attention_reference(q, k, v, pos, rank, kvp, block, scale)
    key_err = DELTA * k.abs() + TINY * k_scale[None, :, None, None]  # (B, Hk, S, D)
    group = hq // hk
    eps = scale * torch.einsum("bhld,bhsd->bhls", q.abs(), key_err.repeat_interleave(group, 1)[:, :, :capacity])
    eps = eps.amax(dim=-1).permute(1, 0, 2)  # (Hq, B, L): the largest over the keys
    v_max = v[:, :, :capacity].abs().amax(dim=(2, 3)).repeat_interleave(group, 1).T[:, :, None]  # (Hq, B, 1)
    s_v = v_scale.repeat_interleave(group)[:, None, None]
    bound = (torch.exp(2 * eps) - 1) * v_max + DELTA * v_max + TINY * s_v
    lse_got, lse_exact = got[..., d:].view(torch.float32)[..., 0], exact[..., d:].view(torch.float32)[..., 0]
    seen = torch.isfinite(lse_exact)
    assert torch.equal(seen, torch.isfinite(lse_got)) and seen.any()
    err = (got[..., :d] - exact[..., :d]).abs().amax(dim=-1)
    assert (err[seen] <= bound[seen] * (1 + 1e-5)).all(), (err[seen] / bound[seen]).max()
    assert ((lse_got - lse_exact)[seen].abs() <= eps[seen] * (1 + 1e-5) + 1e-6).all()
    assert err[seen].max() > 0  # the rounding is visible: the comparison is not of equal inputs


CASES = [  # batch, query heads, kv heads, query len, head dim, capacity, kvp, kvp_rank, kv_block, q dtype, config
    (2, 4, 2, 1, 16, 40, 2, 1, 4, torch.bfloat16, (16, 16, 3, 4, 1)),  # decode, bf16 query, 3 splits + combine
    (1, 8, 1, 3, 24, 100, 4, 3, 8, torch.float32, (16, 16, 1, 4, 1)),  # MQA, head dim 24, 3 positions
    (1, 4, 2, 9, 80, 30, 2, 0, 4, torch.float32, (16, 16, 1, 4, 1)),  # prefill, head dim 80 = 64 + 16 (two tiles)
]


@pytest.mark.parametrize("case", CASES)
def test_triton_kernel_over_fp8_shards(case):
    """The Triton kernel (Triton's CPU interpreter, which loads float8e4nv tiles) against the reference."""
    from helix_compile.lowering.triton_attention import partial_attention as triton_partial_attention

    b, hq, hk, length, d, capacity, kvp, rank, block, dtype, launch = case
    q, _, _, k8, v8, k_scale, v_scale = _fp8_case(b, hq, hk, length, d, capacity, 7)
    q = q.to(dtype)
    pos = torch.arange(length) + 21
    want = ops.partial_attention_reference(q, k8, v8, pos, rank, kvp, block, 0.3, k_scale=k_scale, v_scale=v_scale)
    got = triton_partial_attention(q, k8, v8, pos, rank, kvp, block, 0.3, config=launch, k_scale=k_scale,
                                   v_scale=v_scale)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's own rounding (as the bf16 kernel tests)
    torch.testing.assert_close(got[..., :d].float(), want[..., :d].float(), rtol=tol, atol=tol)
    lse = [t[..., d:].contiguous().view(torch.float32) for t in (got, want)]
    torch.testing.assert_close(lse[0], lse[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="FP8 shards take both k_scale and v_scale"):
        triton_partial_attention(q, k8, v8, pos, rank, kvp, block, 0.3, config=launch, k_scale=k_scale)


# -- the whole model -----------------------------------------------------------------------------------------------
# A bound on the logits against the fp32 cache, for these tiny random models (hidden 64, 2 layers, logits of about
# 0.6 at most): measured at about 0.016, stated at 0.05 (the rounding of e4m3 is 2**-4 relative;
# the bound is not derived through the layers).
AGAINST_FP32 = 0.05


def _run_fp8(layout, executor="eager", steps=3):
    """Prefill 7 tokens and ``steps`` greedy decode steps (teacher-forced by the fp32-cache reference's tokens) on
    the tiny llama with an FP8 cache; the reference with ``RoundedCache`` and with transformers' fp32 cache."""
    m = model("llama")
    ids = prompt(2, 7)
    torch._dynamo.reset()
    cache = StaticCache(m, 2, 16, layout, kv_dtype=FP8)
    compiled = torch.compile(m, backend="helix", options={"layout": layout, "executor": executor}, fullgraph=True)
    rounded, plain = RoundedCache(m.config, max_cache_len=16), HFStaticCache(m.config, max_cache_len=16)
    worst_rounded = worst_plain = 0.0
    tok = ids
    with torch.no_grad():
        for _ in range(steps + 1):
            out = compiled(input_ids=tok, past_key_values=cache).logits
            want = m(input_ids=tok, past_key_values=rounded).logits
            ref = m(input_ids=tok, past_key_values=plain).logits
            worst_rounded = max(worst_rounded, ((out - want).abs().max() / want.abs().max()).item())
            worst_plain = max(worst_plain, (out - ref).abs().max().item())
            tok = ref[:, -1:].argmax(-1)
    layer = cache.layers[0]
    return dict(rounded=worst_rounded, plain=worst_plain, logits=out, k_scale=layer.k_scale.clone(),
                v_scale=layer.v_scale.clone(), want_scale=rounded.scales[0][0])


def _check_run(r):
    assert r["rounded"] < 1e-5, r["rounded"]  # the rounded reference, to fp32 rounding
    assert 1e-4 < r["plain"] < AGAINST_FP32, r["plain"]  # an approximation of the fp32 cache, within the bound
    torch.testing.assert_close(r["k_scale"], r["want_scale"], rtol=1e-6, atol=0)  # Inductor: x * (2 / 448)


@pytest.mark.parametrize("executor", ["eager", "inductor"])
def test_one_rank(executor):
    """Prefill and 3 decode steps with the eager executor; the prefill alone through Inductor (its compile is most
    of this file's time): the scale inputs, their in-place update and the uint8 write fused by Inductor."""
    _check_run(_run_fp8(Layout(1, kv_block=4), executor, steps=3 if executor == "eager" else 0))


def _rank_fp8(rank):
    r = _run_fp8(Layout(kvp=2, kv_block=4))
    return {k: v.tolist() if torch.is_tensor(v) else v for k, v in r.items()}


def test_two_ranks_kvp2():
    """2 gloo ranks, kvp = 2: each rank holds every other block of 4 positions; the scales come out the same on
    both (each sees every written position) and the logits are the same on both ranks."""
    results = run_ranks(2, _rank_fp8)
    for r in results:
        _check_run({k: torch.tensor(v) if isinstance(v, list) else v for k, v in r.items()})
    assert results[0]["k_scale"] == results[1]["k_scale"] and results[0]["v_scale"] == results[1]["v_scale"]
    assert results[0]["logits"] == results[1]["logits"]


# -- CLI and planner -----------------------------------------------------------------------------------------------
def test_planner_counts_one_byte_per_kv_element():
    from helix_compile.planner import plan

    bf16 = plan("llama-3.1-8b", 8, "256K", batch=8, layout="kvp=8,tpa=1").best
    fp8 = plan("llama-3.1-8b", 8, "256K", batch=8, layout="kvp=8,tpa=1", kv_dtype="fp8").best
    assert fp8.memory["kv"] == pytest.approx(bf16.memory["kv"] / 2)
    assert fp8.memory["weights"] == bf16.memory["weights"]
    assert fp8.per_layer["kv_read"] == pytest.approx(bf16.per_layer["kv_read"] / 2)
    assert plan("llama-3.1-8b", 8, "256K", batch=8, layout="kvp=8,tpa=1", kv_dtype=torch.float8_e4m3fn).best.memory \
        == fp8.memory


def test_cli_kv_dtype_reaches_the_cache(tmp_path, monkeypatch, capsys):
    """`helix generate --kv-dtype fp8` builds its StaticCache with kv_dtype=float8_e4m3fn (one rank, in this process);
    `helix plan --kv-dtype fp8` halves the KV bytes; a bad value and an FP8 cache for MLA are one line each, before
    any rank starts."""
    import torch.distributed as dist

    import helix_compile
    import helix_compile.generation as generation
    from cli_checkpoint import save
    from helix_compile.cli import main

    ckpt = save(tmp_path / "hf", "llama")
    built = []

    class Recorded(StaticCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self.kv_dtype)

    def one_rank(req):
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        try:
            return generation.rank_main(req)
        finally:
            dist.destroy_process_group()

    monkeypatch.setattr(helix_compile, "StaticCache", Recorded)
    monkeypatch.setattr(generation, "launch_ranks", one_rank)
    code = main(["generate", str(ckpt), "--kvp", "1", "--prompt", "w1 w2 w3", "--max-new-tokens", "2",
                 "--executor", "eager", "--device", "cpu", "--kv-dtype", "fp8"])
    assert code == 0 and built and set(built) == {FP8}
    assert "(KV cache fp8)" in capsys.readouterr().err

    monkeypatch.setattr(generation, "launch_ranks", lambda *a: pytest.fail("a rank was started"))
    assert main(["generate", str(ckpt), "--kvp", "1", "--prompt", "w1", "--kv-dtype", "fp16"]) == 2
    assert "argument --kv-dtype: invalid choice: 'fp16' (choose from 'auto', 'fp8')" in capsys.readouterr().err
    mla = save(tmp_path / "mla", "deepseek_v3")
    assert main(["generate", str(mla), "--kvp", "1", "--prompt", "w1", "--device", "cpu", "--kv-dtype", "fp8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "caches MLA's compressed latent, which has no FP8 form" in err[-1] and "Traceback" not in "\n".join(err)

    import json

    sizes = {}
    for kv in ("auto", "fp8"):
        assert main(["plan", "--model", "llama-3.1-8b", "--nproc-per-node", "8", "--context", "256K", "--batch", "8",
                     "--layout", "kvp=8,tpa=1", "--kv-dtype", kv, "--json"]) == 0
        sizes[kv] = json.loads(capsys.readouterr().out)["best"]["memory_breakdown_gb"]["kv"]
    assert sizes["fp8"] == pytest.approx(sizes["auto"] / 2, rel=1e-4)  # rounded to 4 decimals


def test_bench_floor_counts_one_byte_per_kv_element():
    from helix_compile.bench import measure

    cfg = config("llama")
    lay = Layout(kvp=2, kv_block=4)
    assert measure.local_kv_bytes(cfg, lay, 100, 2, itemsize=1) * 2 == measure.local_kv_bytes(cfg, lay, 100, 2)
    cache = StaticCache(cfg, 1, 16, Layout(1), dtype=torch.bfloat16, kv_dtype=FP8)
    measure.fill_random(cache)
    layer = cache.layers[0]
    assert layer.local_keys.float().std() == pytest.approx(1.0, abs=0.2) and layer.k_scale.eq(1).all()
    assert torch.isfinite(layer.local_values.float()).all()
    assert math.isclose(float(layer.v_scale[0]), 1.0)
