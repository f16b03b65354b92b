"""from_pretrained reads each rank's slices of fused and Conv1D projections by name, exactly the shards the plan
asks for (the runtime refuses a registered shard that differs from the plan's), and the result is exact."""

import pytest
import torch

import helix_compile
from helix_compile import Layout, shards
from distributed import run_ranks
from models import model
from test_memory import _compare_sharded

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
FAMILIES = ["gpt2", "phi3", "bert", "gemma2", "diffllama"]  # gpt_neox: transformers 5.24 saves no lm_head (declared
# tied, not tied); bert: attention.self.query/key/value, attention.output.dense (o) beside the FFN's output.dense
# (ffn_out) by name; gemma2: transformers has no SDPA form of its attention, so from_pretrained builds its eager one;
# diffllama: q/k/v_proj rows of heads in two parts, one block of each per TPA rank (roles.head_ranges)


def _load_and_compare(rank, folders):
    from transformers import AutoModelForCausalLM

    layout = Layout(1, 2, kv_block=4)  # tpa=2: every fused projection is cut into two TPA slices
    out = []
    for family, folder in folders.items():
        torch._dynamo.reset()
        sharded = helix_compile.from_pretrained(folder, layout)
        held = sum(sum(shards.lookup(p, k).numel() for k in shards.keys_of(p)) if shards.is_virtual(p) else p.numel()
                   for p in sharded.parameters())
        full = sum(p.numel() for p in sharded.parameters())
        reference = AutoModelForCausalLM.from_pretrained(folder).eval()  # SDPA where the family has it
        out.append((family, _compare_sharded(sharded, reference, layout), held / full))
    return out


def test_fused_and_conv1d_checkpoints_load_per_rank(tmp_path):
    folders = {}
    for family in FAMILIES:
        folders[family] = str(tmp_path / family)
        model(family).save_pretrained(folders[family])
    for per_rank in run_ranks(2, _load_and_compare, folders):
        for family, err, held in per_rank:
            print(f"{family}: from_pretrained shards max rel err {err:.2e}, holds {held:.0%} of the parameters")
            assert err < 1e-5, family
            assert held < 0.9, family  # the projections are split, not loaded whole
