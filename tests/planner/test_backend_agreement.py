"""The planner and the backend agree: every layout choose_layout returns is one the backend accepts and compiles,
and choose_layout answers for every model and world size the backend can run.

Small HF configs (uneven query heads, MQA, GQA, MHA; world 1 to 4 and 6) on a fake process group: the helix passes
(detect, plan, partition, schedule) run on the captured decode graph of each returned layout.
"""

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from helix_compile import Layout, StaticCache
from helix_compile.backend import run_passes
from helix_compile.planner import choose_layout
from models import config, model, prompt

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

# (num_attention_heads, num_key_value_heads): GQA, MQA, uneven Q (14 heads on 4 ranks: 4+3 per TPA slice of 7),
# SmolLM2's 9/3, MHA
CONFIGS = [(8, 4), (4, 1), (14, 2), (9, 3), (6, 6)]
WORLDS = [1, 2, 3, 4, 6]
# (context, batch): short context (TP-like layouts win), long context and large batch (KV sharding wins)
POINTS = [(64, 1), (1_000_000, 1), (1_000_000, 64)]


def _shape(q, k):
    return dict(num_attention_heads=q, num_key_value_heads=k, head_dim=8, hidden_size=8 * q, intermediate_size=96)


def _config(q, k):
    return config("llama", **_shape(q, k))


