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


# families whose checkpoints store a parameter in a form its name does not tell (loading.stored_forms,
# loading.checkpoint_splits), built as the coverage table builds them (tools/coverage.py), saved by transformers
FORMS = {
    "codegen": "qkv_proj rows [q v k] per group of heads",
    "falcon": "multi-query query_key_value [q_1..q_Q k v]",
    "gpt_bigcode": "c_attn, an nn.Linear under GPT-2's Conv1D name",
    "moshi": "fc1 holding [gate; up]",
    "hrm_text": "gqkv_proj and gate_up_proj, which transformers chunks into gate/q/k/v and gate/up",
    "sarvam_moe": "query_key_value, which transformers splits into q/k/v_proj",
    "granitemoe": "block_sparse_moe kept as the module's own name",
    "llama4_text": "experts stored (E, in, out) with no is_transposed flag",
    "gemma4_text": "k_norm of full-attention layers with one KV head: per head and over all heads alike",
}


def _coverage_tool():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("coverage_tool", Path(__file__).parents[1] / "tools" / "coverage.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _forms_exact(rank, folders):
    from helix_compile.testing import compare

    cov = _coverage_tool()
    out = {}
    for family, folder in folders.items():
        reference, _ = cov.build(family)
        text = reference.config.get_text_config(decoder=True)
        ids = torch.randint(3, text.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
        for fields in (dict(kvp=2, tpa=1), dict(kvp=1, tpa=2)):
            torch._dynamo.reset()
            layout = Layout(kv_block=4, **fields)
            sharded = helix_compile.from_pretrained(folder, layout, dtype=torch.float32)
            r = compare(sharded, layout, ids, 4, 12, reference=reference)
            out[f"{family} {layout.key()}"] = (r.max_rel_err, r.tokens_equal)
    return out


def test_forms_the_names_do_not_tell(tmp_path):
    """Each family of ``FORMS`` saved with save_pretrained, loaded per rank with kvp = 2 and tpa = 2: exact against
    transformers (read by its names alone, each would be refused by the runtime's shard check or lack parameters)."""
    cov = _coverage_tool()
    folders = {}
    for family in FORMS:
        folders[family] = str(tmp_path / family)
        cov.build(family)[0].save_pretrained(folders[family])
    results = run_ranks(2, _forms_exact, folders)
    assert results[0] == results[1]
    for case, (err, tokens_equal) in results[0].items():
        print(f"{case}: max rel err {err:.1e}")
        assert tokens_equal and err < 1e-5, case
