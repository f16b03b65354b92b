"""Region matchers: what detect finds and what the plan reports, on the decode graph of rank 1 of 4 (fake group)."""

import operator

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from helix_compile import Layout, StaticCache
from helix_compile.backend import run_passes
from helix_compile.graph_text import graph_text
from models import model, prompt

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def fake_world():
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=4)
    yield
    dist.destroy_process_group()


def passes(m, layout=Layout(2, 2, kv_block=4)):
    torch._dynamo.reset()
    cache, seen = StaticCache(m.config, 2, 32, layout), []

    def backend(gm, example_inputs, **_):
        seen.append(run_passes(gm, example_inputs, layout))
        return lambda *args: [torch.zeros(()) for _ in gm.graph.output_node().args[0]]

    torch.compile(m, backend=backend, fullgraph=True)(input_ids=prompt(length=5), past_key_values=cache)
    return seen[-1]


def test_projection_no_matcher_claims_is_reported(fake_world):
    """An extra projection inside a decoder layer stays whole: a warning and plan.json's 'whole', with its bytes."""
    m = model("llama")
    norm = m.model.layers[0].input_layernorm
    m.model.layers[0].input_layernorm = torch.nn.Sequential(norm, torch.nn.Linear(64, 64))
    with pytest.warns(UserWarning, match=r"helix leaves model.layers.0.input_layernorm whole: .* 16640 bytes on every rank"):
        done = passes(m)
    assert done.plan.whole == {"model.layers.0.input_layernorm": (64 * 64 + 64) * 4}
    assert '"whole"' in done.plan.to_json()
    assert "whole model.layers.0.input_layernorm" in done.regions.describe()


def test_mlp_dropout_after_down_projection(fake_world):
    """GPT-2's MLP ends in a dropout inside the module: the out projection is found by dataflow, not by being the
    module's last op."""
    done = passes(model("gpt2"))
    ffn = done.regions.ffn
    assert [f.module for f in ffn] == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    assert all(len(f.ins) == 1 and f.out.transposed for f in ffn)  # Conv1D c_fc -> c_proj


def test_cross_head_norm_found_and_all_reduced_over_tpa(fake_world):
    done = passes(model("olmo2"))
    norms = [n.role for a in done.regions.attention for n in a.norms]
    assert norms == ["q_norm", "k_norm"] * 2
    reduces = [n for n in done.stages["partition"].graph.nodes if "all_reduce" in str(n.target)]
    assert len(reduces) == 2 * 2 + 2 * 2  # o_proj and down_proj, plus the q and k norms, of 2 layers
    tpa_group = Layout(2, 2).tpa_group_name()
    assert sum(n.args[2] == tpa_group for n in reduces) == 4
    roles = done.plan.roles
    assert sorted(v for v in roles.values() if "norm" in v) == ["k_norm.weight"] * 2 + ["q_norm.weight"] * 2


def test_interleaved_rope_is_per_head(fake_world):
    """GLM's RoPE interleaves pairs (cos/sin repeat_interleave'd inside the attention module, stack + flatten on
    q and k): the ops on cos/sin carry no heads, the ones on q and k stay within a head."""
    done = passes(model("glm"))
    assert len(done.regions.attention) == 2 and not done.regions.whole


def test_bert_style_ffn_pair_is_one_region(fake_world):
    """BERT's FFN is two sibling modules, ``layer.N.intermediate`` (in) and ``layer.N.output`` (out, then dropout
    and LayerNorm of the residual sum): one dense FFN region, TP over all ranks; ``attention.output.dense`` is the
    attention's o projection, not an FFN; nothing stays whole."""
    done = passes(model("bert"))
    ffn = done.regions.ffn
    assert [f.module for f in ffn] == [f"bert.encoder.layer.{i}.intermediate+output" for i in range(2)]
    assert all(len(f.ins) == 1 and "intermediate" in f.ins[0].weight.name and "output" in f.out.weight.name
               for f in ffn)
    assert all("attention_modules_output" in a.o.weight.name for a in done.regions.attention)
    assert done.regions.whole == [] and done.plan.whole == {}
    roles = sorted(v for v in done.plan.roles.values() if v.startswith("ffn"))
    assert roles == sorted(["ffn_in.bias", "ffn_in.weight", "ffn_out.bias", "ffn_out.weight"] * 2)


