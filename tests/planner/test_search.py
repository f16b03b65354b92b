"""Enumeration, Pareto frontier, choose_layout and input errors."""
import json
import types

import pytest

from helix_compile.planner import choose_layout, get_model, parse_tokens, plan
from helix_compile.planner.enumerate import backend_error, helix_layouts, layout_error
from helix_compile.planner.pareto import frontier, headline


def _pt(user, gpu, batch=1, gpus=1):
    return types.SimpleNamespace(tokens_per_s_per_user=user, tokens_per_s_per_gpu=gpu, ttl_s=1.0 / user,
                                 candidate=types.SimpleNamespace(batch=batch, gpus=gpus))


def test_frontier_small_case():
    pts = [_pt(10, 1), _pt(8, 3), _pt(8, 2), _pt(5, 2), _pt(4, 5), _pt(3, 4), _pt(1, 5)]
    f = frontier(pts)
    assert [(p.tokens_per_s_per_user, p.tokens_per_s_per_gpu) for p in f] == [(10, 1), (8, 3), (4, 5)]


def test_headline_ratios_take_each_sides_best_config_per_budget():
    """No interpolation: at each budget the baseline reaches, each side's best real configuration."""
    helix = [_pt(15, 1, 1, 1), _pt(10, 8, 32, 4), _pt(6, 9, 64, 8)]
    base = [_pt(12, 2, 4, 2), _pt(5, 4, 16, 4)]
    h = headline(helix, base)
    assert h["interactivity_ratio"] == pytest.approx(15 / 12)
    # budget 1/12 s: Helix's best within it is (15, 1) -> 0.5x; budget 1/5 s: (6, 9) vs (5, 4) -> 2.25x
    assert h["throughput_ratio"] == pytest.approx(9 / 4) and h["throughput_budget_ms"] == pytest.approx(200)
    assert h["batch_ratio"] == pytest.approx((64 / 8) / (16 / 4))  # batch per GPU
    # over every budget (incl. Helix's 1/6 s, where the baseline still has only (12, 2)): 9 / 2
    assert h["throughput_ratio_any_budget"] == pytest.approx(4.5)


def test_batch_grid_is_fine():
    from helix_compile.planner.search import batch_sweep

    b = batch_sweep(4096)
    assert b[:64] == list(range(1, 65)) and b[64:72] == [72, 80, 88, 96, 104, 112, 120, 128] and b[-1] == 4096


def test_hopb_ablation_reads_the_curves_at_fixed_throughput():
    from helix_compile.planner.pareto import hopb_ablation

    on = [_pt(100, 10), _pt(50, 20)]
    off = [_pt(90, 10), _pt(40, 20)]
    a = hopb_ablation(on, off)
    assert a["loss"] == pytest.approx(0.2) and a["at_tokens_per_s_per_gpu"] == 20


@pytest.mark.parametrize("model,n", [("llama-3.1-8b", 4), ("llama-3.1-405b", 64), ("llama-3.1-70b", 8),
                                     ("qwen3-8b", 2)])
def test_choose_layout_valid(model, n):
    m = get_model(model)
    lay = choose_layout(model, n, 131072, batch_size=4, dtype="fp8", hw="gb200")
    assert set(lay) == {"kvp", "tpa", "tpf", "ep"} and all(type(v) is int for v in lay.values())
    assert lay["kvp"] * lay["tpa"] == n == lay["tpf"] * lay["ep"]
    assert backend_error(m, lay["kvp"], lay["tpa"], lay["tpf"]) is None


@pytest.mark.parametrize("model", ["qwen3-30b-a3b", "deepseek-v2-lite"])
def test_choose_layout_plans_moe_and_mla(model):
    """The backend runs MoE (TPF x EP) and MLA (tpa = 1): choose_layout plans them with the backend's rules."""
    m = get_model(model)
    lay = choose_layout(model, 4, 131072)
    assert lay["kvp"] * lay["tpa"] == 4 == lay["tpf"] * lay["ep"]
    assert backend_error(m, lay["kvp"], lay["tpa"], None) is None
    if m.is_mla:
        assert lay["tpa"] == 1 and backend_error(m, 1, 4, None)  # the TP baseline is not run for MLA


def test_choose_layout_says_when_nothing_fits():
    with pytest.raises(ValueError, match=r"no layout of deepseek-r1 fits on 4 x h200 .* needs [0-9.]+ GB per GPU"):
        choose_layout("deepseek-r1", 4, 131072)


