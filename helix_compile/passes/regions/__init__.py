"""Region matchers: one small module per region kind, each owning its placements and its rewrite.

    attention.py   softmax attention over the helix KV cache (MHA/GQA/MQA, fused qkv, soft-capping, windows), in
                   parts: attention_core.py (finding the core), attention_masks.py (checking the mask),
                   attention_projections.py (checking the heads), attention_values.py (routing values),
                   attention_rewrite.py (the rewrite, the exchange and merge)
    dense_ffn.py   a dense MLP, tensor-parallel over all ranks (fused gate_up too)
    moe.py         a mixture-of-experts block: routed experts as TPF x EP, router replicated, shared experts dense
    ffn_kind.py    ``is_moe``: which of the two FFN matchers owns a block
    mla.py         multi-head latent attention (DeepSeek): the latent cache sharded over kvp = N, tpa = 1
    projection.py  plain and fused projections (nn.Linear, transformers' Conv1D) and their column/row rewrites
    roles.py       which rows/columns of a parameter a rank holds (shared with ``loading.from_pretrained``)
and what they share: common.py, heads.py, rope.py, alibi.py, sinks.py, chunks.py, where_mask.py (docs/architecture.md).

The interface of a match (a dataclass, in the style of Inductor's ``micro_pipeline_tp``):
    kind                      "attention", "ffn", ...
    module                    the HF module path it covers
    describe() -> str         one line of detect.txt
    placements_nodes()        the placeholders it places (detect reports the unplaced ones as left whole)
    placements(heads)         [(placeholder node, role, kind)]: the plan pass resolves each with
                              ``roles.role_shard`` (role "kv" marks a cache tensor)
    replace_with(graph, env, ctx)
                              the partition pass's rewrite, on the copied graph (``env``: name -> node);
                              ``ctx`` is a ``RewriteContext`` (layout, rank, heads, process group names,
                              and ``kv_scale`` for a cache whose shards are FP8)

A new region kind (MoE, MLA) adds a module with a ``match_*`` function and its match dataclass, and one line in
``detect.detect``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from .attention import AttentionMatch, match_attention  # noqa: F401
from .common import UnsupportedModelError, module_path  # noqa: F401
from .dense_ffn import DenseFFNMatch, match_dense_ffn  # noqa: F401
from .mla import MLAMatch, match_mla  # noqa: F401
from .moe import MoEMatch, match_moe  # noqa: F401
from .roles import Heads, Pieces, role_shard  # noqa: F401


KV_SCALE_OF = "helix_kv_scale_of"  # meta key of a local input that is the scale of an FP8 cache input


@dataclasses.dataclass
class RewriteContext:
    """What a match's ``replace_with`` needs to know about this rank (from the plan)."""

    layout: object
    rank: int
    heads: Heads
    kvp_group: str | None
    tpa_group: str | None
    world_group: str | None
    kv_fp8: bool = False  # the cache shards hold float8_e4m3fn, with per-head scales (cache.py)
    _scales: dict = dataclasses.field(default_factory=dict)

    def kv_scale(self, graph: fx.Graph, cache: fx.Node, local_heads: int) -> fx.Node | None:
        """The fp32 (local_heads,) scale of the FP8 cache tensor ``cache`` (a placeholder) as a new input of the
        local graph, made once per cache tensor and placed after every other input (``KV_SCALE_OF`` in its meta
        names the cache input it belongs to: the backend's ``Runtime`` passes that tensor's registered scale);
        None when the cache is not FP8."""
        if not self.kv_fp8:
            return None
        if cache.op != "placeholder":
            raise UnsupportedModelError(f"an FP8 KV cache needs the cache tensor as a graph input, not {cache.name}")
        node = self._scales.get(cache.name)
        if node is None:
            last = [n for n in graph.nodes if n.op == "placeholder"][-1]
            with graph.inserting_after(last):
                node = graph.placeholder(f"{cache.name}_scale")
            node.meta[KV_SCALE_OF] = cache.name
            like = cache.meta.get("example_value")
            if like is not None and getattr(like, "fake_mode", None) is not None:
                with like.fake_mode:
                    node.meta["example_value"] = torch.empty((local_heads,), dtype=torch.float32, device=like.device)
            self._scales[cache.name] = node
        return node

    @property
    def kvp_rank(self) -> int:
        return self.layout.kvp_rank(self.rank)

    @property
    def split(self) -> list[int]:
        """Query heads each KVP rank holds after the all-to-all (Layout.head_split of the TPA slice)."""
        return self.layout.head_split(self.heads.q // self.layout.tpa)
