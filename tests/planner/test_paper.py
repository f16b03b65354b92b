"""The paper comparison's ingredients: the MLA TP baseline, HOP-B chunking, the overlap rule, the sourced presets."""
import json
import os

import pytest

from helix_compile.cli import main
from helix_compile.planner import choose_layout, evaluate, get_hardware, get_model, plan
from helix_compile.planner.cost import PAPER, Candidate, hopb_exposed, hopb_options
from helix_compile.planner.hardware import HARDWARE_NAMES, PUBLIC
from helix_compile.planner.pareto import fixed_batch

PLANNER_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "helix_compile", "planner")


def test_r1_tp_baseline_evaluates_and_is_labelled(capsys):
    """`helix plan --model deepseek-r1 --strategies tp --costing paper` evaluates the paper's TP baseline (the latent
    on every GPU) on 2..64 GPUs, marked as not run by the backend."""
    rc = main(["plan", "--model", "deepseek-r1", "--gpus", "64", "--context", "1M", "--dtype", "fp4", "--hw", "gb200",
               "--strategies", "tp", "--costing", "paper", "--json"])
    d = json.loads(capsys.readouterr().out)
    assert rc == 0
    wide = [lay for lay in d["layouts"] if lay["tpa"] > 1]
    assert {lay["gpus"] for lay in wide} == {2, 4, 8, 16, 32, 64}
    assert all(not lay["backend_runs"] for lay in wide) and any(lay["feasible"] for lay in wide)
    assert d["best"]["tpa"] == 64 and not d["best"]["backend_runs"]
    # each GPU reads the whole latent: the same KV read as kvp = 1 Helix on one GPU, 64x Helix's kvp = 64
    m, hw = get_model("deepseek-r1"), get_hardware("gb200")
    tp = evaluate(m, hw, Candidate("tp", 64, 1, 64, 64, 1, 8), 1e6, "fp4", costing=PAPER)
    hx = evaluate(m, hw, Candidate("helix", 64, 64, 1, 64, 1, 8), 1e6, "fp4", costing=PAPER)
    assert tp.per_layer["kv_read"] == pytest.approx(64 * hx.per_layer["kv_read"])
    main(["plan", "--model", "deepseek-r1", "--gpus", "64", "--context", "1M", "--dtype", "fp4", "--hw", "gb200",
          "--strategies", "tp", "--costing", "paper", "--top", "1"])
    assert "a paper baseline (MLA latent on every GPU), not run by the backend" in capsys.readouterr().out


def test_choose_layout_never_returns_the_mla_tp_baseline():
    for world in (2, 4):
        lay = choose_layout("deepseek-v2-lite", world, 4096, batch_size=64, dtype="bf16")
        assert lay["tpa"] == 1 and lay["kvp"] == world
    assert all(e.candidate.tpa == 1 for e in plan("deepseek-v2-lite", 4, 4096, batch=8, backend_only=True, strategies=("helix", "tp"),
                                                   replicas=False).evaluations)


