"""Pass 2, plan: the placements of one rank, a placement for every graph input, as plain data.

Contract
    in:  ``Regions`` from detect, the model config, the ``Layout`` and this rank.
    out: ``Placements``: for every placeholder name either ``replicate``, a ``Shard(dim, start, stop)`` / ``Pieces`` of a
         parameter, or ``kv`` (a cache tensor whose local shard lives in the helix StaticCache); and the regions
         left whole with their bytes per rank (also warned about); ``kv_dtype``: "float8_e4m3fn" when the cache
         shards are FP8 (the partition then adds each cache input's scale as an input of the local graph).
         Serialisable (``to_json``). The graph is not changed.

Pseudo-code
    for each match of detect:  for (placeholder, role, kind) in match.placements(heads):
        inputs[placeholder] = "kv" if role == "kv" else role_shard(role, kind, shape, heads, layout, rank)
    for each region left whole: warn, and record its parameter bytes (each rank holds all of them)

Which rows and columns each role gets is written once, in ``regions/roles.py`` (``role_shard``): the q/k/v rows
of the TPA slice, the o_proj columns of the heads after the all-to-all, the FFN's intermediate features, the
routed experts of a MoE block (ep x tpf), the latent cache of MLA.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

from ..layout import Layout
from ..shards import ExpertShard, Shard
from .detect import Regions
from .regions.roles import ROLE_BY_NAME, Heads, Pieces, role_shard  # noqa: F401  (re-exported)


@dataclasses.dataclass
class Placements:
    layout: Layout
    rank: int
    heads: Heads
    inputs: dict[str, object]  # placeholder name -> "replicate" | "kv" | Shard | Pieces | ExpertShard
    roles: dict[str, str]  # placeholder name -> role.kind, for the sharded ones
    whole: dict[str, int] = dataclasses.field(default_factory=dict)  # module left whole -> its bytes on every rank
    kv_dtype: str | None = None  # "float8_e4m3fn" for an FP8 cache; None: the shards hold the model's dtype

    def to_json(self) -> str:
        def enc(p):
            return dataclasses.asdict(p) if isinstance(p, (Shard, Pieces, ExpertShard)) else p

        heads = dataclasses.asdict(self.heads)
        if not heads["latent"]:
            del heads["latent"]  # plans without MLA carry no latent entry
        if not heads["per_layer"]:
            del heads["per_layer"]  # nor plans of models whose layers share one shape
        for layer in [heads, *heads.get("per_layer", ())]:
            if layer["dv"] == layer["d"]:
                del layer["dv"]  # nor plans whose values are as wide as the keys
            if layer["parts"] == 1:
                del layer["parts"]  # nor plans whose heads are independent
        data = {
            "layout": dataclasses.asdict(self.layout),
            "rank": self.rank,
            "heads": heads,
            "inputs": {k: enc(v) for k, v in self.inputs.items() if v != "replicate"},
            "roles": self.roles,
        }
        if self.kv_dtype is not None:
            data["kv_dtype"] = self.kv_dtype
        if self.whole:
            data["whole"] = {m: {"bytes_per_rank": b} for m, b in self.whole.items()}
        return json.dumps(data, indent=1, sort_keys=True)


def _example_shape(node):
    val = node.meta.get("example_value")
    return tuple(val.shape) if val is not None else None


def _nbytes(node) -> int:
    val = node.meta.get("example_value")
    return int(val.numel() * val.element_size()) if val is not None else 0


def place(gm, regions: Regions, config, layout: Layout, rank: int, kv_dtype: str | None = None) -> Placements:
    heads = Heads.of(config)
    inputs = {n.name: "replicate" for n in gm.graph.nodes if n.op == "placeholder"}
    roles: dict[str, str] = {}
    for match in regions.matches:
        # layers of different shapes (Gemma 4): an attention match places with its layer's heads (FFN roles use none)
        mh = heads.layer(match.layer) if heads.per_layer and match.kind == "attention" else heads
        for node, role, kind in match.placements(mh):
            if role == "kv":
                inputs[node.name] = "kv"
                continue
            spec = role_shard(role, kind, _example_shape(node), mh, layout, rank)
            roles[node.name] = f"{role}.{kind}"
            if spec is not None:
                inputs[node.name] = spec
    whole = {}
    for region in regions.whole:
        size = sum(_nbytes(p) for p in region.parameters())
        whole[region.module] = size
        if layout.world_size > 1:
            warnings.warn(
                f"helix leaves {region.module} whole: its projections {[p.name for p in region.projections]} are "
                f"replicated, {size} bytes on every rank (no region matcher claims them)",
                stacklevel=2,
            )
    return Placements(layout, rank, heads, inputs, roles, whole, kv_dtype)
