"""tools/coverage.py's low-precision verdicts: the bound against one device's own error, the results file's layout
(fp32 and bf16 side by side) and the page's columns; one real bf16 judgement on one process."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("coverage_tool", ROOT / "tools" / "coverage.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ranks(cells_per_rank):
    return [{"status": "ok", "class": "LlamaForCausalLM", "attn": "sdpa", "cells": cells} for cells in cells_per_rank]


def _bf16(err, single, logits=(1.0, 2.0)):
    return {"status": "ran", "err": err, "single": single, "tokens_equal": False, "logits": list(logits),
            "whole": [], "bare": None}


def _fp32(err):
    return {"status": "ran", "err": err, "tokens_equal": True, "logits": [1.0], "whole": [], "bare": None}


def test_bf16_cell_is_bounded_by_twice_one_devices_error(tool):
    assert tool.split_dtype("llama@bfloat16") == ("llama", "bfloat16")
    assert tool.split_dtype("gpt2") == ("gpt2", "float32")
    within = _ranks([{"kvp2-tpa1": _bf16(0.019, 0.01)}] * 2)
    assert tool.cell(within, "kvp2-tpa1")["status"] == "within"
    assert tool.classify(within) == "within"  # teacher-forced: argmax flips against fp32 do not count
    over = _ranks([{"kvp2-tpa1": _bf16(0.021, 0.01)}] * 2)
    assert tool.cell(over, "kvp2-tpa1")["status"] == "WRONG"
    assert tool.classify(over) == "wrong"
    ranks_differ = _ranks([{"kvp2-tpa1": _bf16(0.01, 0.01)}, {"kvp2-tpa1": _bf16(0.01, 0.01, (1.0, 2.5))}])
    c = tool.cell(ranks_differ, "kvp2-tpa1")
    assert (c["status"], c["same"]) == ("WRONG", False)
    mixed = _ranks([{"kvp2-tpa1": _bf16(0.01, 0.01), "kvp1-tpa2": {"status": "error", "message": "refused"}}] * 2)
    assert tool.classify(mixed) == "partly"


def test_results_file_keeps_fp32_and_bf16_side_by_side(tool):
    results = {
        "llama": {2: _ranks([{"kvp2-tpa1": _fp32(2e-7)}] * 2),
                  "bfloat16": {2: _ranks([{"kvp2-tpa1": _bf16(0.005, 0.008)}] * 2)}},
        "qwen2": {2: _ranks([{"kvp2-tpa1": _fp32(3e-7)}] * 2)},
    }
    runs = [{"date": "2026-01-01", "commit": "abc", "torch": "t", "transformers": "x", "command": "c", "minutes": 1,
             "steps": 10, "families": "all"}]
    loaded, loaded_runs = tool.load(tool.dump(results, runs))
    assert loaded == results and loaded_runs == runs and tool.worlds_of(loaded) == [2]
    page = tool.render(loaded, [2], 10, runs)
    assert "| model type | class (attention) | fp32 | bfloat16 | kvp2-tpa1 |" in page
    assert "| llama | LlamaForCausalLM (sdpa) | exact | within | exact 2.0e-07, tokens = |" in page
    assert "| qwen2 | LlamaForCausalLM (sdpa) | exact | not run | exact 3.0e-07, tokens = |" in page
    assert "at most 2 × single-device transformers' own bfloat16 error against the fp32 model" in page
    assert "| llama | within | within 5.0e-03 vs 2 × 8.0e-03 |" in page
    assert "**Summary (1 of 2 model types run in bfloat16):** within: 1." in page
    assert "every model type in float32" in page  # a run record without a dtype is an fp32 run


@pytest.mark.parametrize("family", ["llama", "mpt"])  # MPT: bf16's lowest fills its fp32 scores (ALiBi in fp32)
def test_bf16_on_one_process_is_within_the_bound(tool, family):
    import torch

    from helix_compile import Layout

    model, _, fp32 = tool.build_in(family, "bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16 and next(fp32.parameters()).dtype == torch.float32
    ids = torch.randint(3, 97, (2, tool.PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    fields, bare = tool.judged_compare(model, Layout(1, kv_block=tool.KV_BLOCK), ids, 3, tool.PROMPT_LEN + 4, fp32)
    assert bare is None
    assert 0 < fields["single"] < 0.05, fields  # bf16 really differs from fp32, by bf16's rounding
    assert 0 < fields["err"] <= tool.BOUND * fields["single"], fields
