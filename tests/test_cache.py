"""The helix StaticCache against the model it serves: defaults that follow the model, a smaller batch, and a clear
error naming both values for every mismatch (raised by the backend before any pass, not deep inside Dynamo)."""

import pytest
import torch
from transformers import StaticCache as HFStaticCache

from helix_compile import Layout, StaticCache
from helix_compile.lowering.ops import ShardedEagerError
from models import config, model, prompt

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def compiled(m, layout=Layout(1)):
    torch._dynamo.reset()
    return torch.compile(m, backend="helix", options={"layout": layout, "executor": "eager"}, fullgraph=True)


def test_dtype_and_device_follow_the_model():
    m = model("llama").to(torch.bfloat16)
    assert m.config.dtype in (None, torch.float32)  # .to() leaves config.dtype alone: the config is not enough
    cache = StaticCache(m, 2, 16, Layout(1))
    assert cache.layers[0].keys.dtype == cache.layers[0].local_keys.dtype == torch.bfloat16
    assert cache.layers[0].keys.device == torch.device("cpu")
    with torch.no_grad():
        out = compiled(m)(input_ids=prompt(), past_key_values=cache).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_dtype_from_config():
    cfg = config("llama")
    cfg.dtype = torch.bfloat16  # what from_pretrained(dtype=torch.bfloat16) records
    assert StaticCache(cfg, 1, 16, Layout(1)).layers[0].local_keys.dtype == torch.bfloat16


def test_smaller_batch_is_exact():
    """Batch 2 in a cache of max_batch_size 5: the rows beyond the batch are unused, the logits match."""
    m = model("llama")
    cache, ref_cache = StaticCache(m, 5, 16, Layout(1, kv_block=4)), HFStaticCache(m.config, max_cache_len=16)
    c = compiled(m, Layout(1, kv_block=4))
    ids = prompt()
    with torch.no_grad():
        for _ in range(4):
            out = c(input_ids=ids, past_key_values=cache).logits
            ref = m(input_ids=ids, past_key_values=ref_cache).logits
            assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5
            ids = ref[:, -1:].argmax(-1)
    assert cache.layers[0].local_keys[2:].abs().sum() == 0  # never written


@pytest.mark.parametrize("model_device,make_cache,message", [
    (torch.bfloat16, lambda m: StaticCache(m.config, 2, 16, Layout(1)),
     "the model computes in torch.bfloat16 but the cache holds torch.float32"),
    # the model on another device than the (default, CPU) cache; "meta" stands in for an accelerator here
    ("meta", lambda m: StaticCache(m.config, 2, 16, Layout(1)), "the model computes on meta but the cache is on cpu"),
    (None, lambda m: StaticCache(m.config, 1, 16, Layout(1)), "the batch has 2 rows but the cache's max_batch_size is 1"),
    (None, lambda m: StaticCache(config("llama", num_key_value_heads=2), 2, 16, Layout(1)),
     "the model has 4 KV heads per layer but the cache 2"),
    (None, lambda m: StaticCache(config("llama", head_dim=16), 2, 16, Layout(1)),
     "the model's key/value head_dim is 8/8 but the cache's 16/16"),
    (None, lambda m: StaticCache(config("llama", num_hidden_layers=1), 2, 16, Layout(1)),
     "the model asks for cache layer 1 but the cache has 1 layers"),
    (None, lambda m: StaticCache(config("llama", num_hidden_layers=3), 2, 16, Layout(1)),
     "the model has 2 attention layers that write KV but the cache has 3"),
])
def test_mismatch_is_a_clear_error(model_device, make_cache, message):
    m = model("llama")
    cache = make_cache(m)
    if model_device is not None:
        m = m.to(model_device)
    ids = prompt().to(m.device)
    with pytest.raises(Exception, match=f"helix StaticCache does not fit the model: {message}.*StaticCache\\(model, "):
        with torch.no_grad():
            compiled(m)(input_ids=ids, past_key_values=cache)
    assert cache.host_length == 0 and all(int(layer.cumulative_length) == 0 for layer in cache.layers)


def test_compiled_generate_is_refused_with_the_working_form():
    """generate is a method of the original model: it would run the uncompiled forward on sharded data."""
    m = model("llama")
    c = compiled(m)
    with pytest.raises(ShardedEagerError, match="model.forward = torch.compile\\(model.forward, backend='helix'"):
        c.generate(prompt(), attention_mask=torch.ones(2, 7, dtype=torch.long), max_new_tokens=2,
                   past_key_values=StaticCache(m, 2, 16, Layout(1)))


@pytest.mark.parametrize("family,extra", [
    ("llama", {}), ("mqa", {}), ("gpt_bigcode", {}),
    ("falcon", {}),  # multi_query: 1 KV head, whatever num_kv_heads says
    ("falcon", dict(multi_query=False)),  # num_kv_heads (= the query heads by default)
    ("falcon_40b", {}), ("falcon_40b", dict(num_kv_heads=1)),  # KV heads broadcast over their group: Q in the cache
    ("mimo", {}),  # values of v_head_dim 8 < head_dim 16; the sliding layer 1 has twice num_key_value_heads
])
def test_attention_shape_is_what_the_model_caches(family, extra):
    """``layout.attention_shape`` (the one derivation of KV heads and head dims from a config) against the keys and
    values transformers' own DynamicCache receives from the model, per layer; the helix cache and the plan's Heads
    follow it, and so does the planner."""
    from transformers import DynamicCache

    from helix_compile.layout import attention_shape
    from helix_compile.passes.regions.roles import Heads
    from helix_compile.planner.model import from_config

    m = model(family, **extra)
    reference = DynamicCache(config=m.config)
    with torch.no_grad():
        m(input_ids=prompt(), past_key_values=reference)
    ours, heads = StaticCache(m, 2, 16, Layout(1)), Heads.of(m.config)
    for i, layer in enumerate(reference.layers):
        s = attention_shape(m.config, i)
        assert (s.k, s.d, s.dv) == (layer.keys.shape[1], layer.keys.shape[-1], layer.values.shape[-1]), (i, s)
        assert (ours.layers[i].num_heads, ours.layers[i].k_head_dim, ours.layers[i].v_head_dim) == (s.k, s.d, s.dv)
        assert (heads.layer(i).k, heads.layer(i).d, heads.layer(i).dv) == (s.k, s.d, s.dv)
    assert from_config(m.config).kv_heads == min(attention_shape(m.config, i).k for i in range(len(reference.layers)))


def test_host_length_families_compile_two_graphs():
    """TrOCR reads cache.get_seq_length() as a Python int (its positions are arange(length, length + L)): the helix
    cache returns its host count, which Dynamo specialises at 0 for the prefill and makes a dynamic SymInt at the
    first decode step. Prefill + 10 decode steps: 2 graphs (a graph per step would be one recompile per token),
    and every step matches transformers."""
    from torch._dynamo.utils import counters

    m = model("trocr")
    layout = Layout(1, kv_block=4)
    cache, ref_cache = StaticCache(m, 2, 24, layout), HFStaticCache(m.config, max_cache_len=24)
    run = compiled(m, layout)
    counters.clear()
    ids = prompt()
    with torch.no_grad():
        for step in range(11):
            assert cache.get_seq_length() == (0 if step == 0 else 6 + step)
            out = run(input_ids=ids, past_key_values=cache).logits[:, -1]
            ref = m(input_ids=ids, past_key_values=ref_cache).logits[:, -1]
            assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5, step
            ids = ref.argmax(-1, keepdim=True)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
