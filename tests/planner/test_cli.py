"""`helix plan` through cli.main: JSON schema, errors, PNG, calibration round trip."""
import json

import pytest

from helix_compile.cli import main
from helix_compile.planner.calibrate import calibrate
from helix_compile.planner.cost import Candidate, evaluate
from helix_compile.planner.hardware import get_hardware
from helix_compile.planner.model import get_model

PER_LAYER_KEYS = {"kv_read", "weight_read", "compute", "comm", "total"}
LAYOUT_KEYS = {"per_layer_ms", "ttl_ms", "tokens_per_s_per_gpu", "tokens_per_s_per_user", "memory_gb_per_gpu",
               "kvp", "tpa", "tpf", "ep", "batch", "hopb_chunks", "kv_block", "strategy", "gpus", "feasible"}


def _json(capsys, argv):
    rc = main(argv)
    out = capsys.readouterr().out
    return rc, json.loads(out)


def test_plan_json_schema(capsys):
    rc, d = _json(capsys, ["plan", "--model", "llama-3.1-8b", "--gpus", "4", "--context", "128K", "--batch", "8",
                           "--json"])
    assert rc == 0 and d["gpus"] == 4 and d["context"] == 131072  # K = 1024
    assert d["layouts"] and d["best"]
    for lay in d["layouts"]:
        assert LAYOUT_KEYS <= set(lay)
        assert set(lay["per_layer_ms"]) == PER_LAYER_KEYS
        assert lay["batch"] == 8
    assert any(lay["pareto"] for lay in d["layouts"])


def test_plan_layout_and_ttl(capsys):
    rc, d = _json(capsys, ["plan", "--model", "llama-3.1-8b", "--gpus", "4", "--context", "1M", "--batch", "2",
                           "--layout", "kvp=2,tpa=2,hopb_chunks=2", "--ttl-ms", "1000", "--json"])
    assert rc == 0 and len(d["layouts"]) == 1
    lay = d["layouts"][0]
    assert (lay["kvp"], lay["tpa"], lay["tpf"], lay["ep"], lay["hopb_chunks"]) == (2, 2, 4, 1, 2)
    assert d["ttl_ms_limit"] == 1000


def test_plan_table_and_png(tmp_path, capsys):
    png = tmp_path / "p.png"
    assert main(["plan", "--model", "qwen3-30b-a3b", "--gpus", "4", "--context", "32K", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "Pareto frontier" in out and "best (lowest TTL)" in out
    assert png.stat().st_size > 10_000


@pytest.mark.parametrize("argv,needle", [
    (["--model", "nope", "--gpus", "4", "--context", "1M"], "unknown model 'nope'"),
    (["--model", "llama-3.1-8b", "--gpus", "4", "--context", "1M", "--hw", "tpu"], "unknown hardware 'tpu'"),
    (["--model", "llama-3.1-8b", "--gpus", "4", "--context", "1M", "--layout", "kvp=2,tpa=4"],
     "kvp*tpa = 8 GPUs but --gpus is 4"),
    (["--model", "llama-3.1-8b", "--gpus", "4", "--context", "1M", "--layout", "kvp=2,tpa"], "invalid layout"),
    (["--model", "llama-3.1-8b", "--gpus", "4", "--context", "1M", "--layout", "kvp=2,foo=2"], "'foo'"),
    (["--model", "llama-3.1-8b", "--gpus", "16", "--context", "1M"], "16 GPUs exceed one NVLink domain of h200 (8 GPUs)"),
    (["--model", "llama-3.1-8b", "--gpus", "8", "--context", "1M", "--layout", "kvp=1,tpa=8", "--hw", "h100"], None),
    (["--model", "deepseek-r1", "--gpus", "8", "--context", "1M", "--layout", "kvp=4,tpa=2"],
     "tpa = 2 does not divide the 1 KV heads"),
    (["--model", "llama-3.1-8b", "--gpus", "4", "--context", "1M", "--dtype", "fp4"], "no fp4 tensor cores"),
    (["--model", "llama-3.1-8b", "--gpus", "4"], "--context required"),
])
def test_plan_errors(capsys, argv, needle):
    rc = main(["plan"] + argv)
    err = capsys.readouterr().err
    if needle is None:
        assert rc == 0
    else:
        assert rc == 2 and needle in err, err


def _synthetic_results():
    """A bench file generated from known collective costs (alpha 20/30 us) and a 7 us per-layer overhead."""
    hw = get_hardware("h200")
    hw.collectives["all_to_all"].alpha_us, hw.collectives["all_to_all"].bw_gbs = 20.0, 300.0
    hw.collectives["all_reduce"].alpha_us, hw.collectives["all_reduce"].bw_gbs = 30.0, 200.0
    hw.collectives["all_gather"].alpha_us, hw.collectives["all_gather"].bw_gbs = 30.0, 200.0
    hw.per_layer_overhead_us = 7.0
    from helix_compile.planner.collectives import collective_us

    coll = [{"op": op, "group_size": 4, "bytes_per_rank": b, "us": collective_us(hw.collectives[op], op, 4, b)}
            for op in ("all_to_all", "all_reduce", "all_gather") for b in (4096, 65536, 1 << 20, 4 << 20)]
    decode = []
    # helix rows, and the TP baseline as `helix bench` emits it (strategy "tp", kvp=1, tpa=N)
    for strategy, lay, b in [("helix", (2, 2), 8), ("helix", (4, 1), 1), ("helix", (1, 4), 16), ("tp", (1, 4), 4)]:
        c = Candidate(strategy, 4, lay[0], lay[1], 4, 1, b, hopb_chunks=1)
        e = evaluate(get_model("llama-3.1-8b"), hw, c, 131072, "bf16")
        decode.append({"model": "llama-3.1-8b", "context": 131072, "batch": b, "dtype": "bf16",
                       "layout": {"strategy": strategy, "kvp": lay[0], "tpa": lay[1], "tpf": 4, "ep": 1,
                                  "hopb_chunks": 1}, "ttl_ms": e.ttl_s * 1e3})
    return {"schema": "helix-bench/1", "hardware": {"preset": "h200", "card": "synthetic", "gpus": 4},
            "collectives": coll, "decode": decode}


def test_calibration_recovers_known_parameters(tmp_path, capsys):
    data = _synthetic_results()
    hw, rows = calibrate(data)
    assert hw.collectives["all_to_all"].alpha_us == pytest.approx(20.0, rel=1e-6)
    assert hw.collectives["all_reduce"].bw_gbs == pytest.approx(200.0, rel=1e-6)
    assert hw.per_layer_overhead_us == pytest.approx(7.0, rel=1e-3)
    assert all(r["within_20pct"] and abs(r["error"]) < 1e-3 for r in rows)
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    saved = tmp_path / "hw.json"
    assert main(["plan", "--calibrate", str(path), "--save-hw", str(saved)]) == 0
    assert "within 20%" in capsys.readouterr().out
    assert main(["plan", "--model", "llama-3.1-8b", "--gpus", "4", "--context", "8K", "--hw", str(saved)]) == 0


def test_calibration_bad_file(tmp_path, capsys):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"schema": "other"}))
    assert main(["plan", "--calibrate", str(p)]) == 2
    assert "expected 'helix-bench/1'" in capsys.readouterr().err