def test_constant_width_head_merge_becomes_local(fake_world):
    """MegatronBERT's eager attention merges heads with view(B, L, all_head_size): after the exchange rank 1 of
    kvp=2 x tpa=2 holds one of the 4 heads, so that view must ask for 16 features, not 64. (Called as generate
    calls it: its embeddings cannot be traced from input_ids alone over a static cache.)"""
    torch._dynamo.reset()
    layout, seen = Layout(2, 2, kv_block=4), []
    m = model("megatron_bert")
    cache = StaticCache(m.config, 2, 32, layout)

    def backend(gm, example_inputs, **_):
        seen.append(run_passes(gm, example_inputs, layout))
        return lambda *args: [torch.zeros(()) for _ in gm.graph.output_node().args[0]]

    ids = prompt(length=5)
    torch.compile(m, backend=backend, fullgraph=True)(
        input_ids=ids, past_key_values=cache, attention_mask=torch.ones_like(ids),
        position_ids=torch.arange(5)[None].expand(2, 5))
    done = seen[-1]
    views = [v.node for a in done.regions.attention for v in a.output.views]
    assert len(views) == 2 and all(v.args[-1] == 64 or v.args[1][-1] == 64 for v in views)
    local = {n.name: n for n in done.stages["partition"].graph.nodes}
    for v in views:
        node = local[v.name]
        sizes = node.args[1] if len(node.args) == 2 else node.args[1:]
        assert sizes[-1] == 16, node.format_node()
    assert [f.module for f in done.regions.ffn] == [f"bert.encoder.layer.{i}.intermediate+output" for i in range(2)]


def test_norms_over_all_heads_and_intermediate_features_all_reduced_over_world(fake_world):
    """BitNet: attn_sub_norm (over all heads' features, between attention and o_proj) and ffn_sub_norm (over all
    intermediate features, between the ins and down_proj): after the all-to-all / in the TP FFN every rank holds a
    disjoint part of those features, so each norm's mean is an all-reduce over the world; the norm weights are
    sharded like o_proj's columns / the ins' rows."""
    done = passes(model("bitnet"))
    assert all(len(a.output.norms) == 1 and len(a.output.weights) == 1 for a in done.regions.attention)
    assert all(len(f.stats) == 1 and f.stats[0].kind == "mean" and len(f.norm_weights) == 1 for f in done.regions.ffn)
    reduces = [n for n in done.stages["partition"].graph.nodes if "all_reduce" in str(n.target)]
    assert len(reduces) == 2 * 4  # per layer: o_proj, attn_sub_norm's mean, ffn_sub_norm's mean, down_proj
    assert len({n.args[2] for n in reduces}) == 1  # all over the world group (o_proj's)
    roles = set(done.plan.roles.values())
    assert {"o_norm.weight", "ffn_in.weight"} <= roles


def test_output_gate_sharded_like_o_columns(fake_world):
    """Laguna's per-head gate g_proj (8 rows, one per head): rank 1 (kvp_rank 0, tpa_rank 1) holds heads 4 and 5
    after the all-to-all, so o_proj's columns 32:48 and g_proj's rows 4:6."""
    done = passes(model("laguna"))
    gates = [g for a in done.regions.attention for g in a.output.gates]
    assert len(gates) == 2
    shards = {name: spec for name, spec in done.plan.inputs.items() if "g_proj" in name or "o_proj" in name}
    assert {(s.start, s.stop) for n, s in shards.items() if "g_proj" in n} == {(4, 6)}
    assert {(s.start, s.stop) for n, s in shards.items() if "o_proj" in n} == {(32, 48)}


def _count(gm, name):
    return sum(1 for n in gm.graph.nodes if name in str(n.target))


