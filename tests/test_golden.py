"""Graph-diff fixtures: the FX graph before and after each pass, per family, as reviewed text.

Rank 1 of a 4-rank layout (kvp=2, tpa=2; ``LAYOUTS`` for MQA, MoE and MLA) on a fake process group, decode step (q_len=1), plus
llama's prefill and llama's decode with HOP-B (2 batch chunks: schedule.txt differs from partition.txt). Written
by ``helix_compile.graph_view`` (the code behind `helix graph --out`). Regenerate on purpose with
``HELIX_UPDATE_GOLDEN=1 pytest tests/test_golden.py`` and review the diff. Fixtures are tied to the torch and
transformers versions recorded in tests/golden/VERSIONS (the CI ones); with other versions (e.g. a GPU image's) the
comparison is skipped, saying why.
"""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import transformers
from torch.testing._internal.distributed.fake_pg import FakeStore

from helix_compile import Layout
from helix_compile.backend import write_stages
from helix_compile.graph_view import capture as capture_graphs
from models import model

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("HELIX_UPDATE_GOLDEN") == "1"
VERSIONS = f"torch {torch.__version__}\ntransformers {transformers.__version__}\n"
CASES = [("llama", "decode"), ("llama", "prefill"), ("llama", "decode-hopb2"), ("qwen2", "decode"),
         ("mistral", "decode"), ("phi", "decode"), ("mqa", "decode"),
         ("gpt2", "decode"), ("phi3", "decode"), ("gemma2", "decode"), ("mixtral", "decode"), ("deepseek_v3", "decode"),
         ("bert", "decode"), ("laguna", "decode"), ("gpt_bigcode", "decode"), ("diffllama", "decode")]
LAYOUTS = {  # a 4-rank layout per family (default kvp=2 x tpa=2)
    "mqa": dict(kvp=4, tpa=1),
    "mixtral": dict(kvp=2, tpa=2, ep=2),  # experts: 2 per rank (ep=2), each split in two (tpf=2)
    "deepseek_v3": dict(kvp=4, tpa=1, ep=2),  # MLA: the latent cache over kvp=4; MoE tpf=2 x ep=2
}


@pytest.fixture(scope="module")
def fake_world():
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=4)
    yield
    dist.destroy_process_group()


def capture(family: str, phase: str, folder: Path):
    """The fixture files of one case, written by the code behind `helix graph ... --out folder`."""
    hopb = 2 if phase.endswith("hopb2") else 1
    layout = Layout(**LAYOUTS.get(family, dict(kvp=2, tpa=2)), kv_block=4, hopb_chunks=hopb)
    done = capture_graphs(model(family), layout, "prefill" if phase == "prefill" else "decode", batch=2, prompt_len=5,
                          max_cache_len=32)
    write_stages(folder, done)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("family,phase", CASES)
def test_golden(family, phase, fake_world, tmp_path):
    expected = GOLDEN / family / phase
    if UPDATE:
        capture(family, phase, expected)
        (GOLDEN / "VERSIONS").write_text(VERSIONS)
        return
    recorded = (GOLDEN / "VERSIONS").read_text()
    if recorded != VERSIONS:
        pytest.skip(f"golden graphs were recorded with {recorded!r}; this is {VERSIONS!r}")
    capture(family, phase, tmp_path)
    for want in sorted(expected.iterdir()):
        got = (tmp_path / want.name).read_text()
        assert got == want.read_text(), f"{family}/{phase}/{want.name} changed: regenerate with HELIX_UPDATE_GOLDEN=1 and review the diff"


def test_partition_counts(fake_world, tmp_path):
    """The decode graph of a 2-layer model on kvp=2 x tpa=2: per layer one owner-only write, one partial
    attention, one all-to-all, one merge, and two all-reduces (o_proj, down_proj); no SDPA left."""
    capture("llama", "decode", tmp_path)
    text = (tmp_path / "schedule.txt").read_text()
    counts = {op: text.count(op + "(") for op in (
        "helix.kv_write_local.default", "helix.partial_attention.default", "_c10d_functional.all_to_all_single.default",
        "helix.lse_merge.default", "_c10d_functional.all_reduce.default", "scaled_dot_product_attention",
        "helix.kv_write.default")}
    assert counts == {
        "helix.kv_write_local.default": 2, "helix.partial_attention.default": 2,
        "_c10d_functional.all_to_all_single.default": 2, "helix.lse_merge.default": 2,
        "_c10d_functional.all_reduce.default": 4, "scaled_dot_product_attention": 0, "helix.kv_write.default": 0,
    }, counts
