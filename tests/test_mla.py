"""Multi-head latent attention (DeepSeek-V2/V3) with the latent cache sharded over kvp = N (tpa = 1): exact against
single-device transformers on real gloo ranks. DeepSeek-V3 also covers its MoE: the grouped router with the
e_score_correction_bias, a shared expert and a dense first layer (TP over N while the experts use tpf x ep).
``HELIX_FULL_MATRIX=1`` runs every valid layout of 2 and 4 ranks.
"""

import os

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from helix_compile import Layout, StaticCache
from layouts import check, valid_layouts
from models import config, model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def test_mla_two_ranks():
    check(2, [
        ("deepseek_v3", dict(kvp=2, ep=2), None),
        ("deepseek_v2", dict(kvp=2, ep=1), None),  # no q LoRA (q_proj), experts split by tpf=2
    ])


def test_mla_and_moe_four_ranks():
    check(4, [
        ("deepseek_v3", dict(kvp=4, ep=2), "batched_mm"),  # tpf=2 x ep=2; 2 query heads per rank
        ("mixtral", dict(kvp=2, tpa=2, ep=2), None),  # MoE on the 2 x 2 attention grid, tpf=2 x ep=2
    ])


FULL = [(f, w, fields) for f in ("deepseek_v3", "deepseek_v2") for w in (2, 4) for fields in valid_layouts(f, w)]


@pytest.mark.skipif(os.environ.get("HELIX_FULL_MATRIX") != "1", reason="full layout matrix: HELIX_FULL_MATRIX=1")
@pytest.mark.parametrize("family,world", sorted({(f, w) for f, w, _ in FULL}))
def test_mla_every_layout(family, world):
    check(world, [(family, fields, None) for f, w, fields in FULL if (f, w) == (family, world)])


def test_mla_layout_rules():
    """MLA caches one latent head: tpa must be 1, so every valid layout is kvp = N."""
    assert {l["tpa"] for w in (2, 4) for l in valid_layouts("deepseek_v3", w)} == {1}
    with pytest.raises(ValueError, match=r"multi-head latent attention \(MLA\).*tpa must be 1 \(got tpa=2\); use kvp=4, tpa=1"):
        Layout(kvp=2, tpa=2).validate(config("deepseek_v3"))


def test_latent_cache_shard():
    """Each rank stores its share of the latent sequence only: (B, 1, capacity + 1, kv_lora_rank) keys and
    (B, 1, capacity + 1, qk_rope_head_dim) values, behind global-shaped virtual tensors."""
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=4)
    try:
        cache = StaticCache(model("deepseek_v3").config, 2, 64, Layout(4, kv_block=4))
        layer = cache.layers[1]
        assert tuple(layer.keys.shape) == (2, 1, 64, 32) and tuple(layer.values.shape) == (2, 1, 64, 8)
        assert tuple(layer.local_keys.shape) == (2, 1, 17, 32) and tuple(layer.local_values.shape) == (2, 1, 17, 8)
    finally:
        dist.destroy_process_group()