def test_kv_shared_layers_read_the_writers_shard(fake_world):
    """Gemma 3n: layers 2 and 3 have no k/v projections and read the caches of layers 0 (sliding) and 1 (full): each
    is an attention match over the writer's cache placeholders, with its own q, o and window, and no write."""
    done = passes(model("gemma3n"))
    attention = done.regions.attention
    assert [a.shares for a in attention] == [None, None, "model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert [a.window for a in attention] == [6, 0, 6, 0]
    assert attention[2].keys is attention[0].keys and attention[2].k is None
    local = done.stages["partition"]
    assert _count(local, "partial_attention") == 4 and _count(local, "kv_write_local") == 2
    assert "reads the cache of model.layers.0.self_attn" in done.regions.describe()
    # layer 0's gaussian top-k: a mean and a std over the intermediate features, each all-reduced over the world
    assert [[s.kind for s in f.stats] for f in done.regions.ffn] == [["mean", "std"], [], [], []]


def test_layers_of_another_head_dim_are_placed_with_their_own(fake_world):
    """Gemma 4: the full-attention layers (1, 3) have head_dim 32, the sliding ones 16; rank 1 of kvp=2 x tpa=2 keeps
    one query head after the all-to-all, so 16 or 32 columns of o_proj, and 16 or 32 rows of k_proj."""
    done = passes(model("gemma4"))
    widths = {}
    for name, role in done.plan.roles.items():
        layer = int(name.split("_layers_modules_")[1].split("_")[0])
        spec = done.plan.inputs[name]
        if role in ("o.weight", "k.weight") and layer < 2:
            widths[(role, layer)] = spec.stop - spec.start
    assert widths == {("o.weight", 0): 16, ("o.weight", 1): 32, ("k.weight", 0): 16, ("k.weight", 1): 32}
    assert [a.layer for a in done.regions.attention] == [0, 1, 2, 3]


def test_llama4_chunks_complex_rope_and_dense_experts(fake_world):
    """Llama 4: layer 0 is chunked (chunks of 8 positions, partial attention's chunk), layer 1 full; the reshapes of
    complex RoPE (view(B, L, H, -1, 2) before view_as_complex) name this rank's heads (kvp=2 x tpa=2: 2 query heads,
    1 KV head); layer 1's dense experts (every token through each) narrowed to this rank's experts (ep=2)."""
    done = passes(model("llama4_text"), Layout(2, 2, ep=2, kv_block=4))
    assert [a.chunk for a in done.regions.attention] == [8, 0]
    local = done.stages["partition"]
    chunks = [n.kwargs.get("chunk", 0) for n in local.graph.nodes if "partial_attention" in str(n.target)]
    assert chunks == [8, 0]
    pairs = [n for n in local.graph.nodes if n.op == "call_method" and n.target == "reshape"
             and any(u.target is torch.view_as_complex for u in n.users)]
    assert sorted(tuple(n.args[3:]) for n in pairs) == [(1, -1, 2), (2, -1, 2)]  # k (1 KV head), q (2 heads)
    (moe,) = [m for m in done.regions.matches if m.kind == "moe"]
    assert moe.dense is not None and moe.transposed
    assert [n.args[1:] for n in local.graph.nodes if n.target is torch.narrow and n.args[0].name == moe.dense.name] \
        == [(0, 0, 2)]  # rank 1, tpf=2 x ep=2: ep_rank = 1 // 2 = 0, experts 0 and 1


@pytest.mark.parametrize("swap,message", [
    ("create_chunked_causal_mask", r"model.layers.0.self_attn: the config makes it a chunked-attention layer "
                                   r"\(attention_chunk_size=8\) but its mask .* compares chunks nowhere"),
    ("create_causal_mask", r"model.layers.1.self_attn: its mask .* compares chunks of positions \(divisors \[\(8, 8\)\]\) "
                           r"but the config does not make it a chunked-attention layer"),
])
def test_chunk_mask_that_disagrees_with_the_config_is_refused(fake_world, monkeypatch, swap, message):
    """A chunked layer whose mask is plain causal, or a full layer whose mask is chunked: refused, never run with
    the config's mask."""
    import transformers.models.llama4.modeling_llama4 as llama4

    other = "create_causal_mask" if swap == "create_chunked_causal_mask" else "create_chunked_causal_mask"
    monkeypatch.setattr(llama4, swap, getattr(llama4, other))
    with pytest.raises(Exception, match=message):
        passes(model("llama4_text"))


def test_values_narrower_than_keys_and_per_layer_kv_heads(fake_world):
    """MiMo-V2-Flash: values of v_head_dim 8 (keys 16) and, in its sliding layer 1, twice the KV heads (4, with
    sinks). Rank 1 of kvp=2 x tpa=2 holds KV head 1 of layer 0 and heads 2-3 of layer 1: k rows of 16 per head, v
    rows of 8; one query head after the all-to-all, so 8 columns of o_proj; the partials merge at width 8."""
    done = passes(model("mimo"))
    rows = {}
    for name, role in done.plan.roles.items():
        if role in ("k.weight", "v.weight", "o.weight", "q_heads.weight"):
            layer = int(name.split("_layers_modules_")[1].split("_")[0])
            spec = done.plan.inputs[name]
            rows[(role, layer)] = (spec.start, spec.stop)
    assert rows == {("k.weight", 0): (16, 32), ("v.weight", 0): (8, 16), ("o.weight", 0): (16, 24),
                    ("k.weight", 1): (32, 64), ("v.weight", 1): (16, 32), ("o.weight", 1): (16, 24),
                    ("q_heads.weight", 1): (2, 4)}
    merges = [n for n in done.stages["partition"].graph.nodes if "lse_merge" in str(n.target)]
    assert [n.args[2] for n in merges] == [8, 8]


def test_falcon_40b_query_key_value_sharded_by_kv_group(fake_world):
    """Falcon's new decoder architecture: query_key_value holds [q q k v] per KV group (2 groups of 2 query heads)
    and the model broadcasts each KV head over its group before the cache (4 KV heads cached). Rank 1 (tpa_rank 1)
    holds group 1: rows [64, 128); the broadcast keeps its group size (2) and takes the local sizes (-1)."""
    done = passes(model("falcon_40b"))
    specs = {name: done.plan.inputs[name] for name, role in done.plan.roles.items() if role == "qkv_heads.weight"}
    assert [(s.dim, s.start, s.stop) for s in specs.values()] == [(0, 64, 128)] * 2
    broadcasts = [n for n in done.stages["partition"].graph.nodes if n.target is torch.broadcast_to]
    assert [tuple(n.args[1]) for n in broadcasts] == [(-1, -1, -1, 2, -1)] * 4


def test_gpt_neo_where_mask_is_proven_from_the_buffer(fake_world):
    """GPT-Neo's where(bias[:, :, S-L:S, :S], scores, min) is dropped only because the live buffer is tril(ones):
    the same graph with another buffer value is refused (regions/where_mask.py)."""
    m = model("gpt_neo")
    done = passes(m)
    assert [(a.form, a.scale, a.window) for a in done.regions.attention] == [("eager", 1.0, 0)] * 2  # unscaled
    with torch.no_grad():
        m.transformer.h[1].attn.attention.bias[..., 3, 4] = True  # row 3 sees a later key
    with pytest.raises(Exception, match=r"h.1.attn.attention.*its mask .*bias.* is not tril\(ones\(256, 256\)\)"):
        passes(m)


def test_gpt_oss_sinks_and_interleaved_experts(fake_world):
    """gpt-oss: the sink concat with the row max subtracted is a sink (placed per query head); the experts' gate_up
    rows are interleaved, so each tpf rank holds one range of (gate, up) row pairs, their bias alike."""
    done = passes(model("gpt_oss"))  # rank 1 of kvp=2 x tpa=2: tpf = 4
    assert [(a.sink is not None, a.window) for a in done.regions.attention] == [(True, 6), (True, 0)]
    moe = [m for m in done.regions.matches if m.kind == "moe"]
    assert len(moe) == 2 and all(m.interleaved and m.transposed for m in moe)
    gate_up, bias = (done.plan.inputs[getattr(moe[0], f).name] for f in ("gate_up", "gate_up_bias"))
    per = 32 // 4  # intermediate 32 over tpf = 4, rank 1: features [8, 16) = rows [16, 32) of the 64 interleaved
    assert (gate_up.dim, gate_up.start, gate_up.stop, gate_up.parts) == (2, 2 * per, 4 * per, 1)
    assert (bias.dim, bias.start, bias.stop, bias.parts) == (1, 2 * per, 4 * per, 1)
    assert done.plan.roles[moe[0].gate_up.name] == "experts_gate_up.weight_t_interleaved"


def test_sink_max_shift_only_straight_into_softmax():
    """softmax(c - c.max(-1, keepdim=True)[0]) ignores the shift (gpt-oss); an op between them (here soft-capping)
    does not, and the form is not recognised (the matcher then refuses the scores' second use)."""
    from helix_compile.passes.regions.sinks import max_shift

    def shifted(c, capped: bool):
        d = c - c.max(-1, keepdim=True)[0]
        return torch.softmax(torch.tanh(d / 5.0) * 5.0 if capped else d.float(), dim=-1)

    for capped in (False, True):
        graph = torch.fx.symbolic_trace(lambda c: shifted(c, capped)).graph
        c = next(n for n in graph.nodes if n.op == "placeholder")
        found = max_shift(c)
        assert (found is None) == capped and (capped or found.target is operator.sub)


class _PartViewMLP(torch.nn.Module):
    """Moshi's gating MLP with the part width written out (``view(B, L, 2, I)``), or the view read otherwise
    (``mix``: "sum" over the parts, or "act_first": the activation on the whole view, then its parts)."""

    def __init__(self, hidden, inter, mix=None):
        super().__init__()
        self.fc1, self.fc2, self.inter, self.mix = torch.nn.Linear(hidden, 2 * inter, bias=False), \
            torch.nn.Linear(inter, hidden, bias=False), inter, mix

    def forward(self, x):
        b, l, _ = x.shape
        h = self.fc1(x).view(b, l, 2, self.inter)
        if self.mix == "sum":  # sums gate and up features: not a cut into parts
            return self.fc2(h.sum(-2))
        if self.mix == "act_first":  # the part index reads the activation, not the part view
            return self.fc2(torch.nn.functional.silu(h)[..., 0, :] * h[..., 1, :])
        return self.fc2(torch.nn.functional.silu(h[..., 0, :]) * h[..., 1, :])


def test_gate_up_cut_by_a_part_view(fake_world):
    """Moshi: fc1 -> view(B, L, 2, -1) -> act(x[..., 0, :]) * x[..., 1, :] -> fc2 is a fused gate_up (each rank's
    fc1 rows [gate slice | up slice]); the view keeps its -1, an explicit part width (96) becomes the local one."""
    done = passes(model("moshi"))
    ffn = done.regions.ffn
    assert len(ffn) == 2 and all(f.split is not None and len(f.split.part_views) == 1 for f in ffn)
    assert all(sorted(c.args[1][-2] for c in f.split.cuts) == [0, 1] for f in ffn)
    assert sorted(v for v in done.plan.roles.values() if v.startswith("ffn")) == (
        ["ffn_in_pair.weight"] * 2 + ["ffn_out.weight"] * 2)
    local = {n.name: n for n in done.stages["partition"].graph.nodes}
    assert all(local[f.split.part_views[0].name].args[-1] == -1 for f in ffn)

    m = model("llama")
    for layer in m.model.layers:
        layer.mlp = _PartViewMLP(64, 96)
    done = passes(m)
    views = [f.split.part_views[0] for f in done.regions.ffn]
    assert len(views) == 2 and all(v.args[-1] == 96 for v in views)
    local = {n.name: n for n in done.stages["partition"].graph.nodes}
    assert [local[v.name].args[-2:] for v in views] == [(2, 24)] * 2  # I/N = 96/4 per part on each rank


@pytest.mark.parametrize("mix, message", [
    ("sum", r"model.layers.0.mlp: node 'sum_1' .* is not supported on a sharded tensor"),
    ("act_first", r"model.layers.0.mlp: node 'getitem_\d+' .* indexes the intermediate features"),
])
def test_part_view_read_otherwise_is_refused(fake_world, mix, message):
    """Only ``x[..., k, :]`` of the part view itself is a cut: anything else reading the parts is refused by name."""
    m = model("llama")
    m.model.layers[0].mlp = _PartViewMLP(64, 96, mix=mix)
    with pytest.raises(Exception, match=message):
        passes(m)


def test_diffllama_heads_in_parts(fake_world):
    """DiffLLaMA: two attention cores over one query, each over one half of the cached value heads (chunk, repeat),
    combined o1 - lambda * o2 across query heads h and h + 4. Rank 1 of kvp=2 x tpa=2 holds the same block of each
    part: query heads [2, 4) and [6, 8), KV heads [1, 2) and [3, 4); o_proj's columns of pair 2 (heads 2 and 6, 16
    features); each core's partials are reordered so that the all-to-all gives every KVP rank one block of each
    part; with HOP-B the reorder is copied per batch chunk."""
    done = passes(model("diffllama"), Layout(2, 2, kv_block=4, hopb_chunks=2))
    attention = done.regions.attention
    assert [len(a.routes) for a in attention] == [2, 2] and all(a.output.parts == 2 for a in attention)
    assert [[op.target for op in r.ops] for r in attention[0].routes] == [[torch.chunk, operator.getitem, "repeat"]] * 2
    assert [r.heads_read(list(range(4))) for r in attention[0].routes] == [[0, 1, 0, 1], [2, 3, 2, 3]]
    specs = {role: done.plan.inputs[name] for name, role in done.plan.roles.items() if "layers_modules_0_" in name}
    assert specs["q.weight"].ranges == ((16, 32), (48, 64))
    assert specs["k.weight"].ranges == specs["v.weight"].ranges == ((8, 16), (24, 32))
    assert (specs["o.weight"].dim, specs["o.weight"].start, specs["o.weight"].stop) == (1, 32, 48)
    for stage, partials in (("partition", 4), ("schedule", 8)):
        text = graph_text(done.stages[stage])
        assert text.count("helix.partial_attention.default(") == partials
        assert text.count("unflatten(") == text.count("all_to_all_single.default(") == partials
        assert "scaled_dot_product_attention" not in text


def _rolled_eager(inner):
    """eager attention whose values are the cache's KV heads rolled by one (a rearrangement helix can follow)."""
    def attention(module, query, key, value, *args, **kwargs):
        return inner(module, query, key, torch.cat([value[:, 1:], value[:, :1]], dim=1), *args, **kwargs)
    return attention


def test_value_heads_rearranged_only_where_proven(fake_world, monkeypatch):
    """Values through head rearrangements are exact under KVP (every rank holds every head) and refused where a
    rank's heads would not give each query head its value head (tpa=2), or where helix cannot follow the op; and
    DiffLLaMA's cut into parts is refused when the config does not say its heads come in parts."""
    import transformers.models.llama.modeling_llama as llama
    from helix_compile import layout as layout_module

    original = llama.eager_attention_forward
    monkeypatch.setattr(llama, "eager_attention_forward", _rolled_eager(original))
    done = passes(model("llama", attn="eager"), Layout(4, 1, kv_block=4))
    assert [r.heads_read([0, 1, 2, 3]) for a in done.regions.attention for r in a.routes] == [[1, 2, 3, 0]] * 2
    with pytest.raises(Exception, match=r"query head 6 reads value head 0 of the cache \(through getitem_\d+ -> "
                                        r"getitem_\d+ -> cat_\d+\), but on rank 1 .* it would read head 2"):
        passes(model("llama", attn="eager"))
    monkeypatch.setattr(llama, "eager_attention_forward",
                        lambda module, q, k, v, *a, **kw: original(module, q, k, v.flip(1), *a, **kw))
    with pytest.raises(Exception, match=r"the values of node .* come from the cache's .*values through node 'flip'"):
        passes(model("llama", attn="eager"))
    monkeypatch.setattr(layout_module, "_HEAD_PARTS", {})
    with pytest.raises(Exception, match=r"model.layers.0.self_attn: the graph cuts the attention output's heads into 2 "
                                        r"part\(s\) \(at chunk_1\), but the config's heads are in 1"):
        passes(model("diffllama"))


def _rotary(rotate):
    """RoFormer's apply_rotary_position_embeddings with its rotate-half replaced by ``rotate``."""
    def apply(sinusoidal_pos, query, key, value=None):
        sin, cos = sinusoidal_pos.chunk(2, dim=-1)
        sin_pos = torch.stack([sin, sin], dim=-1).reshape_as(sinusoidal_pos)
        cos_pos = torch.stack([cos, cos], dim=-1).reshape_as(sinusoidal_pos)
        return query * cos_pos + rotate(query) * sin_pos, key * cos_pos + rotate(key) * sin_pos
    return staticmethod(apply)


@pytest.mark.parametrize("rotate, message", [
    (None, None),  # RoFormer's own: stack([-x[..., 1::2], x[..., ::2]], dim=-1).reshape_as(x)
    # the halves stacked on a new dim before the heads: the reshape_as interleaves heads
    (lambda x: torch.stack([-x[..., 1::2], x[..., ::2]], dim=1).reshape_as(x),
     r"node 'stack(_\d+)?' .* is not a per-head op"),
    # within the last axis, then heads moved into the merged axis: the reshape_as regroups heads
    (lambda x: torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).transpose(1, 3).reshape_as(x),
     r"node 'reshape_as(_\d+)?' .* is not a per-head op"),
    # heads rolled by one: a slice of the heads dim (then a cat along it)
    (lambda x: torch.cat([x[:, 1:], x[:, :1]], dim=1), r"node 'getitem_\d+' .* indexes a dim of \(2, 4, 5, 16\) that "
                                                       r"may hold the heads"),
    # the halves of the last axis concatenated along the heads dim, then folded back: heads interleaved
    (lambda x: torch.cat([x[..., 8:], x[..., :8]], dim=1).reshape_as(x), r"node 'cat(_\d+)?' .* concatenates along a dim "
                                                                         r"other than the last"),
])
def test_rotate_half_within_the_last_axis_is_per_head(fake_world, monkeypatch, rotate, message):
    """RoFormer's interleaved rotate-half (strided slices of the last axis, negation, a stack on a new last axis,
    reshape_as merging it back) keeps heads apart: q and k sharded by heads (their exactness: test_exactness.py).
    A stack, slice or cat on a dim that may hold heads, or a reshape_as that regroups heads, is refused by name."""
    from transformers.models.roformer import modeling_roformer

    if rotate is not None:
        monkeypatch.setattr(modeling_roformer.RoFormerSelfAttention, "apply_rotary_position_embeddings",
                            _rotary(rotate))
    if message is not None:
        with pytest.raises(Exception, match=r"query of roformer.encoder.layer.0.attention.self: " + message):
            passes(model("roformer"))
        return
    done = passes(model("roformer"))
    assert len(done.regions.attention) == 2 and not done.regions.whole
    specs = {role: done.plan.inputs[name] for name, role in done.plan.roles.items() if "layer_modules_0_" in name}
    q, k = specs["q.weight"], specs["k.weight"]  # rank 1 = tpa rank 1 of 2: heads 2, 3 of 4 (rows 32..64)
    assert (q.dim, q.start, q.stop) == (k.dim, k.start, k.stop) == (0, 32, 64)
