"""`helix graph`: the same files as the golden fixtures, the per-pass diffs as text and HTML, clear refusals."""

from pathlib import Path

import pytest
import torch
import transformers

from helix_compile.cli import main
from models import config

GOLDEN = Path(__file__).parent / "golden"

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def test_out_folder_is_the_golden_fixture(tmp_path, capsys):
    """`helix graph llama ... --out` on a tiny random llama (virtual weights) writes tests/golden/llama/decode."""
    recorded = (GOLDEN / "VERSIONS").read_text()
    if recorded != f"torch {torch.__version__}\ntransformers {transformers.__version__}\n":
        pytest.skip(f"golden graphs were recorded with {recorded!r}")
    html = tmp_path / "graph.html"
    assert main(["graph", "llama", "--kvp", "2", "--tpa", "2", "--kv-block", "4", "--rank", "1",
                 "--out", str(tmp_path / "g"), "--html", str(html)]) == 0
    text = capsys.readouterr().out
    for want in sorted((GOLDEN / "llama" / "decode").iterdir()):
        assert (tmp_path / "g" / want.name).read_text() == want.read_text(), want.name
    # text: every pass in pipeline order, diffs of the graph-changing passes
    heads = [line.split(":")[0] for line in text.splitlines() if line.startswith("== ")]
    assert heads == ["== capture", "== detect", "== plan", "== partition", "== schedule"]
    assert "+++ partition.txt" in text and "-attn_output = scaled_dot_product_attention(" in text
    assert "+partial_attention_default = helix.partial_attention.default(" in text
    assert "(no change from partition)" in text  # hopb_chunks=1
    page = html.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "http" not in page.split("<body>")[1]
    assert '<span class="add">+partial_attention_default = helix.partial_attention.default(' in page


def test_one_pass_with_hopb(capsys):
    assert main(["graph", "llama", "--kvp", "2", "--tpa", "2", "--hopb-chunks", "2", "--pass", "schedule"]) == 0
    text = capsys.readouterr().out
    assert [line for line in text.splitlines() if line.startswith("== ")] == ["== schedule: HOP-B"]
    assert "+++ schedule.txt" in text and text.count("all_to_all_single") >= 2


def test_refusals(tmp_path, capsys):
    assert main(["graph", "lama", "--kvp", "2"]) == 2
    assert "'lama' is neither a directory nor a transformers model_type (did you mean llama" in capsys.readouterr().err
    assert main(["graph", "llama", "--kvp", "2", "--tpa", "3"]) == 2
    assert "tpa=3 does not divide num_key_value_heads=4" in capsys.readouterr().err
    assert main(["graph", "doge", "--kvp", "2"]) == 2  # dynamic mask attention: refused by the matcher
    assert "its mask carries a bias" in capsys.readouterr().err
    assert main(["graph", "diffllama", "--kvp", "1", "--tpa", "4"]) == 2  # pairs h, h + 4: a TPA rank needs both
    assert ("pairs query head h with h + 4 and KV head g with g + 2 (2 parts of 4 query and 2 KV heads, 8 and 4 in "
            "all); tpa=4 must divide both 4 and 2") in capsys.readouterr().err


def test_bf16_moe_checkpoint(tmp_path, capsys):
    """A bf16 MoE checkpoint (virtual expert weights): transformers' grouped_mm experts would call
    torch._grouped_mm, whose stride check refuses a virtual weight; it is traced as helix::grouped_mm and the
    rank's program calls torch._grouped_mm on its shard."""
    config("mixtral", dtype="bfloat16").save_pretrained(tmp_path)
    assert main(["graph", str(tmp_path), "--kvp", "2", "--pass", "partition"]) == 0
    text = capsys.readouterr().out
    assert "-out = helix.grouped_mm.default(to_8, transpose_4, offsets)" in text
    assert "+out = _grouped_mm(to_8, transpose_4, offs=offsets)" in text
