"""Every layout matches the single-device transformers model: real gloo ranks, prefill + 41 decode steps.

kv_block=4 and 48 positions make 12 KV blocks, so every KVP rank (up to 4) owns several blocks and the decode
steps cross block boundaries on every rank. Logits within 1e-5 relative; greedy tokens identical; the logits
identical on every rank.
"""

import os

import pytest
import torch

from helix_compile import Layout
from helix_compile.testing import compare
from distributed import run_ranks
from models import CALL, model, prompt, runs_here

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

STEPS, MAX_LEN, KV_BLOCK = 41, 50, 4


def splits(world: int, max_tpa: int):
    return [(world // t, t) for t in (1, 2, 4) if world % t == 0 and t <= min(world, max_tpa)]


def _body(rank, family, layouts, attn, executor, extra, hopb, batch):
    reports = []
    for kvp, tpa in layouts:
        torch._dynamo.reset()
        m = model(family, attn=attn, **extra)
        layout = Layout(kvp, tpa, kv_block=KV_BLOCK, hopb_chunks=hopb)
        reports.append(compare(m, layout, prompt(batch=batch), STEPS, MAX_LEN, executor=executor,
                               call=CALL.get(family, "bare")))
    return reports


def check(world, family, layouts, attn=None, executor="eager", hopb=1, batch=2, **extra):
    per_rank = run_ranks(world, _body, family, layouts, attn, executor, extra, hopb, batch)
    for i, (kvp, tpa) in enumerate(layouts):
        r0 = per_rank[0][i]
        print(f"{family} world={world} kvp={kvp} tpa={tpa} hopb={hopb} {attn}/{executor}: max rel err {r0.max_rel_err:.2e}, "
              f"cache bytes/rank {r0.cache_bytes} (transformers {r0.reference_cache_bytes})")
        assert r0.max_rel_err < 1e-5, (kvp, tpa, r0.max_rel_err)
        assert r0.tokens_equal, (r0.tokens, r0.reference_tokens)
        for r in per_rank[1:]:
            assert r[i].logits == r0.logits, "ranks disagree"
            assert r[i].tokens == r0.tokens


@pytest.mark.parametrize("world", [1, 2, 4])
def test_llama_gqa(world):
    check(world, "llama", splits(world, 4))


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.skipif(
    os.environ.get("HELIX_FULL_MATRIX") != "1", reason="4 ranks of three more families: HELIX_FULL_MATRIX=1"))])
def test_families(world):
    """Qwen2 (q/k/v biases), Mistral and Phi (partial rotary, GELU MLP) on every layout of 2 ranks, in one spawn;
    on 4 ranks with ``HELIX_FULL_MATRIX=1`` (CI time: about 70 s each; test_llama_gqa and test_mqa run every
    4-rank layout in CI)."""
    check_families(world, [(f, splits(world, 4)) for f in ("qwen2", "mistral", "phi")])


@pytest.mark.parametrize("world", [2, 4])
def test_mqa(world):
    """Helix (kvp = N) and the tensor-parallel baseline tpa = N > K = 1 (vLLM/SGLang TP: every rank stores the
    one KV head); on 4 ranks also kvp=2 x tpa=2, where each KVP group shards its duplicate of the head."""
    check(world, "mqa", splits(world, 1) + [(1, world)] + ([(2, 2)] if world == 4 else []))


def test_tensor_parallel_baseline_gqa():
    """Q=8, K=2, tpa=4: ranks 0,1 store KV head 0 and ranks 2,3 KV head 1, two query heads each."""
    check(4, "llama", [(1, 4)], num_key_value_heads=2)


@pytest.mark.parametrize("family", ["qwen3", "gemma", "olmo", "granite"])
def test_more_families(family):
    check(2, family, splits(2, 1 if family == "gemma" else 2))


def _families_body(rank, cases, batch):
    out = []
    for family, layouts in cases:
        out.append((family, _body(rank, family, layouts, None, "eager", {}, 1, batch)))
    return out