def _backend_runs(cfg, world):
    """Layouts of `world` ranks the backend's Layout.validate accepts for cfg."""
    out = []
    for tpa in range(1, world + 1):
        if world % tpa == 0:
            try:
                Layout(world // tpa, tpa).validate(cfg, world_size=world)
                out.append(Layout(world // tpa, tpa))
            except ValueError:
                pass
    return out


def _chosen():
    """{(q, k, world): set of layouts choose_layout returned}, checking it never raises when the backend runs."""
    out = {}
    for q, k in CONFIGS:
        cfg = _config(q, k)
        for world in WORLDS:
            runs = _backend_runs(cfg, world)
            got = set()
            for context, batch in POINTS:
                if not runs:
                    with pytest.raises(ValueError, match=f"no layout of .* runs on {world} GPUs"):
                        choose_layout(cfg, world, context, batch_size=batch, dtype=torch.float32)
                    continue
                lay = choose_layout(cfg, world, context, batch_size=batch, dtype=torch.float32)
                got.add(Layout(**lay))
            out[(q, k, world)] = got
    return out


def test_choose_layout_answers_exactly_when_the_backend_runs():
    chosen = _chosen()
    for (q, k, world), layouts in chosen.items():
        runs = set(_backend_runs(_config(q, k), world))
        assert layouts <= runs, (q, k, world, layouts - runs)  # never a layout the backend refuses
        assert bool(layouts) == bool(runs), (q, k, world)
    # the cases the old planner got wrong: uneven heads (Q % N != 0) and the TP baseline (tpa > K)
    assert chosen[(14, 2, 4)] and chosen[(9, 3, 2)]
    assert any(lay.tpa > 1 for lay in chosen[(4, 1, 4)]), chosen[(4, 1, 4)]


def _compile(q, k, layout, rank, family="llama"):
    torch._dynamo.reset()
    m = model("llama", **_shape(q, k)) if family == "llama" else model(family)
    cache = StaticCache(m.config, 2, 16, layout)
    seen = []

    def backend(gm, example_inputs, **_):
        seen.append(run_passes(gm, example_inputs, layout))
        outputs = gm.graph.output_node().args[0]
        return lambda *args: [torch.zeros(()) for _ in outputs]

    torch.compile(m, backend=backend, fullgraph=True)(input_ids=prompt(length=1), past_key_values=cache)
    return seen[-1]


def test_every_chosen_layout_compiles():
    """Each distinct (config, layout) choose_layout returned goes through the helix passes on a fake group."""
    todo = sorted({(q, k, lay.kvp, lay.tpa) for (q, k, _), lays in _chosen().items() for lay in lays if lay.world_size > 1})
    assert len(todo) >= 8, todo
    for q, k, kvp, tpa in todo:
        layout, rank = Layout(kvp, tpa), kvp * tpa - 1  # the last rank: uneven head splits put it at the short end
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=kvp * tpa)
        try:
            done = _compile(q, k, layout, rank)
        finally:
            dist.destroy_process_group()
        text = str(done.stages["schedule"].graph)
        assert text.count("helix.partial_attention") == 2, (q, k, kvp, tpa)  # one per layer
        assert ("all_to_all_single" in text) == (kvp > 1), (q, k, kvp, tpa)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_moe_and_mla_get_a_layout_the_backend_runs(family):
    """MoE (TPF x EP) and MLA (tpa = 1) models are planned, not refused: the layout choose_layout returns on 4
    ranks is accepted by Layout.validate and goes through the helix passes on a fake group."""
    lay = Layout(**choose_layout(config(family), 4, 1_000_000, batch_size=64, dtype=torch.float32))
    lay.validate(config(family), world_size=4)
    if family == "deepseek_v3":
        assert lay.tpa == 1 and lay.kvp == 4, lay  # MLA: the latent cache over kvp = N
    dist.init_process_group("fake", store=FakeStore(), rank=3, world_size=4)
    try:
        done = _compile(0, 0, lay, 3, family)
    finally:
        dist.destroy_process_group()
    text = str(done.stages["schedule"].graph)
    assert text.count("helix.partial_attention") == 2, lay  # one per layer
    assert ("all_to_all_single" in text) == (lay.kvp > 1), lay


def test_static_cache_auto_passes_its_dtype(monkeypatch):
    """StaticCache(layout="auto") sizes the KV the planner costs with the cache's own dtype (an FP8 cache's too)."""
    import helix_compile.planner

    seen = {}

    def spy(config, world, context, batch_size=None, dtype="bf16", hw="h200", kv_dtype=None):
        seen.update(world=world, context=context, batch=batch_size, dtype=dtype, kv_dtype=kv_dtype)
        return {"kvp": 1, "tpa": 1, "tpf": 1, "ep": 1}

    monkeypatch.setattr(helix_compile.planner, "choose_layout", spy)
    cache = StaticCache(_config(8, 4), 3, 40, "auto", dtype=torch.float32)
    assert seen == {"world": 1, "context": 40, "batch": 3, "dtype": torch.float32, "kv_dtype": torch.float32}
    assert cache.layout == Layout(1)
    StaticCache(_config(8, 4), 3, 40, "auto", dtype=torch.bfloat16)
    assert seen["dtype"] == seen["kv_dtype"] == torch.bfloat16
    StaticCache(_config(8, 4), 3, 40, "auto", dtype=torch.bfloat16, kv_dtype=torch.float8_e4m3fn)
    assert seen["dtype"] == torch.bfloat16 and seen["kv_dtype"] == torch.float8_e4m3fn


def test_diffllama_planned_with_the_backends_head_parts_rule():
    """DiffLLaMA (Q=8, K=4, heads in 2 parts: layout._HEAD_PARTS) on 4 ranks: Layout.validate refuses tpa=4 (K/2 = 2
    KV heads per part), so the enumeration holds exactly kvp=4 x tpa=1 and kvp=2 x tpa=2 (neither Helix's kvp=1 x
    tpa=4 nor the TP baseline), and choose_layout picks one of them at short and long context; on 8 ranks none
    runs, and choose_layout says why."""
    from helix_compile.planner import get_model
    from helix_compile.planner.enumerate import helix_layouts, strategy_layouts

    cfg = config("diffllama")
    m = get_model(cfg)
    runs = {(lay.kvp, lay.tpa) for lay in _backend_runs(cfg, 4)}
    assert m.head_parts == 2 and runs == {(4, 1), (2, 2)}
    enumerated = {(kvp, tpa) for kvp, tpa, *_ in helix_layouts(m, 4) + strategy_layouts(m, "tp", 4)}
    assert enumerated == runs
    for context, batch in POINTS:
        lay = Layout(**choose_layout(cfg, 4, context, batch_size=batch, dtype=torch.float32))
        lay.validate(cfg, world_size=4)
    with pytest.raises(ValueError, match=r"no layout of diffllama runs on 8 GPUs: .*pairs query head h with h \+ 4"):
        choose_layout(cfg, 8, 64, dtype=torch.float32)
