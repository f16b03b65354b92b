"""Mixture-of-experts FFNs as TPF x EP: exact against single-device transformers on real gloo ranks.

Families: Mixtral, Qwen2-MoE (shared expert and its sigmoid gate), Qwen3-MoE, OLMoE (q/k norms over all heads),
DeepSeek (in test_mla.py); transformers' grouped_mm (default) and batched_mm experts implementations. CI runs a
representative subset of layouts (ep > 1 in most); ``HELIX_FULL_MATRIX=1`` runs every valid layout of 2 and 4 ranks.
"""

import itertools
import os

import pytest
import torch

from helix_compile import Layout
from helix_compile.passes.regions.moe import expert_shard
from layouts import check, valid_layouts
from models import config
from models import model as model_of

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


def test_moe_two_ranks():
    check(2, [
        ("mixtral", dict(kvp=2, ep=2), None),  # tpf=1: each rank holds 2 whole experts
        ("qwen2_moe", dict(kvp=1, tpa=2, ep=2), None),
        ("qwen3_moe", dict(kvp=2, ep=1), "batched_mm"),  # tpf=2: every expert split in two
        ("olmoe", dict(kvp=2, ep=2), None),
    ])


# 4 ranks: test_mla.test_mla_and_moe_four_ranks (Mixtral tpf=2 x ep=2 with DeepSeek-V3, one spawn for both)


FULL = [(f, w, fields) for f in FAMILIES for w in (2, 4) for fields in valid_layouts(f, w)]


@pytest.mark.skipif(os.environ.get("HELIX_FULL_MATRIX") != "1", reason="full layout matrix: HELIX_FULL_MATRIX=1")
@pytest.mark.parametrize("family,world", sorted({(f, w) for f, w, _ in FULL}))
@pytest.mark.parametrize("experts", [None, "batched_mm"])
def test_moe_every_layout(family, world, experts):
    check(world, [(family, fields, experts) for f, w, fields in FULL if (f, w) == (family, world)])


@pytest.mark.parametrize("world", [2, 4, 8])
def test_expert_shards_tile_the_experts(world):
    """Over every (tpf, ep) of the world, the ranks' expert pieces cover each weight element exactly once."""
    for ep in (e for e in (1, 2, 4, 8) if world % e == 0):
        layout = Layout(kvp=world, ep=ep)
        for role, shape in (("experts_gate_up", (8, 2 * 16, 4)), ("experts_down", (8, 4, 16))):
            ids = torch.arange(torch.Size(shape).numel()).reshape(shape)
            seen = torch.cat([expert_shard(role, shape, layout, r).take(ids).flatten() for r in range(world)])
            assert torch.equal(seen.sort().values, ids.flatten()), (world, ep, role)
            if role == "experts_gate_up":  # a rank's rows are the same columns of the gate and the up half
                piece = expert_shard(role, shape, layout, world - 1).take(ids)
                gate, up = piece.chunk(2, dim=1)
                assert torch.equal(up - gate, torch.full_like(gate, 16 * 4))


def test_layout_rules_for_moe():
    mixtral = config("mixtral")
    assert {(l["tpa"], l["ep"]) for l in valid_layouts("mixtral", 4)} == set(itertools.product((1, 2, 4), (1, 2, 4)))
    with pytest.raises(ValueError, match=r"ep=3 does not divide the 4 routed experts of MixtralConfig"):
        Layout(kvp=3, ep=3).validate(mixtral)
    with pytest.raises(ValueError, match=r"tpf=4 does not divide the expert intermediate size 30"):
        Layout(kvp=4).validate(config("mixtral", intermediate_size=30))
    with pytest.raises(ValueError, match=r"ep=2 needs a mixture-of-experts FFN; LlamaConfig has a dense FFN"):
        Layout(kvp=2, ep=2).validate(config("llama"))



def test_experts_with_biases_refused_by_name():
    """Experts with biases (gpt-oss's layout) are refused naming the parameter, never run replicated or as dense."""
    from helix_compile import StaticCache

    torch._dynamo.reset()
    m = model_of("mixtral")
    for layer in m.model.layers:  # what transformers' has_bias=True experts hold
        experts = layer.mlp.experts
        experts.has_bias = True
        experts.gate_up_proj_bias = torch.nn.Parameter(torch.zeros(experts.gate_up_proj.shape[:2]))
        experts.down_proj_bias = torch.nn.Parameter(torch.zeros(experts.down_proj.shape[:2]))
    cache = StaticCache(m.config, 2, 16, Layout(1))
    compiled = torch.compile(m, backend="helix", options={"layout": Layout(1), "executor": "eager"}, fullgraph=True)
    with pytest.raises(Exception, match=r"mlp.experts: parameter '.*_proj_bias_' is not one of the fused "
                                        r"gate_up_proj / down_proj weights"):
        compiled(input_ids=torch.zeros((2, 3), dtype=torch.long), past_key_values=cache)
