"""Enumeration, Pareto frontier, choose_layout and input errors."""
import json
import types

import pytest

from helix_compile.planner import choose_layout, get_model, parse_context, plan
from helix_compile.planner.enumerate import helix_layouts, layout_error
from helix_compile.planner.pareto import frontier, headline


def _pt(user, gpu, batch=1):
    return types.SimpleNamespace(tokens_per_s_per_user=user, tokens_per_s_per_gpu=gpu,
                                 candidate=types.SimpleNamespace(batch=batch))


def test_frontier_small_case():
    pts = [_pt(10, 1), _pt(8, 3), _pt(8, 2), _pt(5, 2), _pt(4, 5), _pt(3, 4), _pt(1, 5)]
    f = frontier(pts)
    assert [(p.tokens_per_s_per_user, p.tokens_per_s_per_gpu) for p in f] == [(10, 1), (8, 3), (4, 5)]


def test_headline_ratios():
    helix = [_pt(15, 1, 1), _pt(10, 8, 32)]
    base = [_pt(10, 2, 4), _pt(5, 4, 8)]
    h = headline(helix, base)
    assert h["interactivity_ratio"] == pytest.approx(1.5)
    assert h["throughput_ratio"] == pytest.approx(4.0)  # 8 vs 2 at 10 tokens/s/user
    assert h["batch_ratio"] == pytest.approx(8.0)


@pytest.mark.parametrize("model,n", [("llama-3.1-8b", 4), ("llama-3.1-405b", 64), ("deepseek-r1", 8),
                                     ("qwen3-235b-a22b", 16), ("qwen3-30b-a3b", 4), ("deepseek-v2-lite", 4)])
def test_choose_layout_valid(model, n):
    m = get_model(model)
    lay = choose_layout(model, n, 131072, batch_size=4, dtype="fp8", hw="gb200")
    assert set(lay) == {"kvp", "tpa", "tpf", "ep"} and all(type(v) is int for v in lay.values())
    assert lay["kvp"] * lay["tpa"] == n == lay["tpf"] * lay["ep"]
    assert m.kv_heads % lay["tpa"] == 0 and m.q_heads % n == 0
    assert m.ffn % lay["tpf"] == 0 if not m.is_moe else (m.experts % lay["ep"] == 0 and
                                                          m.expert_ffn % lay["tpf"] == 0)
    assert layout_error(m, n, **lay) is None


def test_choose_layout_accepts_hf_config_and_dict():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                      intermediate_size=512, vocab_size=1000)
    a = choose_layout(cfg, 4, 1_000_000, batch_size=2)
    b = choose_layout(cfg.to_dict(), 4, 1_000_000, batch_size=2)
    assert a == b and a["tpa"] in (1, 2) and a["kvp"] * a["tpa"] == 4
    # Long context, few KV heads: the planner shards the sequence.
    assert a["kvp"] >= 2


def test_choose_layout_errors_name_the_numbers():
    with pytest.raises(ValueError, match=r"32 attention heads are not divisible by N = 3"):
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


def test_parse_context():
    assert parse_context("1M") == 1_000_000 and parse_context("128Ki") == 131072 and parse_context(4096) == 4096
    with pytest.raises(ValueError, match="cannot read context"):
        parse_context("lots")


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
