"""The cost model: Figure 1 exactly, and the properties the strategies must have."""

import pytest

from helix_compile.planner import appendix_a, evaluate, get_hardware, get_model
from helix_compile.planner.cost import PAPER, Candidate, Costing, busiest_experts, hopb_exposed
from helix_compile.planner.paper import FIG1, figure1


def test_figure1_kv_read_exact():
    # Llama-405B-like, B=8, K=8, Hsz=128, S=10^6, FP4 (0.5 B), 8000 GB/s: t_KV = 8.192 GB / 8 TB/s = 1.024 ms.
    assert appendix_a(**FIG1, tpa=1)["t_kv"] * 1e3 == pytest.approx(1.024, rel=1e-12)
    assert appendix_a(**FIG1, tpa=8)["t_kv"] * 1e3 == pytest.approx(1.024 / 8, rel=1e-12)
    # TPA beyond K duplicates KV heads: no further gain; KVP keeps dividing.
    assert appendix_a(**FIG1, tpa=64)["t_kv"] == appendix_a(**FIG1, tpa=8)["t_kv"]
    assert appendix_a(**FIG1, tpa=8, kvp=8)["t_kv"] * 1e3 == pytest.approx(0.016, rel=1e-12)


def test_figure1_rows():
    rows = {(r["series"], r["tpa"], r["kvp"]): r for r in figure1()}
    assert rows[("TP", 1, 1)]["t_kv_ms"] == pytest.approx(1.024)
    assert rows[("TP", 8, 1)]["t_kv_ms"] == pytest.approx(0.128)
    # t_W at TPA = TPF = 1: [2*H*Q*Hsz + 2*H*K*Hsz + 3*H*F] * 0.5 / 8e12 with H = 16384, F = 65536.
    H = 16384
    expect = (2 * H * 128 * 128 + 2 * H * 8 * 128 + 3 * H * 65536) * 0.5 / 8e12 * 1e3
    assert rows[("TP", 1, 1)]["t_w_ms"] == pytest.approx(expect)


def test_full_model_matches_appendix_kv_term():
    # The full cost model's KV read equals Appendix A's t_KV for the same shapes (GB200 = 8000 GB/s spec).
    m, hw = get_model("llama-3.1-405b"), get_hardware("gb200")
    for kvp, tpa in [(1, 1), (1, 8), (8, 8)]:
        c = Candidate("helix", kvp * tpa, kvp, tpa, kvp * tpa, 1, batch=8)
        e = evaluate(m, hw, c, 1e6, "fp4")
        ref = appendix_a(B=8, Q=128, K=8, Hsz=128, S=1e6, F=m.ffn, bytes_per_elem=0.5, mem_bw_gbs=8000, tpa=tpa,
                         kvp=kvp)["t_kv"]
        assert e.per_layer["kv_read"] == pytest.approx(ref)


def test_tp_duplicates_kv_and_helix_does_not():
    m, hw = get_model("llama-3.1-405b"), get_hardware("gb200")
    tp = evaluate(m, hw, Candidate("tp", 64, 1, 64, 64, 1, 8), 1e6, "fp4")
    hx = evaluate(m, hw, Candidate("helix", 64, 8, 8, 64, 1, 8), 1e6, "fp4")
    assert tp.per_layer["kv_read"] == pytest.approx(8 * hx.per_layer["kv_read"])
    assert tp.memory["kv"] > 7 * hx.memory["kv"]


def test_per_layer_times_add_up():
    m, hw = get_model("llama-3.1-8b"), get_hardware("h200")
    e = evaluate(m, hw, Candidate("helix", 4, 2, 2, 4, 1, 8, hopb_chunks=1), 131072, "bf16")
    p = e.per_layer
    # memory-bound here: total = kv + weights + comm (compute hidden under the reads)
    assert p["total"] == pytest.approx(p["kv_read"] + p["weight_read"] + p["comm"], rel=1e-9)
    assert e.ttl_s == pytest.approx(p["total"] * m.layers + e.head_s)
    assert e.tokens_per_s_per_gpu == pytest.approx(8 / e.ttl_s / 4)


def test_hopb_matches_paper_toy_example():
    # Figure 3: 8 requests, 2 units compute and 1.2 units comm each: lock-step 25.6, HOP-B 16 + 1.2 = 17.2.
    comm = lambda nbytes: 1.2 * nbytes  # noqa: E731  (one "byte" per request, no latency)
    assert 16 + hopb_exposed(16, comm, 8, 1) == pytest.approx(25.6)
    assert 16 + hopb_exposed(16, comm, 8, 8) == pytest.approx(17.2)


