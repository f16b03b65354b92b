"""Pass 2, plan: a placement for every graph input of one rank, as plain data.

Contract
    in:  ``Regions`` from detect, the model config, the ``Layout`` and this rank.
    out: ``Plan``: for every placeholder name either ``replicate``, a ``Shard(dim, start, stop)`` of a parameter,
         or ``kv`` (a cache tensor whose local shard lives in the helix StaticCache). Serialisable (``to_json``).
         The graph is not changed.

Placements (rank r, kvp_rank = r // tpa, tpa_rank = r % tpa, D = head_dim, N = kvp*tpa):
    q_proj rows      query heads of the TPA slice:   [tpa_rank*Q/tpa, (tpa_rank+1)*Q/tpa) * D  (+bias)
    k_proj, v_proj   KV heads of the TPA slice:      [tpa_rank*K/tpa, (tpa_rank+1)*K/tpa) * D  (+bias)
    o_proj columns   the heads r holds after the all-to-all: its TPA slice split over KVP ranks
                     (Layout.head_split: Q/N each when N divides Q), h0 = tpa_rank*Q/tpa + heads of lower
                     kvp ranks, columns [h0, h0 + split[kvp_rank]) * D; bias after the all-reduce
    FFN in (gate/up) rows    [r*I/N, (r+1)*I/N): a dense FFN is TP over all N ranks (also the dense layers and
                             shared experts of a MoE model, whose ep > 1 applies to the routed experts only)
    FFN out (down) columns   [r*I/N, (r+1)*I/N); bias after the all-reduce
    routed experts           experts split over ep, each TP-split over tpf (``moe.expert_shard``)
    MLA (tpa = 1)            q/kv projections replicated; o_proj columns as above with D = v_head_dim;
                             the latent cache ``kv``
    everything else          replicated
"""

from __future__ import annotations

import dataclasses
import json

from ..layout import Layout, mla_latent
from ..shards import Shard
from . import moe as _moe
from .detect import Regions

ROLE_BY_NAME = {  # HF parameter names (for loading checkpoints before any graph exists)
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
    "gate_proj": "ffn_in", "up_proj": "ffn_in", "down_proj": "ffn_out",
}
EXPERT_ROLES = _moe.ROLES  # fused expert weights, by parameter name: experts.gate_up_proj / experts.down_proj


@dataclasses.dataclass(frozen=True)
class Heads:
    q: int  # num_attention_heads
    k: int  # num_key_value_heads (1 for MLA: one latent head)
    d: int  # head_dim of the attention output (v_head_dim for MLA)
    latent: bool = False  # MLA: q/kv projections stay whole (tpa = 1)

    @classmethod
    def of(cls, config) -> "Heads":
        q = config.num_attention_heads
        if mla_latent(config) is not None:
            return cls(q, 1, config.v_head_dim, True)
        k = getattr(config, "num_key_value_heads", None) or q
        d = getattr(config, "head_dim", None) or config.hidden_size // q
        return cls(q, k, d)