def check_families(world, cases, batch=2):
    """``check`` for several families in one set of ranks (one spawn: CI time)."""
    cases = [case for case in cases if runs_here(case[0])]
    per_rank = run_ranks(world, _families_body, cases, batch)
    for (family, layouts), *others in zip(cases, *(r for r in per_rank[1:])):
        reports = per_rank[0][[c[0] for c in cases].index(family)][1]
        for i, (kvp, tpa) in enumerate(layouts):
            r0 = reports[i]
            print(f"{family} world={world} kvp={kvp} tpa={tpa}: max rel err {r0.max_rel_err:.2e}")
            assert r0.max_rel_err < 1e-5, (family, kvp, tpa, r0.max_rel_err)
            assert r0.tokens_equal, (family, r0.tokens, r0.reference_tokens)
            for other in others:
                assert other[1][i].logits == r0.logits and other[1][i].tokens == r0.tokens, f"{family}: ranks disagree"


def test_fused_windowed_softcapped_families():
    """Conv1D and fused q|k|v / per-head [q k v] / gate|up projections, partial RoPE, soft-capping (Gemma 2,
    eager), sliding windows shorter than the 48 positions (Mistral, Qwen2, Gemma 2/3 hybrids), MLP dropout after
    the down projection (GPT-2); every 2-rank layout. And a BERT-style post-norm layer used as a causal LM (its
    FFN split over the sibling intermediate/output modules), on kvp=2 only (CI time); Moshi's gate|up cut by
    view(B, L, 2, -1) and x[..., k, :], on tpa=2 only (about 4 s)."""
    families = ["gpt2", "phi3", "gpt_neox", "gemma2", "gemma3", "mistral_window", "qwen2_window"]
    check_families(2, [(f, splits(2, 1 if f == "gemma3" else 2)) for f in families] + [("bert", [(2, 1)]),
                                                                                        ("moshi", [(1, 2)])])


def test_fused_and_cross_head_norm_on_four_ranks():
    """kvp=2 x tpa=2: Phi-3's fused projections sliced per TPA rank; OLMo2's q/k norms over all heads, exact by
    an all-reduce of the partial sums of squares over the TPA group."""
    check_families(4, [("phi3", [(2, 2)]), ("olmo2", [(2, 2)])])


def test_gated_attention_sinks_and_uneven_mqa_split():
    """CI's cheap cases of regions/heads.py and sinks.py: Laguna's per-head output gate, its rows sharded like
    o_proj's columns after the all-to-all (kvp=2); Flint's attention sinks folded into one partial per KVP group
    (kvp=2); GPT-BigCode's MQA c_attn cut unevenly into q|k|v, its one KV head duplicated (tpa=2). And the KV shapes
    that are not the config's num_key_value_heads x head_dim (layout.attention_shape): Falcon's multi-query cache
    (tpa=2: its query_key_value cut by head index, the one KV head duplicated); MiMo-V2-Flash's values narrower than
    the keys, exchanged and merged at their own width, with sinks and twice the KV heads in its sliding layer
    (kvp=2). And the families that read cache.get_seq_length() as a Python int (cache.HOST_LENGTH), about 4 s
    each: TrOCR's positions (kvp=2); MPT's ALiBi added to eager matmul scores then masked_fill-ed (tpa=2: each rank
    the slopes of its heads); GIT as a text-only LM (its mask built with zeros_like(embeddings); kvp=2). DiffLLaMA:
    two attention calls over halves of the cached value heads, combined across query heads h and h + 4 (heads in
    parts: layout._HEAD_PARTS), on both layouts. RoFormer: sinusoidal positions from the host length, rotated by
    an interleaved rotate-half within each head (regions/rope.py), on the local heads of each TPA rank (tpa=2)."""
    check_families(2, [("laguna", [(2, 1)]), ("flint", [(2, 1)]), ("gpt_bigcode", [(1, 2)]), ("falcon", [(1, 2)]),
                       ("mimo", [(2, 1)]), ("trocr", [(2, 1)]), ("mpt", [(1, 2)]), ("git", [(2, 1)]),
                       ("diffllama", [(2, 1), (1, 2)]), ("roformer", [(1, 2)])])