def test_ep_pays_for_imbalance():
    p = 1 - (1 - 8 / 256)
    assert busiest_experts(256, p, 1) == pytest.approx(8.0)  # TPF: the mean
    assert 1.0 < busiest_experts(4, p, 64) < 2.0  # EP=64 at batch 1: the busiest GPU reads >= 1 whole expert
    assert busiest_experts(4, 1.0, 64) == 4


def test_memory_grows_with_context_and_batch():
    m, hw = get_model("llama-3.1-70b"), get_hardware("h200")
    c = lambda b: Candidate("helix", 4, 1, 4, 4, 1, b)  # noqa: E731
    small = evaluate(m, hw, c(1), 8192, "bf16")
    big = evaluate(m, hw, c(8), 131072, "bf16")
    assert big.memory["kv"] == pytest.approx(small.memory["kv"] * 8 * 16, rel=1e-3)
    emb = 2 * m.vocab * m.hidden * 2 / 1e9  # embedding + LM head, bf16: replicated on every rank by the backend
    assert small.memory["weights"] == pytest.approx((70.55e9 * 2 / 1e9 - emb) / 4 + emb, rel=0.02)
    target = evaluate(m, hw, c(1), 8192, "bf16", costing=PAPER)  # vocab-parallel head: 1/4 of everything
    assert target.memory["weights"] == pytest.approx(70.55e9 * 2 / 4 / 1e9, rel=0.02)


def test_lm_head_costed_as_the_backend_runs_it():
    """The backend replicates the LM head: each rank reads all vocab x hidden weights and gathers nothing."""
    m, hw = get_model("llama-3.1-8b"), get_hardware("h200")
    c = Candidate("helix", 4, 4, 1, 4, 1, 1)
    head = evaluate(m, hw, c, 8192, "bf16").head_s
    assert head == pytest.approx(m.vocab * m.hidden * 2 / (hw.mem_bw_gbs * 1e9), rel=1e-6)  # ~250 us at 4.19 TB/s
    # vocab-parallel: a quarter of the read plus the all-gather of each rank's best token (the old 121 us)
    assert evaluate(m, hw, c, 8192, "bf16", costing=PAPER).head_s < head / 2


def test_mla_costed_absorbed_for_the_backend():
    """The backend runs MLA absorbed as the paper does (attention over the latent cache, read where it is cached:
    the same layer cost as the paper's kernel, apart from the all-reduces the paper overlaps with the GEMMs), far
    below transformers' up-projection of the whole cache. All forms exchange v_dim-wide partials (W_UV commutes
    with the LSE merge)."""
    m, hw = get_model("deepseek-v2-lite"), get_hardware("h200")
    c = Candidate("helix", 4, 4, 1, 4, 1, 8)
    backend, paper = evaluate(m, hw, c, 131072, "bf16"), evaluate(m, hw, c, 131072, "bf16", costing=PAPER)
    up = evaluate(m, hw, c, 131072, "bf16", costing=Costing(mla="up-projected"))
    assert backend.per_layer["kv_read"] == paper.per_layer["kv_read"] == up.per_layer["kv_read"]  # one latent cache
    hidden = backend.per_layer["comm"] - paper.per_layer["comm"]
    assert hidden > 0 and paper.per_layer["total"] == pytest.approx(backend.per_layer["total"] - hidden)
    assert backend.per_layer["total"] < up.per_layer["total"] / 3


def test_collective_payload_in_the_config_precision():
    m, hw = get_model("llama-3.1-405b"), get_hardware("gb200")
    c = Candidate("tp", 8, 1, 8, 8, 1, 4096)
    hw.per_layer_overhead_us = 0.0
    comm = {d: evaluate(m, hw, c, 8192, d).per_layer["comm"] for d in ("bf16", "fp4")}
    alpha = 2 * hw.collectives["all_reduce"].alpha_us * 1e-6
    assert (comm["bf16"] - alpha) == pytest.approx(4 * (comm["fp4"] - alpha), rel=1e-6)


def test_overlap_hides_only_the_bandwidth_part():
    m, hw = get_model("llama-3.1-405b"), get_hardware("gb200")
    c = Candidate("tp", 8, 1, 8, 8, 1, 64)
    exposed = evaluate(m, hw, c, 8192, "fp4").per_layer["comm"]
    hidden = evaluate(m, hw, c, 8192, "fp4", costing=PAPER).per_layer["comm"]
    assert hidden == pytest.approx(2 * hw.collectives["all_reduce"].alpha_us * 1e-6) and hidden < exposed