def role_shard(role: str, kind: str, shape, heads: Heads, layout: Layout, rank: int) -> Shard | None:
    """The shard of a parameter with this role ('q', 'k', 'v', 'o', 'ffn_in', 'ffn_out') on ``rank``.

    ``kind`` is 'weight' or 'bias'; ``shape`` its global shape. None means replicated. Also the roles of fused
    expert weights, 'experts_gate_up' and 'experts_down' (``moe.expert_shard``).
    """
    tpa_rank, kvp_rank = layout.tpa_rank(rank), layout.kvp_rank(rank)
    if role in ("q", "k", "v") and heads.latent:
        return None  # MLA: tpa = 1, every rank projects all heads (its own KV lives in the latent cache shard)
    if role == "q":
        per = heads.q // layout.tpa * heads.d
        return Shard(0, tpa_rank * per, (tpa_rank + 1) * per)
    if role in ("k", "v"):
        per = heads.k // layout.tpa * heads.d
        return Shard(0, tpa_rank * per, (tpa_rank + 1) * per)
    if role == "o":
        if kind == "bias":
            return None
        split = layout.head_split(heads.q // layout.tpa)
        h0 = tpa_rank * (heads.q // layout.tpa) + sum(split[:kvp_rank])
        return Shard(1, h0 * heads.d, (h0 + split[kvp_rank]) * heads.d)
    if role in ("ffn_in", "ffn_out"):
        if role == "ffn_out" and kind == "bias":
            return None
        inter, n = (shape[0] if role == "ffn_in" else shape[1]), layout.world_size
        if inter % n:
            raise ValueError(f"N={n} ranks do not divide the dense FFN intermediate size {inter}")
        per = inter // n
        return Shard(0 if role == "ffn_in" else 1, rank * per, (rank + 1) * per)
    if role in ("experts_gate_up", "experts_down"):
        return _moe.expert_shard(role, shape, layout, rank)
    raise KeyError(role)


@dataclasses.dataclass
class Plan:
    layout: Layout
    rank: int
    heads: Heads
    inputs: dict[str, object]  # placeholder name -> "replicate" | "kv" | Shard
    roles: dict[str, str]  # placeholder name -> role.kind, for the sharded ones

    def to_json(self) -> str:
        def enc(p):
            return dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p

        heads = dataclasses.asdict(self.heads)
        if not heads["latent"]:
            del heads["latent"]  # the dense plans read as before

        return json.dumps(
            {
                "layout": dataclasses.asdict(self.layout),
                "rank": self.rank,
                "heads": heads,
                "inputs": {k: enc(v) for k, v in self.inputs.items() if v != "replicate"},
                "roles": self.roles,
            },
            indent=1,
            sort_keys=True,
        )


def _example_shape(node):
    val = node.meta.get("example_value")
    return tuple(val.shape) if val is not None else None


def plan(gm, regions: Regions, config, layout: Layout, rank: int) -> Plan:
    heads = Heads.of(config)
    inputs = {n.name: "replicate" for n in gm.graph.nodes if n.op == "placeholder"}
    roles: dict[str, str] = {}

    def place(linear, role):
        for kind, arg in (("weight", linear.args[1]), ("bias", linear.args[2] if len(linear.args) > 2 else None)):
            if arg is None:
                continue
            if arg.op != "placeholder":
                raise ValueError(f"{role} projection '{linear.name}': its {kind} is computed in the graph, not a parameter")
            spec = role_shard(role, kind, _example_shape(arg), heads, layout, rank)
            roles[arg.name] = f"{role}.{kind}"
            if spec is not None:
                inputs[arg.name] = spec

    for a in regions.attention:
        q_rows = _example_shape(a.q_linear.args[1])[0]
        k_rows = _example_shape(a.k_linear.args[1])[0]
        if q_rows != heads.q * heads.d or k_rows != heads.k * heads.d:
            raise ValueError(
                f"{a.module}: q_proj has {q_rows} rows and k_proj {k_rows}, but the config says "
                f"{heads.q}x{heads.d} query and {heads.k}x{heads.d} key rows"
            )
        for lin, role in ((a.q_linear, "q"), (a.k_linear, "k"), (a.v_linear, "v"), (a.o_linear, "o")):
            place(lin, role)
        inputs[a.keys.name] = inputs[a.values.name] = "kv"
    for m in regions.mla:
        place(m.o_linear, "o")
        inputs[m.keys.name] = inputs[m.values.name] = "kv"
    for f in regions.ffn + [s for m in regions.moe for s in m.shared]:
        for lin in f.ins:
            place(lin, "ffn_in")
        place(f.out, "ffn_out")
    for m in regions.moe:
        for node, role in ((m.gate_up, "experts_gate_up"), (m.down, "experts_down")):
            inputs[node.name] = role_shard(role, "weight", _example_shape(node), heads, layout, rank)
            roles[node.name] = f"{role}.weight"
    return Plan(layout, rank, heads, inputs, roles)