@pytest.mark.skipif(os.environ.get("HELIX_FULL_MATRIX") != "1", reason="full layout matrix: HELIX_FULL_MATRIX=1")
@pytest.mark.parametrize("world", [2, 4])
def test_gated_and_head_view_families(world):
    """What lies between the projections and attention and between attention and o_proj (regions/heads.py):
    output gates per head (Laguna) and per feature; BitNet's RMSNorms over all heads' and all intermediate
    features (all-reduced over the world); GPT-BigCode's MQA c_attn cut unevenly q|k|v; views naming the head
    count (StableLM); CodeGen's qkv interleaved [q v k] per group of 2 heads; attention sinks in both forms
    (Flint, GraniteSWA; sinks.py); Falcon's multi-query and Falcon-40B's per-group query_key_value; MiMo-V2-Flash's
    narrower values; GPT-Neo's where-masked eager scores (where_mask.py). Every layout of 2 ranks; kvp=2 x tpa=2 on
    4."""
    families = ["laguna", "laguna_elem", "bitnet", "gpt_bigcode", "stablelm", "codegen", "flint", "granite_swa",
                "falcon", "falcon_40b", "mimo", "gpt_neo"]
    check_families(world, [(f, splits(2, 2) if world == 2 else [(2, 2)]) for f in families])


@pytest.mark.skipif(os.environ.get("HELIX_FULL_MATRIX") != "1", reason="heavier families: HELIX_FULL_MATRIX=1")
def test_kv_shared_layers_and_per_layer_shapes():
    """Gemma 3n and Gemma 4: layers that read an earlier layer's cache (each rank reads the writer's shard), a
    std over all intermediate features (all-reduced), and full-attention layers of another head_dim (Gemma 4).
    Opt-in (4 layers, per-layer inputs, AltUp: the heaviest tiny models); tests/passes/test_regions.py checks
    their structure in CI, tools/coverage.py their numerics."""
    check_families(2, [("gemma3n", [(2, 1), (1, 2)]), ("gemma4", [(2, 1), (1, 2)])])


@pytest.mark.skipif(os.environ.get("HELIX_FULL_MATRIX") != "1", reason="full layout matrix: HELIX_FULL_MATRIX=1")
def test_diffllama_heads_in_parts_on_four_ranks():
    """DiffLLaMA on 4 ranks (about 13 s a layout; CI checks its 2-rank layouts, and the kvp=2 x tpa=2 graph in
    tests/passes/test_regions.py and the golden fixture): kvp=2 x tpa=2 (each rank holds the same block of each
    part, so the pairs h, h + 4 stay on one rank), also with eager attention and with HOP-B (the exchange's reorder
    copied per batch chunk); with 8 KV heads kvp=4 (each KVP rank receives one block of each part) and tpa=4 (one
    query and one KV head of each part per TPA rank); and Inductor's executor on 2 ranks, kvp=2 (about 30 s)."""
    check(2, "diffllama", [(2, 1)], executor="inductor")
    check(4, "diffllama", [(2, 2)])
    check(4, "diffllama", [(2, 2)], attn="eager")
    check(4, "diffllama", [(2, 2)], hopb=2)
    check(4, "diffllama", [(4, 1), (1, 4)], num_key_value_heads=8)


def test_eager_attention_form():
    check(2, "llama", [(2, 1), (1, 2)], attn="eager")


def test_uneven_query_heads():
    """9 query heads / 3 KV heads (SmolLM2's shape) on kvp=2: ranks hold 5 and 4 heads after the all-to-all."""
    check(2, "llama", [(2, 1)], num_attention_heads=9, num_key_value_heads=3, hidden_size=72, head_dim=8)


def test_inductor():
    """Inductor's executor on tpa=2 (kvp=2 under Inductor: test_hopb_inductor, test_prompt_lengths_vary)."""
    check(2, "llama", [(1, 2)], executor="inductor")


def test_hopb():
    """HOP-B: batch 4 in 2 chunks, exchange of chunk 0 overlapping chunk 1's attention; still exact."""
    check(4, "llama", [(4, 1), (2, 2)], hopb=2, batch=4)


def test_hopb_inductor():
    check(2, "llama", [(2, 1)], executor="inductor", hopb=2, batch=4)


