"""The benchmark scripts (``benchmarks/``): each answers ``--help`` on a machine without CUDA, a GPU script run
there stops with one line naming what is missing, and none imports from ``tests/``.

The scripts run in this process (``runpy``), so that the check costs no interpreter start."""

import ast
import runpy
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))
GPU = {"attention.py", "chunked_kernel.py", "prefill.py", "prompt_lengths.py"}  # the rest run on the CPU (the planner)


def _run(script: Path, monkeypatch, *argv):
    """``python benchmarks/<script> argv...`` in this process: the SystemExit it ends with."""
    monkeypatch.setattr(sys, "argv", [str(script), *argv])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the scripts put the checkout first; undone after the test
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    return done.value


def test_the_benchmarks_are_there():
    assert {p.name for p in SCRIPTS} >= GPU | {"predict_8gpu.py"}, [p.name for p in SCRIPTS]


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_help_without_cuda(script, monkeypatch, capsys):
    done = _run(script, monkeypatch, "--help")
    out = capsys.readouterr().out
    assert done.code == 0 and out.startswith(f"usage: {script.name}"), out
    assert len(out.split("\n\n")[1].strip()) > 40, f"{script.name} --help has no description:\n{out}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("name", sorted(GPU))
def test_gpu_benchmark_without_cuda_is_one_line(name, monkeypatch):
    done = _run(ROOT / "benchmarks" / name, monkeypatch)
    assert done.code == f"benchmarks/{name}: needs a CUDA GPU, and torch {torch.__version__} sees none"


def test_benchmarks_import_nothing_from_tests():
    helpers = {p.stem for p in (ROOT / "tests").rglob("*.py")}
    found = []
    for script in SCRIPTS:
        for node in ast.walk(ast.parse(script.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            found += [f"{script.name} imports {n}" for n in names if n.split(".")[0] in helpers | {"tests"}]
    assert not found, "benchmarks must not import test helpers (move the helper into the package or benchmarks/):\n" \
        + "\n".join(found)


def test_the_predictions_the_docs_quote_are_the_planners(monkeypatch, capsys):
    """``results/perf/predictions-8gpu-h200.json`` (quoted in docs/perf.md) is what the planner predicts now: a
    change to the cost model that moves a number must regenerate the file and the table."""
    import json

    monkeypatch.setattr(sys, "argv", ["predict_8gpu.py"])
    monkeypatch.setattr(sys, "path", list(sys.path))
    runpy.run_path(str(ROOT / "benchmarks" / "predict_8gpu.py"), run_name="__main__")
    now = json.loads(capsys.readouterr().out)["rows"]
    committed = json.loads((ROOT / "results" / "perf" / "predictions-8gpu-h200.json").read_text())["rows"]
    assert now == committed, "regenerate: python benchmarks/predict_8gpu.py > results/perf/predictions-8gpu-h200.json"
