"""Memory per rank: the KV cache bytes, and the peak while loading a checkpoint with from_pretrained."""

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

import helix_compile
from helix_compile import Layout, StaticCache
from helix_compile.testing import compare
from distributed import run_ranks
from models import config, model, prompt

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.mark.parametrize("kvp,tpa", [(4, 1), (2, 2), (1, 4)])
def test_cache_bytes_per_rank(kvp, tpa):
    """Each rank stores K/tpa heads of ceil(S/(kv_block*kvp))*kv_block positions (+1 spare slot): ~1/N."""
    from transformers import StaticCache as HFStaticCache

    cfg = config("llama", num_hidden_layers=3)
    batch, length, layout = 2, 4096, Layout(kvp, tpa)
    dist.init_process_group("fake", store=FakeStore(), rank=3, world_size=kvp * tpa)
    try:
        cache = StaticCache(cfg, batch, length, layout)
    finally:
        dist.destroy_process_group()
    hf = HFStaticCache(cfg, max_cache_len=length)
    hf.early_initialization(batch, 4, 8, torch.float32, torch.device("cpu"))
    hf_bytes = sum(l.keys.nbytes + l.values.nbytes for l in hf.layers)
    per_layer = 2 * batch * (4 // tpa) * (layout.local_capacity(length) + 1) * 8 * 4
    print(f"kvp={kvp} tpa={tpa}: {cache.nbytes} bytes/rank vs transformers {hf_bytes} ({hf_bytes / cache.nbytes:.3f}x)")
    assert cache.nbytes == 3 * per_layer
    assert cache.nbytes <= hf_bytes / (kvp * tpa) * 1.001


@pytest.mark.parametrize("kvp,tpa", [(1, 8), (2, 8)])
def test_cache_bytes_tensor_parallel_baseline(kvp, tpa):
    """tpa = 8 > K = 4: each rank stores one KV head, duplicated on tpa/K = 2 ranks: 1/(K*kvp) of transformers'
    cache, twice what Helix's 1/N would be."""
    from transformers import StaticCache as HFStaticCache

    cfg = config("llama", num_hidden_layers=3, num_attention_heads=16, head_dim=8)  # 2 query heads per TPA slice
    batch, length, layout = 2, 4096, Layout(kvp, tpa)
    dist.init_process_group("fake", store=FakeStore(), rank=5, world_size=kvp * tpa)
    try:
        cache = StaticCache(cfg, batch, length, layout)
    finally:
        dist.destroy_process_group()
    hf = HFStaticCache(cfg, max_cache_len=length)
    hf.early_initialization(batch, 4, 8, torch.float32, torch.device("cpu"))
    hf_bytes = sum(l.keys.nbytes + l.values.nbytes for l in hf.layers)
    assert cache.nbytes == 3 * 2 * batch * 1 * (layout.local_capacity(length) + 1) * 8 * 4
    assert cache.nbytes > 1.9 * hf_bytes / (kvp * tpa)  # the duplication Helix avoids
    assert cache.nbytes <= hf_bytes / (4 * kvp) * 1.01


def _save_checkpoint(folder, family, **extra):
    m = model(family, **extra)
    m.save_pretrained(folder)
    return sum(p.numel() * 4 for p in m.parameters())


def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _load_and_measure(rank, folder, kvp, tpa):
    import gc

    # Warm-up: lazy imports of transformers modules. Kept alive, so the measured load cannot reuse its pages.
    warm = helix_compile.from_pretrained(folder, Layout(kvp, tpa))
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = _rss_kib("VmRSS")
    m = helix_compile.from_pretrained(folder, Layout(kvp, tpa))
    peak = (_rss_kib("VmHWM") - before) * 1024
    from helix_compile import shards

    held = sum(shards.lookup(p, k).nbytes for p in m.parameters() for k in shards.keys_of(p))
    held += sum(p.nbytes for p in m.parameters() if not shards.is_virtual(p))
    largest = max(p.numel() * p.element_size() for p in m.parameters())
    del warm
    return peak, held, largest


def test_from_pretrained_peak_memory(tmp_path):
    """Peak RSS growth while loading is about this rank's shards plus one tensor, far below the checkpoint."""
    total = _save_checkpoint(tmp_path, "llama", hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                             head_dim=64, vocab_size=512)
    results = run_ranks(4, _load_and_measure, str(tmp_path), 2, 2)
    for rank, (peak, held, largest) in enumerate(results):
        print(f"rank {rank}: peak growth {peak / 2**20:.1f} MiB, holds {held / 2**20:.1f} MiB, largest tensor "
              f"{largest / 2**20:.1f} MiB, checkpoint {total / 2**20:.1f} MiB")
        assert held < total / 3
        assert held * 0.9 < peak < held + largest + 4 * 2**20, (peak, held, largest)  # the RSS does see the shards


def _exact_from_checkpoint(rank, folder):
    from transformers import AutoModelForCausalLM

    layout = Layout(2, 1, kv_block=4)
    sharded = helix_compile.from_pretrained(folder, layout)
    with pytest.raises(helix_compile.lowering.ops.ShardedEagerError, match="loaded with helix_compile.from_pretrained"):
        sharded(input_ids=prompt())
    reference = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    report = compare(reference, layout, prompt(), 20, 40)  # the reference compiled from full weights...
    torch._dynamo.reset()
    sharded_report = _compare_sharded(sharded, reference, layout)  # ...and the sharded load
    return report.max_rel_err, sharded_report


def _compare_sharded(sharded, reference, layout):
    from transformers import StaticCache as HFStaticCache

    cache = StaticCache(sharded.config, 2, 40, layout)
    ref_cache = HFStaticCache(reference.config, max_cache_len=40)
    compiled = torch.compile(sharded, backend="helix", options={"layout": layout, "executor": "eager"}, fullgraph=True)
    ids, err = prompt(), 0.0
    with torch.no_grad():
        for _ in range(20):
            out = compiled(input_ids=ids, past_key_values=cache).logits[:, -1]
            ref = reference(input_ids=ids, past_key_values=ref_cache).logits[:, -1]
            err = max(err, ((out - ref).abs().max() / ref.abs().max()).item())
            ids = ref.argmax(-1, keepdim=True)
            assert torch.equal(out.argmax(-1), ref.argmax(-1))
    return err


def test_from_pretrained_is_exact(tmp_path):
    _save_checkpoint(tmp_path, "qwen2")
    for full_err, sharded_err in run_ranks(2, _exact_from_checkpoint, str(tmp_path)):
        print(f"materialised model max rel err {full_err:.2e}; from_pretrained shards {sharded_err:.2e}")
        assert full_err < 1e-5 and sharded_err < 1e-5


def test_from_pretrained_tied_embeddings_either_end(tmp_path):
    """safetensors' save_model keeps one end of a tied embedding (SmolLM2 keeps lm_head): both must load."""
    from safetensors.torch import save_model

    reference = model("llama", tie_word_embeddings=True)
    reference.config.save_pretrained(tmp_path)
    save_model(reference, str(tmp_path / "model.safetensors"))
    loaded = helix_compile.from_pretrained(tmp_path, Layout(1))
    assert loaded.get_input_embeddings().weight is loaded.get_output_embeddings().weight
    assert torch.equal(loaded.get_input_embeddings().weight, reference.get_input_embeddings().weight)
    torch._dynamo.reset()
    assert _compare_sharded(loaded, reference, Layout(1)) < 1e-5