def _lengths_body(rank, lengths, executor, family="llama", layout=(2, 1)):
    import torch._inductor.compile_fx as inductor
    from transformers import StaticCache as HFStaticCache

    from helix_compile import StaticCache

    compiles, original = [], inductor.compile_fx
    inductor.compile_fx = lambda *a, **k: compiles.append(1) or original(*a, **k)
    m, layout = model(family), Layout(*layout, kv_block=4)
    compiled = torch.compile(m, backend="helix", options={"layout": layout, "executor": executor}, fullgraph=True)
    worst, counts = 0.0, []
    try:
        with torch.no_grad():
            for length in lengths:  # a new generation per prompt length: Dynamo recompiles with a symbolic length
                cache, ref_cache = StaticCache(m.config, 2, 32, layout), HFStaticCache(m.config, max_cache_len=32)
                ids = prompt(length=length, seed=length)
                for _ in range(6):
                    out = compiled(input_ids=ids, past_key_values=cache).logits[:, -1]
                    ref = m(input_ids=ids, past_key_values=ref_cache).logits[:, -1]
                    worst = max(worst, ((out - ref).abs().max() / ref.abs().max()).item())
                    assert torch.equal(out.argmax(-1), ref.argmax(-1))
                    ids = ref.argmax(-1, keepdim=True)
                counts.append(len(compiles))
    finally:
        inductor.compile_fx = original
    return worst, counts


@pytest.mark.parametrize("executor,lengths", [("eager", [7, 5, 9, 3]), ("inductor", [7, 5, 9, 3])])
def test_prompt_lengths_vary(executor, lengths):
    """Several generations with different prompt lengths on kvp=2: after the second length Dynamo's prefill graph
    has a symbolic length, and Inductor compiled it once, symbolically: later lengths compile nothing."""
    for worst, counts in run_ranks(2, _lengths_body, lengths, executor):
        assert worst < 1e-5, worst
        if executor == "inductor":
            assert counts[1] > counts[0] > 0 and counts[-1] == counts[1], counts


@pytest.mark.skipif(os.environ.get("HELIX_FULL_MATRIX") != "1", reason="full layout matrix: HELIX_FULL_MATRIX=1")
@pytest.mark.parametrize("family", ["gpt_neo", "diffllama"])
@pytest.mark.parametrize("layout", [(2, 1), (1, 2)])
def test_prompt_lengths_vary_symbolic_head_views(family, layout):
    """GPT-Neo sizes its head split / merge views as x.size()[:-1] + (H, D): once the length is symbolic Dynamo
    records view(x, torch.Size([...])), whose head count helix rewrites like a tuple's (heads.py). DiffLLaMA cuts
    its attention output's heads into parts (heads.HeadCut) whose other sizes are then symbolic."""
    for worst, _ in run_ranks(2, _lengths_body, [7, 5, 9, 3], "eager", family, layout):
        assert worst < 1e-5, worst


def _auto_body(rank):
    report = compare(model("llama"), "auto", prompt(), 12, MAX_LEN)
    return report.layout, report.max_rel_err, report.tokens_equal


def test_auto_layout_from_planner():
    """layout="auto" (cache and backend): the planner picks a valid layout for 2 ranks, and it is exact."""
    for key, err, same in run_ranks(2, _auto_body):
        print("planner chose", key)
        assert key.startswith(("kvp2-tpa1", "kvp1-tpa2")) and err < 1e-5 and same


@pytest.mark.tf_low
def test_transformers_range_families():
    """The families CI checks at both ends of transformers' range (.ci/run runs the ``tf_low`` tests under
    transformers 5.17 too), in one spawn of 2 ranks: dense GQA (Llama), MoE (Mixtral, TP over the experts), MLA
    with MoE (DeepSeek-V3, kvp=2), fused projections (Phi-3's qkv_proj / gate_up_proj, GPT-2's Conv1D c_attn),
    ALiBi (MPT, with the host length), learned positions from the host length (TrOCR), chunked attention (Llama 4),
    Moshi (called as generate calls it: before 5.24 transformers builds its causal mask only from the
    attention_mask). The families helix refuses on the installed version (cache.NEEDS_TRANSFORMERS: BLOOM, Aria,
    RoFormer before 5.24) must be refused by StaticCache naming the version, and run exactly otherwise."""
    check_families(2, [("llama", [(2, 1)]), ("mixtral", [(1, 2)]), ("deepseek_v3", [(2, 1)]), ("phi3", [(1, 2)]),
                       ("gpt2", [(2, 1)]), ("mpt", [(1, 2)]), ("trocr", [(2, 1)]), ("llama4_text", [(2, 1)]),
                       ("moshi", [(1, 2)]), ("bloom", [(1, 2)]), ("aria_text", [(2, 1)]), ("roformer", [(1, 2)])])