def _pipeline(core, alpha, per_request_bytes_s, batch, chunks):
    """Brute-force two-stage pipeline: chunks of ceil(batch/chunks) requests, attention then exchange."""
    k = -(-batch // chunks)
    sizes = [min(k, batch - i) for i in range(0, batch, k)]
    att_end = comm_end = 0.0
    for n in sizes:
        att_end += core * n / batch
        comm_end = max(comm_end, att_end) + alpha + per_request_bytes_s * n
    return comm_end - core


@pytest.mark.parametrize("batch,chunks", [(35, 35), (35, 6), (35, 2), (35, 1), (8, 3), (448, 50), (7, 4)])
@pytest.mark.parametrize("alpha", [0.0, 5.0, 40.0])
def test_hopb_uneven_chunks_match_the_pipeline(batch, chunks, alpha):
    comm = lambda nbytes: alpha + 0.01 * nbytes  # noqa: E731  (us; "bytes" = requests * 100)
    core = 300.0
    got = hopb_exposed(core, comm, 100.0 * batch, chunks, batch)
    assert got == pytest.approx(_pipeline(core, alpha, 1.0, batch, chunks))


def test_hopb_hides_latency_of_all_but_the_last_exchange():
    # 35 requests, 10 us attention each, exchanges of 5 us + 0.2 us per request: every exchange but the last hides
    comm = lambda nbytes: 5.0 + 0.2 * nbytes  # noqa: E731
    assert hopb_exposed(350.0, comm, 35, 35, 35) == pytest.approx(5.2)
    assert hopb_exposed(350.0, comm, 35, 1, 35) == pytest.approx(5.0 + 7.0)
    assert 35 in hopb_options(350.0, comm, 35, 35)


def test_batch_35_gets_hopb():
    """The headline Helix configuration of DeepSeek-R1 (kvp = 64, batch 35) pipelines its exchange in chunks that
    need not be a power of two or divide the batch."""
    m, hw = get_model("deepseek-r1"), get_hardware("gb200")
    e = evaluate(m, hw, Candidate("helix", 64, 64, 1, 64, 1, 35), 1e6, "fp4", costing=PAPER)
    off = evaluate(m, hw, Candidate("helix", 64, 64, 1, 64, 1, 35, hopb_chunks=1), 1e6, "fp4", costing=PAPER)
    assert e.hopb_chunks > 1 and e.ttl_s < off.ttl_s


def test_overlap_rule_is_the_same_for_helix_and_tp():
    """Under the paper costing, Helix's two all-reduces and TP's hide their bandwidth part under the GEMMs and
    expose their latency (kvp = 1 Helix is the same program as TP: the same exposed communication)."""
    m, hw = get_model("llama-3.1-405b"), get_hardware("gb200")
    tp = evaluate(m, hw, Candidate("tp", 8, 1, 8, 8, 1, 64), 8192, "fp4", costing=PAPER)
    hx = evaluate(m, hw, Candidate("helix", 8, 1, 8, 8, 1, 64), 8192, "fp4", costing=PAPER)
    assert hx.per_layer["comm"] == pytest.approx(tp.per_layer["comm"])
    assert hx.per_layer["comm"] == pytest.approx(2 * hw.collectives["all_reduce"].alpha_us * 1e-6)


def test_fixed_batch_reading():
    class E:
        def __init__(self, b, ttl):
            self.candidate, self.ttl_s = Candidate("helix", 1, 1, 1, 1, 1, b), ttl

    r = fixed_batch([E(1, 1.0), E(2, 1.0), E(2, 0.9)], [E(1, 1.5), E(2, 1.8), E(4, 9.0)])
    assert r["batch"] == 2 and r["ratio"] == pytest.approx(2.0) and r["at_batch_1"] == pytest.approx(1.5)


def test_every_preset_collective_has_a_source():
    """Collective latencies come from a public measurement named by its address, or from `helix bench`; nothing in
    the planner cites a document outside the repository."""
    assert all(v[0] > 0 and "github.com" in v[1] for v in PUBLIC.values())
    for name in HARDWARE_NAMES:
        hw = get_hardware(name)
        src = hw.sources["collectives"]
        assert src.startswith(("public", "measured")) and "github.com" in src, (name, src)
        for c in hw.collectives.values():
            assert c.alpha_us > 0 and c.source.startswith("public"), (name, c)
    for f in os.listdir(PLANNER_DIR):
        if f.endswith(".py"):
            text = open(os.path.join(PLANNER_DIR, f)).read()
            assert "DESIGN.md" not in text and "/work/shared" not in text, f


def test_payload_precision_is_printed(capsys):
    main(["plan", "--model", "llama-3.1-8b", "--gpus", "4", "--context", "32K", "--batch", "2", "--top", "1"])
    out = capsys.readouterr().out
    assert "collective payloads" in out and "bf16 (2 B/element)" in out and "LSE fp32" in out
