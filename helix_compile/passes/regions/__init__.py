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
                              ``ctx`` is a ``RewriteContext`` (layout, rank, heads, process group names)

A new region kind (MoE, MLA) adds a module with a ``match_*`` function and its match dataclass, and one line in
``detect.detect``.
"""

from __future__ import annotations

import dataclasses

from .attention import AttentionMatch, match_attention  # noqa: F401
from .common import UnsupportedModelError, module_path  # noqa: F401
from .dense_ffn import DenseFFNMatch, match_dense_ffn  # noqa: F401
from .mla import MLAMatch, match_mla  # noqa: F401
from .moe import MoEMatch, match_moe  # noqa: F401
from .roles import Heads, Pieces, role_shard  # noqa: F401


@dataclasses.dataclass
class RewriteContext:
    """What a match's ``replace_with`` needs to know about this rank (from the plan)."""

    layout: object
    rank: int
    heads: Heads
    kvp_group: str | None
    tpa_group: str | None
    world_group: str | None

    @property
    def kvp_rank(self) -> int:
        return self.layout.kvp_rank(self.rank)

    @property
    def split(self) -> list[int]:
        """Query heads each KVP rank holds after the all-to-all (Layout.head_split of the TPA slice)."""
        return self.layout.head_split(self.heads.q // self.layout.tpa)
