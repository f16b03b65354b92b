"""Placements of the plan pass: every weight row/column is owned exactly as the Helix math says.

The o_proj columns of rank r must be exactly the query heads r holds after the all-to-all (TensorRT-LLM's issue
#10350 was a wrong o_proj slice after this remap); the FFN shards must tile the intermediate dimension.
"""

import itertools

import pytest

from helix_compile import Layout
from helix_compile.passes.plan import Heads, role_shard
from helix_compile.shards import Shard

CASES = [(8, 4, 16), (9, 3, 64), (12, 4, 8), (16, 1, 8), (6, 6, 4)]  # (Q, K, head_dim)


def layouts(q, k):
    for n in (1, 2, 3, 4, 6, 8):
        for tpa in range(1, n + 1):
            if n % tpa == 0 and (k % tpa == 0 or tpa % k == 0) and q % tpa == 0 and q // tpa >= n // tpa:
                yield Layout(n // tpa, tpa)


@pytest.mark.parametrize("q,k,d", CASES)
def test_o_proj_columns_are_the_heads_after_the_all_to_all(q, k, d):
    heads = Heads(q, k, d)
    for layout in layouts(q, k):
        owned = []
        for rank in range(layout.world_size):
            shard = role_shard("o", "weight", (64, q * d), heads, layout, rank)
            assert shard.dim == 1 and shard.start % d == 0 and shard.stop % d == 0
            first, count = shard.start // d, (shard.stop - shard.start) // d
            # the heads this rank receives: chunk kvp_rank of its TPA slice (Layout.head_split)
            split = layout.head_split(q // layout.tpa)
            tpa_rank, kvp_rank = layout.tpa_rank(rank), layout.kvp_rank(rank)
            assert first == tpa_rank * (q // layout.tpa) + sum(split[:kvp_rank]) and count == split[kvp_rank]
            owned += range(first, first + count)
        assert sorted(owned) == list(range(q)), (layout, owned)  # every head exactly once


@pytest.mark.parametrize("q,k,d", CASES)
def test_qkv_rows_replicated_over_kvp_and_split_over_tpa(q, k, d):
    heads = Heads(q, k, d)
    for layout in layouts(q, k):
        for role, total in (("q", q * d), ("k", k * d), ("v", k * d)):
            by_tpa = {}
            for rank in range(layout.world_size):
                s = role_shard(role, "weight", (total, 64), heads, layout, rank)
                by_tpa.setdefault(layout.tpa_rank(rank), set()).add((s.start, s.stop))
            assert all(len(v) == 1 for v in by_tpa.values())  # the same rows across the KVP group
            rows = sorted(next(iter(v)) for v in by_tpa.values())
            assert rows[0][0] == 0 and rows[-1][1] == total
            if role != "q" and layout.tpa > k:  # TP baseline: each KV head on tpa/k consecutive TPA slices
                assert rows == [(h * d, (h + 1) * d) for h in range(k) for _ in range(layout.tpa // k)]
                for t in range(layout.tpa):  # and it is the head that slice's query heads read
                    (start, _), = by_tpa[t]
                    assert start // d == (t * (q // layout.tpa)) // (q // k)
                continue
            assert all(a[1] == b[0] for a, b in itertools.pairwise(rows))


def test_ffn_shards_tile_the_intermediate_dimension():
    heads, layout, inter = Heads(8, 4, 16), Layout(2, 2), 96
    ins = sorted((s.start, s.stop) for s in (role_shard("ffn_in", "weight", (inter, 64), heads, layout, r) for r in range(4)))
    outs = sorted((s.start, s.stop) for s in (role_shard("ffn_out", "weight", (64, inter), heads, layout, r) for r in range(4)))
    assert ins == outs == [(0, 24), (24, 48), (48, 72), (72, 96)]
    assert role_shard("ffn_out", "bias", (64,), heads, layout, 0) is None  # added once, after the all-reduce
    assert role_shard("o", "bias", (64,), heads, layout, 0) is None


def test_head_split():
    assert Layout(2).head_split(9) == [5, 4]
    assert Layout(4).head_split(8) == [2, 2, 2, 2]
    assert Layout(3).head_split(4) == [2, 1, 1]


@pytest.mark.parametrize("q,k,d", CASES)
def test_fused_qkv_pieces_are_the_separate_shards(q, k, d):
    """A fused [q; k; v] weight's share is exactly the q, k and v shards of the separate projections, and a
    Conv1D weight (stored (in, out)) gets the same share along its other dim."""
    heads = Heads(q, k, d)
    for layout in layouts(q, k):
        for rank in range(layout.world_size):
            fused = role_shard("qkv", "weight", ((q + 2 * k) * d, 64), heads, layout, rank)
            parts = [role_shard(r, "weight", None, heads, layout, rank) for r in ("q", "k", "v")]
            offsets = [0, q * d, (q + k) * d]
            assert fused.dim == 0 and fused.ranges == tuple((o + p.start, o + p.stop) for o, p in zip(offsets, parts))
            conv = role_shard("qkv", "weight_t", (64, (q + 2 * k) * d), heads, layout, rank)
            assert conv.dim == 1 and conv.ranges == fused.ranges
            assert role_shard("qkv", "bias", ((q + 2 * k) * d,), heads, layout, rank) == fused


def test_per_head_interleaved_qkv_and_gate_up():
    heads, layout = Heads(4, 4, 8), Layout(1, 2)
    # GPT-NeoX: rows [h*3D, (h+1)*3D) hold head h's q, k, v: the TPA slice of heads is one range
    assert [role_shard("qkv_heads", "weight", (96, 64), heads, layout, r) for r in range(2)] == [
        Shard(0, 0, 48), Shard(0, 48, 96)]
    # Phi-3 gate_up: [gate; up], each rank its columns of both halves
    pair = [role_shard("ffn_in_pair", "weight", (192, 64), heads, Layout(2, 2), r).ranges for r in range(4)]
    assert pair == [((0, 24), (96, 120)), ((24, 48), (120, 144)), ((48, 72), (144, 168)), ((72, 96), (168, 192))]
    assert role_shard("q_norm", "weight", (32,), heads, layout, 1) == Shard(0, 16, 32)  # over all heads (OLMo2)
    assert role_shard("q_norm", "weight", (8,), heads, layout, 1) is None  # per head (Qwen3): replicated


def test_checkpoint_names_map_to_the_same_roles():
    from helix_compile.passes.regions.roles import role_by_name

    # the name does not say whether a weight is stored (in, out): GPT-2's Conv1D c_attn is, GPT-BigCode's nn.Linear
    # c_attn is not; loading.stored_forms reads it from the module
    assert role_by_name("transformer.h.0.attn.c_attn.weight") == ("qkv", "weight")
    assert role_by_name("transformer.h.0.attn.c_proj.weight") == ("o", "weight")
    from helix_compile.loading import stored_forms
    from models import model

    assert "transformer.h.0.attn.c_attn.weight" in stored_forms(model("gpt2"))["transposed"]
    assert "transformer.h.0.attn.c_attn.weight" not in stored_forms(model("gpt_bigcode"))["transposed"]
    assert role_by_name("transformer.h.0.mlp.c_proj.bias") == ("ffn_out", "bias")
    assert role_by_name("model.layers.0.self_attn.qkv_proj.weight") == ("qkv", "weight")
    assert role_by_name("model.layers.0.mlp.gate_up_proj.weight") == ("ffn_in_pair", "weight")
    assert role_by_name("gpt_neox.layers.0.attention.query_key_value.weight") == ("qkv_heads", "weight")
    assert role_by_name("gpt_neox.layers.0.attention.dense.weight") == ("o", "weight")
    assert role_by_name("model.layers.0.input_layernorm.weight") == (None, "weight")
