"""Bad input gets a clear error naming the problem and the numbers; nothing is half-written."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from helix_compile import Layout, StaticCache
from helix_compile.lowering.ops import ShardedEagerError
from models import config, model, prompt

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def compiled(m, layout=Layout(1), **opts):
    torch._dynamo.reset()
    return torch.compile(m, backend="helix", options={"layout": layout, "executor": "eager", **opts}, fullgraph=True)


# -- layouts ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,message", [
    (dict(kvp=0), "Layout.kvp must be a positive int, got 0"),
    (dict(kvp=2, tpa=1, tpf=3), "N = kvp\\*tpa = 2\\*1 = 2 ranks but the FFN uses tpf\\*ep = 3\\*1 = 3"),
    (dict(kvp=3, ep=2), "N = kvp\\*tpa = 3\\*1 = 3 is not divisible by ep=2"),
])
def test_invalid_layout(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Layout(**kwargs)


@pytest.mark.parametrize("layout,message", [
    (Layout(1, 6), "tpa=6 exceeds num_key_value_heads=4 of LlamaConfig and is not a multiple of it"),
    (Layout(1, 8), None),  # the tensor-parallel baseline: each KV head stored on two ranks
    (Layout(1, 16), "tpa=16 does not divide num_attention_heads=8 of LlamaConfig"),
    (Layout(1, 3), "tpa=3 does not divide num_key_value_heads=4 of LlamaConfig"),
    (Layout(16, 1), "kvp=16 exceeds the 8 query heads of a TPA slice"),
    (Layout(1, 1, ep=1, tpf=1, kv_block=4), None),
    (Layout(5, 1), "tpf=5 does not divide intermediate_size=96 of LlamaConfig"),
    (Layout(2, 1, tpf=1, ep=2), "ep=2 needs a mixture-of-experts FFN; LlamaConfig has a dense FFN"),
])
def test_layout_against_model(layout, message):
    if message is None:
        layout.validate(config("llama"))
    else:
        with pytest.raises(ValueError, match=message):
            layout.validate(config("llama"))


def test_world_size_differs_from_layout():
    with pytest.raises(ValueError, match="kvp=2 x tpa=2 needs N=4 ranks, but the default process group has world size 1"):
        StaticCache(config("llama"), 1, 16, Layout(2, 2))


def test_sliding_window_keeps_every_position():
    """A window shorter than the cache is exact by masking (partial_attention's window); the cost is that every
    position stays cached, as for a full-attention layer."""
    cache = StaticCache(config("mistral", sliding_window=8), 1, 32, Layout(1))
    assert all(layer.local_keys.shape[2] == 32 + 1 for layer in cache.layers)  # + the spare slot


# -- cache bound ------------------------------------------------------------------------------------------------
def _snapshot(cache):
    return [(l.local_keys.clone(), l.local_values.clone(), l.cumulative_length.clone()) for l in cache.layers]


def _same(a, b):
    return all(torch.equal(x, y) for sa, sb in zip(a, b) for x, y in zip(sa, sb))


def test_prefill_longer_than_cache():
    m = model("llama")
    cache = StaticCache(m.config, 2, 8, Layout(1))
    before = _snapshot(cache)
    with pytest.raises(ValueError, match="holds 0 tokens and max_cache_len=8: 10 more do not fit; nothing was written"):
        compiled(m)(input_ids=prompt(length=10), past_key_values=cache)
    assert _same(before, _snapshot(cache)) and cache.host_length == 0


def test_decode_past_the_end():
    m = model("llama")
    cache = StaticCache(m.config, 2, 8, Layout(1))
    c = compiled(m)
    with torch.no_grad():
        c(input_ids=prompt(length=6), past_key_values=cache)
        c(input_ids=prompt(length=1), past_key_values=cache)
        c(input_ids=prompt(length=1), past_key_values=cache)
        before = _snapshot(cache)
        with pytest.raises(ValueError, match="holds 8 tokens and max_cache_len=8: 1 more do not fit"):
            c(input_ids=prompt(length=1), past_key_values=cache)
    assert _same(before, _snapshot(cache)) and cache.host_length == 8
    cache.reset()
    assert cache.host_length == 0 and int(cache.layers[0].cumulative_length) == 0


# -- eager use of sharded data -----------------------------------------------------------------------------------
def test_eager_model_on_sharded_cache_raises():
    m = model("llama")
    cache = StaticCache(m.config, 2, 16, Layout(1))
    with pytest.raises(ShardedEagerError, match="keeps its \\(2, 4, 16, 8\\) keys/values in rank-local shards"):
        m(input_ids=prompt(), past_key_values=cache)


def test_virtual_cache_tensor_reads_nan_not_garbage():
    cache = StaticCache(config("llama"), 2, 16, Layout(1))
    assert cache.layers[0].keys.untyped_storage().nbytes() == 4  # one element, stride 0: no data of its own
    assert torch.isnan(cache.layers[0].keys).all()


# -- unsupported structures --------------------------------------------------------------------------------------
def _tiny(model_type, attn="sdpa", **kw):
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, **{**base, **kw})
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()


def test_attention_mask_2d_accepted_4d_refused():
    """The 2-D padding mask is applied by partial attention (exactness: tests/test_generate.py); a 4-D mask, which
    could say anything about each (query, key) pair, is refused."""
    m = model("llama")
    ids = prompt()
    with torch.no_grad():
        out = compiled(m)(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=StaticCache(m, 2, 16, Layout(1)))
        ref = m(input_ids=ids).logits
        assert ((out.logits - ref).abs().max() / ref.abs().max()).item() < 1e-5
        mask = torch.ones(2, 1, 7, 16, dtype=torch.bool).tril(diagonal=0)
        # refused by the attention matcher's causal-mask check (a user 4-D mask is not a comparison of positions)
        with pytest.raises(Exception, match="attn_output.*its mask is not built from a comparison of positions"):
            compiled(m)(input_ids=ids, attention_mask=mask, past_key_values=StaticCache(m, 2, 16, Layout(1)))


def test_transformers_cache_refused():
    from transformers import StaticCache as HFStaticCache

    m = model("llama")
    with pytest.raises(Exception, match="past_key_values=helix_compile.StaticCache"):
        compiled(m)(input_ids=prompt(), past_key_values=HFStaticCache(m.config, max_cache_len=16))


def test_unknown_option():
    m = model("llama")
    cache = StaticCache(m.config, 2, 16, Layout(1))
    with pytest.raises(Exception, match="unknown helix options \\['layuot'\\]"):
        torch._dynamo.reset()
        torch.compile(m, backend="helix", options={"layuot": 1})(input_ids=prompt(), past_key_values=cache)


# -- families outside what helix parallelises ---------------------------------------------------------------------
def test_state_space_model_refused():
    cfg = AutoConfig.for_model("mamba", vocab_size=97, hidden_size=64, num_hidden_layers=1)
    with pytest.raises(ValueError, match="MambaConfig has no softmax attention over a KV cache"):
        StaticCache(cfg, 1, 16, Layout(1))


def test_linear_attention_layers_refused():
    cfg = config("llama")
    cfg.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(ValueError, match="has layers without softmax attention over a KV cache .*'linear_attention'"):
        StaticCache(cfg, 1, 16, Layout(1))


@pytest.mark.parametrize("model_type,kw,message", [
    ("camembert", dict(num_key_value_heads=4), "attends without a mask over the cache \\(bidirectional attention"),  # encoder, no is_decoder
    ("gpt_neo", dict(attn="eager", attention_types=[[["local"], 1]], window_size=5, num_key_value_heads=4),
     "h.0.attn.attention: local attention over a window of 5 keys that ends at the end of the static cache.*"
     "node 'attn_weights_1'"),  # GPT-Neo's where(tril ^ tril(-w) [S-L:S], scores, min)
])
def test_unsupported_attention_refused_by_name(model_type, kw, message):
    m = _tiny(model_type, **kw)
    cache = StaticCache(m.config, 1, 16, Layout(1))
    with pytest.raises(Exception, match=message):
        compiled(m)(input_ids=prompt(batch=1), past_key_values=cache)


def test_softcap_in_config_but_not_in_graph_refused():
    """Gemma 2 under SDPA would drop the soft-capping; transformers refuses it itself, and helix double-checks
    the config against the graph: a config that says softcap with a graph that has none is refused."""
    from helix_compile.passes.regions.attention import layer_window

    cfg = config("gemma2")
    assert [layer_window(cfg, i) for i in range(2)] == [6, 0]
    assert layer_window(config("mistral_window"), 1) == 5 and layer_window(config("llama"), 0) == 0
    assert [layer_window(config("qwen2_window"), i) for i in range(2)] == [0, 5]
    m = model("llama")
    m.config.attn_logit_softcapping = 5.0
    cache = StaticCache(m.config, 2, 16, Layout(1))
    with pytest.raises(Exception, match="attn_logit_softcapping=5.0 but helix found no soft-capping"):
        compiled(m)(input_ids=prompt(), past_key_values=cache)


@pytest.mark.parametrize("model_type,where", [("ctrl", "modeling_ctrl.py"), ("cpmant", "modeling_cpmant.py")])
def test_untraceable_family_refused_before_tracing(model_type, where):
    """Families whose transformers code Dynamo cannot trace over a static cache (CTRL re-assigns a buffer; CPM-Ant
    branches on the length tensor, and more) are refused when the cache is built, naming the family and the
    transformers line."""
    cfg = AutoConfig.for_model(model_type)
    with pytest.raises(ValueError, match=rf"\({model_type}\) cannot be traced .*{where}"):
        StaticCache(cfg, 1, 16, Layout(1))


def test_falcon_alibi_refused_before_tracing():
    cfg = AutoConfig.for_model("falcon", alibi=True)
    with pytest.raises(ValueError, match=r"\(falcon\) with alibi=True does not run over a static KV cache"):
        StaticCache(cfg, 1, 16, Layout(1))
    StaticCache(AutoConfig.for_model("falcon"), 1, 16, Layout(1))  # without ALiBi: not refused here