def test_choose_layout_accepts_hf_config_and_dict():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                      intermediate_size=512, vocab_size=1000)
    a = choose_layout(cfg, 4, 1_000_000, batch_size=8)
    b = choose_layout(cfg.to_dict(), 4, 1_000_000, batch_size=8)
    assert a == b and a["kvp"] * a["tpa"] == 4
    # Long context, few KV heads, 8 requests: the KV read outweighs the all-to-all, so the sequence is sharded.
    assert a["kvp"] >= 2
    # One request: 64 MB of KV per layer reads in 15 us. With the preset's 6 us collective latency, halving that
    # read is worth an all-to-all; with a 40 us latency the TP baseline (each rank one duplicated KV head) wins,
    # and the backend runs it.
    from helix_compile.planner import get_hardware

    assert choose_layout(cfg, 4, 1_000_000, batch_size=1)["kvp"] == 2
    slow = get_hardware("h200")
    for c in slow.collectives.values():
        c.alpha_us = 40.0
    assert choose_layout(cfg, 4, 1_000_000, batch_size=1, hw=slow) == {"kvp": 1, "tpa": 4, "tpf": 4, "ep": 1}


def test_choose_layout_uses_the_cache_dtype():
    """An fp32 cache holds twice the bytes of a bf16 one: a context that fits in bf16 may not in fp32."""
    import torch

    kw = dict(context_len=300_000, batch_size=2, hw="h200")  # bf16: 79 GB of KV + 16 GB weights; fp32 twice
    assert choose_layout("llama-3.1-8b", 1, dtype=torch.bfloat16, **kw)
    with pytest.raises(ValueError, match="fits on 1 x h200"):
        choose_layout("llama-3.1-8b", 1, dtype=torch.float32, **kw)


def test_choose_layout_errors_name_the_numbers():
    with pytest.raises(ValueError, match=r"no layout of llama-3.1-8b runs on 3 GPUs: tpa=3 does not divide "
                                         r"num_key_value_heads=8.*tpf=3 does not divide intermediate_size=14336"):
        choose_layout("llama-3.1-8b", 3, 4096)
    with pytest.raises(ValueError, match=r"fits on 1 x h100.*GB per GPU"):
        choose_layout("llama-3.1-405b", 1, 4096, dtype="fp8", hw="h100")


def test_helix_layouts_respect_mla_and_gqa():
    assert {t for _, t, _, _ in helix_layouts(get_model("deepseek-r1"), 8)} == {1}
    assert {t for _, t, _, _ in helix_layouts(get_model("llama-3.1-8b"), 8)} == {1, 2, 4, 8}


def test_ttl_limit_and_best():
    p = plan("llama-3.1-8b", 4, "32K", ttl_ms=20)
    assert p.best and p.best.ttl_s * 1e3 <= 20
    assert all(e.ttl_s * 1e3 <= 20 for e in p.frontier)
    assert p.best.tokens_per_s_per_gpu == max(e.tokens_per_s_per_gpu for e in p.frontier)


def test_token_counts_are_binary():
    """K = 1024 everywhere (as `helix bench` has it); a decimal count is written out or as 1e6."""
    assert parse_tokens("128K") == parse_tokens("128Ki") == 131072
    assert parse_tokens("1M") == 1_048_576 and parse_tokens("1e6") == 1_000_000 and parse_tokens(4096) == 4096
    assert plan("llama-3.1-8b", 4, "1M", batch=1).context == 1_048_576
    with pytest.raises(ValueError, match="context: cannot read 'lots' as a token count"):
        plan("llama-3.1-8b", 4, "lots", batch=1)
    with pytest.raises(ValueError, match="is 1.5 tokens, not a whole number"):
        parse_tokens("1.5")
    with pytest.raises(ValueError, match="must be at least 1, got 0"):
        parse_tokens("0K")


def test_config_json_path(tmp_path):
    cfg = {"hidden_size": 2048, "num_hidden_layers": 4, "num_attention_heads": 16, "num_key_value_heads": 4,
           "intermediate_size": 8192, "vocab_size": 32000, "model_type": "llama"}
    d = tmp_path / "my-model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    for src in (str(d), str(d / "config.json")):
        m = get_model(src)
        assert (m.name, m.kv_heads, m.ffn) == ("my-model", 4, 8192)
    assert plan(str(d), 4, "8K", batch=2).best is not None


def test_moe_and_mla_config_fields():
    cfg = {"hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
           "intermediate_size": 18432, "vocab_size": 129280, "n_routed_experts": 256, "num_experts_per_tok": 8,
           "moe_intermediate_size": 2048, "n_shared_experts": 1, "first_k_dense_replace": 3, "kv_lora_rank": 512,
           "q_lora_rank": 1536, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128}
    m = get_model(cfg)
    ref = get_model("deepseek-r1")
    for f in ("kv_heads", "experts", "top_k", "expert_ffn", "shared_ffn", "dense_layers", "kv_lora", "q_lora"):
        assert getattr(m, f) == getattr(ref, f), f
    assert 660e9 < ref.params < 690e9  # DeepSeek-R1 is 671B (+ MTP layer we do not model)
