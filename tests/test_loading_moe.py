"""from_pretrained of MoE checkpoints: transformers 5.x saves one tensor per expert (Mixtral's w1/w3/w2, Qwen2-MoE's
and DeepSeek's gate/up/down_proj); each rank reads only its experts (ep) and their tpf slice into its fused piece,
the same piece the plan asks for (the runtime refuses a registered shard that differs), and the result is exact."""

import pytest
import torch

import helix_compile
from helix_compile import Layout, shards
from distributed import run_ranks
from models import model
from test_memory import _compare_sharded

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _load_and_compare(rank, folders, layouts):
    from transformers import AutoModelForCausalLM

    out = []
    for (family, folder), fields in zip(folders.items(), layouts):
        torch._dynamo.reset()
        layout = Layout(kv_block=4, **fields)
        sharded = helix_compile.from_pretrained(folder, layout)
        experts = [p for n, p in sharded.named_parameters() if ".experts." in n]
        held = sum(shards.lookup(p, k).numel() for p in experts for k in shards.keys_of(p)) / sum(p.numel() for p in experts)
        reference = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
        out.append((family, _compare_sharded(sharded, reference, layout), held))
    return out


def test_per_expert_checkpoints_load_per_rank(tmp_path):
    folders = {}
    for family in ("mixtral", "deepseek_v3", "aria_text"):  # Aria: saved as experts.fc1/fc2, stored (E, in, out)
        folders[family] = str(tmp_path / family)
        model(family).save_pretrained(folders[family])
    layouts = [dict(kvp=1, tpa=2, ep=2), dict(kvp=2, ep=1), dict(kvp=2, ep=1)]  # 2 whole experts per rank; every
    # expert split in two
    for per_rank in run_ranks(2, _load_and_compare, folders, layouts):
        for family, err, held in per_rank:
            print(f"{family}: from_pretrained shards max rel err {err:.2e}, holds {held:.0%} of the expert weights")
            assert err < 1e-5, family
            assert held == 0.5, family  # 1/N of every expert tensor, never loaded whole
