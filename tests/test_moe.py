"""Mixture-of-experts FFNs as TPF x EP: exact against single-device transformers on real gloo ranks.

Families: Mixtral, Qwen2-MoE (shared expert and its sigmoid gate), Qwen3-MoE, OLMoE (q/k norms over all heads),
Aria (experts stored transposed), Llama 4 (dense experts: every token through every expert), GLM-4-MoE (a dense
first layer), HunYuan-MoE (shared_mlp), MiniMax-M3 (a custom elementwise gate), experts with biases, gpt-oss
(interleaved gate_up rows, biases, router bias; attention sinks), DeepSeek (in test_mla.py); transformers'
grouped_mm (default) and
batched_mm experts implementations. CI runs a
representative subset of layouts (ep > 1 in most); ``HELIX_FULL_MATRIX=1`` runs every valid layout of 2 and 4 ranks.
"""

import itertools
import os

import pytest
import torch

from distributed import run_ranks
from helix_compile import Layout
from helix_compile.passes.regions.moe import expert_shard
from layouts import check, valid_layouts
from models import OLD_TRANSFORMERS, config
from models import model as model_of

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "aria_text", "glm4_moe", "hunyuan_v1_moe", "minimax_m3",
            "mixtral_bias", "llama4_text", "gpt_oss"]


@pytest.mark.tf_low
def test_moe_two_ranks():
    check(2, [
        ("mixtral", dict(kvp=2, ep=2), None),  # tpf=1: each rank holds 2 whole experts
        ("qwen2_moe", dict(kvp=1, tpa=2, ep=2), None),
        ("qwen3_moe", dict(kvp=2, ep=1), "batched_mm"),  # tpf=2: every expert split in two
        ("olmoe", dict(kvp=2, ep=2), None),
        ("aria_text", dict(kvp=2, ep=2), None),  # experts stored transposed (E, in, out)
        ("llama4_text", dict(kvp=2, ep=2), None),  # dense experts (every token through each), chunked attention
        # expert biases, tpf=2: the down bias added on one rank, over gpt-oss's interleaved [g0 u0 ...] gate_up rows,
        # router bias, attention sinks over kvp=2, sliding + full layers (mixtral_bias: the same biases over [gate |
        # up] halves, in the full matrix)
        ("gpt_oss", dict(kvp=2, ep=1), None),
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
                # interleaved rows [g0 u0 g1 u1 ...] (gpt-oss): one range per rank, (gate, up) pairs of its features
                pieces = [expert_shard(role, shape, layout, r, "weight_interleaved").take(ids) for r in range(world)]
                seen = torch.cat([p.flatten() for p in pieces])
                assert torch.equal(seen.sort().values, ids.flatten()), (world, ep, "interleaved")
                for r, piece in enumerate(pieces):  # the rank's features, each row pair (gate, up) whole
                    per, e0 = 16 // layout.tpf, layout.ep_rank(r) * (8 // ep)
                    rows = slice(2 * layout.tpf_rank(r) * per, 2 * (layout.tpf_rank(r) + 1) * per)
                    assert torch.equal(piece, ids[e0 : e0 + 8 // ep, rows]), (world, ep, r)
                    assert torch.equal(piece[:, 1::2] - piece[:, ::2], torch.full_like(piece[:, ::2], 4))


def test_layout_rules_for_moe():
    mixtral = config("mixtral")
    assert {(l["tpa"], l["ep"]) for l in valid_layouts("mixtral", 4)} == set(itertools.product((1, 2, 4), (1, 2, 4)))
    with pytest.raises(ValueError, match=r"ep=3 does not divide the 4 routed experts of MixtralConfig"):
        Layout(kvp=3, ep=3).validate(mixtral)
    with pytest.raises(ValueError, match=r"tpf=4 does not divide the expert intermediate size 30"):
        Layout(kvp=4).validate(config("mixtral", intermediate_size=30))
    with pytest.raises(ValueError, match=r"ep=2 needs a mixture-of-experts FFN; LlamaConfig has a dense FFN"):
        Layout(kvp=2, ep=2).validate(config("llama"))



def _compile_one_rank(m):
    from helix_compile import StaticCache

    cache = StaticCache(m.config, 2, 16, Layout(1))
    compiled = torch.compile(m, backend="helix", options={"layout": Layout(1), "executor": "eager"}, fullgraph=True)
    return lambda: compiled(input_ids=torch.zeros((2, 3), dtype=torch.long), past_key_values=cache)


def _post_expert_norm(experts):  # transformers' has_post_expert_norm=True experts (Muse Spark): a norm over H
    experts.has_post_expert_norm = True
    experts.post_expert_norm = torch.nn.LayerNorm(experts.down_proj.shape[1], elementwise_affine=False)


def _sliced_gate(experts):  # [gate | up] cut by slices at the global width I: wrong on a rank's 2*I/tpf columns
    inter = experts.down_proj.shape[-1]
    experts._apply_gate = lambda gate_up: torch.nn.functional.silu(gate_up[..., :inter]) * gate_up[..., inter:]


@pytest.mark.parametrize("change,message", [
    pytest.param(_post_expert_norm, r"mlp.experts: node '.*' .* follows the down projection but is not linear in it",
                 marks=pytest.mark.skipif(OLD_TRANSFORMERS, reason="experts read has_post_expert_norm from 5.24")),
    (_sliced_gate, r"mlp.experts: node '.*' .* acts on the experts' intermediate features across columns"),
])
def test_experts_refused_by_name(change, message):
    """Experts whose ops cannot be split exactly over tpf are refused naming the node, never run replicated."""
    torch._dynamo.reset()
    m = model_of("mixtral")
    for layer in m.model.layers:
        change(layer.mlp.experts)
    with pytest.raises(Exception, match=message):
        _compile_one_rank(m)()


def test_mixture_of_attention_refused_by_name():
    """JetMoE's routed query / output projections inside the attention are refused as what they are."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch._dynamo.reset()
    cfg = AutoConfig.for_model("jetmoe", vocab_size=97, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                               num_key_value_heads=2, kv_channels=16, num_local_experts=4, num_experts_per_tok=2,
                               intermediate_size=32, max_position_embeddings=64)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(Exception, match=r"model.layers.0.self_attention: routed experts inside the attention module"):
        _compile_one_rank(m)()


def test_prompt_lengths_vary():
    """Generations with different prompt lengths (kvp=2): after the second length Dynamo's graph takes the length
    as a SymInt placeholder, which the MoE matcher must not take for an expert parameter; still exact."""
    from test_exactness import _lengths_body

    for worst, _ in run_ranks(2, _lengths_body, [7, 5, 9], "eager", "mixtral"):
        assert worst < 1e-5, worst
