"""Roles of parameters and their shards: the single source of truth for which rows or columns a rank holds.

Both the plan pass (parameters found in the graph by the region matchers) and ``loading.from_pretrained``
(parameters found by name in a checkpoint) ask ``role_shard``; they cannot disagree.

Rank r: kvp_rank = r // tpa, tpa_rank = r % tpa, N = kvp * tpa, D = head_dim (queries, keys), Dv = the values' head
dim (D but for MiMo-V2-Flash), Q / K query / KV heads (``Heads``: as the model builds them), I the FFN
intermediate size. Rows are output features of an ``nn.Linear`` weight (out, in); a Conv1D weight (GPT-2) is
stored transposed (in, out): its kind is ``weight_t`` and the same rows are its columns.

    q, k, v      rows of the TPA slice's heads: [tpa_rank*Q/tpa, (tpa_rank+1)*Q/tpa) * D (k, v: K instead of Q;
                 v: Dv instead of D; ``head_ranges``); heads in p parts (DiffLLaMA's pairs h, h + Q/2): the same
                 block of each part (Pieces), e.g. Q=8, tpa=2, rank 1: query heads [2, 4) and [6, 8)
    qkv          fused [q; k; v] rows (Phi-3 qkv_proj, GPT-2 c_attn): the q, k and v rows above, concatenated
    qkv_heads    fused per-head [q_h k_h v_h] rows (GPT-NeoX query_key_value, MHA): [h0*3D, h1*3D); per group of g
                 query heads [q_1..q_g k v] (Falcon-40B, the cache holding Q heads): [h0/g*(g+2)*D, h1/g*(g+2)*D);
                 CodeGen's qkv_proj ([q v k] of each group of heads) holds 3D rows a head too, so a TPA slice of
                 whole groups is [h0*3D, h1*3D) as well; with one KV head (Falcon's multi-query
                 query_key_value, [q_1..q_Q k v]) the rows of qkv
    q_heads      one value per query head (attention sinks): the TPA slice's Q/tpa heads
    q_norm, k_norm  a norm over all heads' features (OLMo2): the same rows as q / k; a per-head norm (Qwen3,
                 weight of D elements) is replicated
    o            columns (Dv per head) of the heads r holds after the all-to-all (Layout.head_split); its bias is added once,
                 after the all-reduce
                 (p parts: the rank's heads after the all-to-all are the same block of each part, whose outputs the
                 model combines pair by pair into Q/p heads of p*Dv features: the same columns)
    o_gate       rows (and bias) of an output gate projection (o = attn * act(gate_proj(x)), AFMoE, HRM, Laguna):
                 those heads' rows, one per feature (Q*D rows) or one per head (Q rows)
    o_norm       the 1-D weight of a norm over all heads' features between attention and o (BitNet attn_sub_norm):
                 the features of those heads
    ffn_in       rows [r*I/N, (r+1)*I/N) (a dense FFN is TP over all N ranks, also in a MoE model)
    ffn_in_pair  fused [gate; up] rows (Phi-3 gate_up_proj): that range of each half, concatenated
    ffn_out      columns [r*I/N, (r+1)*I/N); bias after the all-reduce
    experts_gate_up, experts_down
                 fused 3-D routed-expert weights: experts split over ep, each TP-split over tpf (``moe.expert_shard``);
                 kind weight_t: stored (E, in, out) (Aria); kind bias: the experts' (E, 2I) / (E, H) biases
    MLA (Heads.latent)  q/kv projections replicated (tpa = 1); o as above with D = v_head_dim
"""

from __future__ import annotations

import dataclasses
import re

import torch

from ...layout import Layout, layer_shapes, mla_latent
from ...shards import Shard

# HF parameter names (for loading checkpoints before any graph exists). A "parent.name" key wins over "name".
ROLE_BY_NAME = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
    "gate_proj": "ffn_in", "up_proj": "ffn_in", "down_proj": "ffn_out",
    "qkv_proj": "qkv", "gate_up_proj": "ffn_in_pair",  # Phi-3
    "attn.qkv_proj": "qkv_heads",  # CodeGen: rows [q v k] per group of heads (heads.py, per_group_qkv)
    "query_key_value": "qkv_heads", "attention.dense": "o",  # GPT-NeoX
    "dense_h_to_4h": "ffn_in", "dense_4h_to_h": "ffn_out",
    "attn.c_attn": "qkv", "attn.c_proj": "o", "mlp.c_fc": "ffn_in", "mlp.c_proj": "ffn_out",  # GPT-2 (Conv1D)
    "q_norm": "q_norm", "k_norm": "k_norm",
    "self_attn.gate_proj": "o_gate", "self_attn.g_proj": "o_gate",  # gated attention output (AFMoE, HRM, Laguna)
    "attn_sub_norm": "o_norm", "ffn_sub_norm": "ffn_in",  # BitNet: norms over all heads / intermediate features
    "fc1": "ffn_in", "fc2": "ffn_out", "self_attn.dense": "o",  # Phi
    "experts.gate_up_proj": "experts_gate_up", "experts.down_proj": "experts_down",  # fused MoE experts (5.x)
    # BERT-style layers (BERT, RoBERTa, ELECTRA, RemBERT, RoFormer, ...): attention.self.{query,key,value},
    # attention.output.dense; the FFN pair intermediate.dense / output.dense (the longest key wins)
    "self.query": "q", "self.key": "k", "self.value": "v", "attention.output.dense": "o",
    "intermediate.dense": "ffn_in", "output.dense": "ffn_out",
    "experts.gate_up_proj_bias": "experts_gate_up", "experts.down_proj_bias": "experts_down",
}


@dataclasses.dataclass(frozen=True)
class Heads:
    q: int  # num_attention_heads
    k: int  # KV heads of the cache (``layout.attention_shape``; 1 for MLA: one latent head)
    d: int  # head_dim of the queries and keys (for MLA: v_head_dim, the attention output's)
    latent: bool = False  # MLA: q/kv projections stay whole (tpa = 1)
    per_layer: tuple = ()  # layers of different shapes (Gemma 4's global_head_dim): each layer's Heads; q/k/d: layer 0's
    dv: int | None = None  # head_dim of the values and the attention output (MiMo-V2-Flash: narrower); None: d
    parts: int = 1  # heads in parts that the attention pairs up (DiffLLaMA: 2; ``layout.attention_shape``)

    def __post_init__(self):
        if self.dv is None:
            object.__setattr__(self, "dv", self.d)

    @classmethod
    def of(cls, config) -> "Heads":
        """Each decoder layer's heads as the model builds them (``layout.attention_shape``); ``per_layer`` when the
        layers differ (Gemma 4's full-attention layers, MiMo-V2-Flash's sliding layers with twice the KV heads)."""
        latent = mla_latent(config) is not None and not getattr(config, "is_heterogeneous", False)
        layers = tuple(cls(s.q, 1, s.dv, True) if latent else cls(s.q, s.k, s.d, dv=s.dv, parts=s.parts)
                       for s in layer_shapes(config))
        return dataclasses.replace(layers[0], per_layer=layers) if len(set(layers)) > 1 else layers[0]

    def layer(self, index: int | None) -> "Heads":
        """The heads of decoder layer ``index`` (the same for every layer unless ``per_layer``)."""
        if not self.per_layer:
            return self
        if index is None:
            raise ValueError(f"the layers have different attention shapes {self.per_layer}: a layer index is needed")
        return self.per_layer[index]

    def of_name(self, name: str) -> "Heads":
        """The heads of the decoder layer a checkpoint tensor ``name`` (``...layers.<i>....``) belongs to."""
        found = re.search(r"(?:^|\.)layers\.(\d+)\.", name) if self.per_layer else None
        return self.layer(int(found.group(1))) if found else self


@dataclasses.dataclass(frozen=True)
class Pieces:
    """Rank-local piece made of several ranges of one dim, concatenated (a fused projection's share)."""

    dim: int
    ranges: tuple  # ((start, stop), ...)

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor.narrow(self.dim, a, b - a) for a, b in self.ranges], dim=self.dim)

    @property
    def size(self) -> int:
        return sum(b - a for a, b in self.ranges)


def head_ranges(heads: Heads, layout: Layout, rank: int) -> tuple[list, list]:
    """([first, stop) of the query heads, [first, stop) of the KV heads) that ``rank``'s TPA slice holds, one range
    per part of the heads (``Heads.parts``), in the order the rank holds them.

    One part: query heads [t*Q/tpa, (t+1)*Q/tpa) and ``Layout.kv_heads``. p parts (DiffLLaMA, p = 2: query head h
    pairs with h + Q/2, KV head g with g + K/2): the same block of each part, so that the rank's heads are whole
    pairs, e.g. Q=8, K=4, tpa=2, rank 1: query heads [2, 4) and [6, 8), KV heads [1, 2) and [3, 4)."""
    p, t = heads.parts, layout.tpa_rank(rank)
    per_q = heads.q // p // layout.tpa
    q = [(i * heads.q // p + t * per_q, i * heads.q // p + (t + 1) * per_q) for i in range(p)]
    first, stop = layout.kv_heads(heads.k // p, rank)  # tpa <= K/p for p > 1 (Layout.validate)
    return q, [(i * heads.k // p + first, i * heads.k // p + stop) for i in range(p)]


def _rows(ranges, width: int, offset: int = 0) -> tuple:
    """Rows of heads: [a, b) as [offset + a*width, offset + b*width), for each range."""
    return tuple((offset + a * width, offset + b * width) for a, b in ranges)


def _piece(rows: tuple):
    """Shard of one range of rows, Pieces of several (one per part, concatenated)."""
    return Shard(0, *rows[0]) if len(rows) == 1 else Pieces(0, rows)


def role_shard(role: str, kind: str, shape, heads: Heads, layout: Layout, rank: int):
    """The shard (``Shard``, ``Pieces`` or None = replicated) of a parameter with this role on ``rank``.

    ``kind`` is 'weight', 'weight_t' (a Conv1D weight, stored (in, out)) or 'bias'; ``shape`` its global shape.
    """
    if role in ("experts_gate_up", "experts_down"):  # 3-D: weight_t is the (E, in, out) layout (Aria), see moe.py
        from .moe import expert_shard

        return expert_shard(role, shape, layout, rank, kind)
    if kind == "weight_t":
        spec = role_shard(role, "weight", tuple(reversed(shape)), heads, layout, rank)
        return None if spec is None else dataclasses.replace(spec, dim=1 - spec.dim)
    tpa_rank, kvp_rank = layout.tpa_rank(rank), layout.kvp_rank(rank)
    if heads.latent and role in ("q", "k", "v", "qkv", "q_norm", "k_norm"):
        return None  # MLA: tpa = 1, every rank projects all heads (its own KV lives in the latent cache shard)
    d, dv = heads.d, heads.dv
    q_heads, kv_heads = head_ranges(heads, layout, rank)  # tpa > K (TP baseline): the one KV head the slice reads
    if role == "q":
        return _piece(_rows(q_heads, d))
    if role == "q_heads":  # one value per query head (attention sinks): the TPA slice's heads
        return _piece(_rows(q_heads, 1))
    if role in ("k", "v"):
        return _piece(_rows(kv_heads, d if role == "k" else dv))
    if role in ("q_norm", "k_norm"):
        full = (heads.q if role == "q_norm" else heads.k) * d
        rows = _rows(q_heads if role == "q_norm" else kv_heads, d)
        # one head (a layer with one KV head, Gemma 4's full-attention layers): per head and over all heads are the
        # same D elements, which every rank holds whole
        whole = rows == ((0, full),)
        return _piece(rows) if shape[0] == full and layout.tpa > 1 and not whole else None
    if heads.parts > 1 and role in ("qkv_heads", "o_gate", "o_norm"):
        raise ValueError(f"a {role} parameter of heads in {heads.parts} parts ({heads}) is not supported")
    q_rows = (q_heads[0][0] * d, q_heads[0][1] * d)  # one part from here on
    if role == "qkv_heads" and heads.k == 1 < heads.q and shape[0] == (heads.q + 2) * d:
        role = "qkv"  # multi-query [q_1..q_Q k v] (Falcon's query_key_value with multi_query): q rows, k, v
    if role == "qkv":
        qd, kd = heads.q * d, heads.k * d
        return Pieces(0, _rows(q_heads, d) + _rows(kv_heads, d, qd) + _rows(kv_heads, dv, qd + kd))
    if role == "qkv_heads":  # per group of g query heads: [q_1..q_g k v] (g = 1: GPT-NeoX; Falcon-40B: g = Q/Kc)
        if heads.q != heads.k or dv != d:
            raise ValueError(f"a per-head interleaved qkv projection needs as many KV heads as query heads ({heads})")
        groups = (shape[0] // d - heads.q) // 2  # KV heads of the fused rows, one per group
        g, first, stop = heads.q // max(groups, 1), q_rows[0] // d, q_rows[1] // d
        if groups < 1 or heads.q % groups or first % g or stop % g or (heads.q + 2 * groups) * d != shape[0]:
            raise ValueError(f"a fused qkv of {shape[0]} rows in groups of [q.. k v] ({groups} groups of "
                             f"{heads.q // max(groups, 1)} query heads) does not split into whole groups over the query "
                             f"heads [{first}, {stop}) of a TPA slice ({heads}); use a tpa that divides the groups")
        return Shard(0, first // g * (g + 2) * d, stop // g * (g + 2) * d)
    if role in ("o", "o_gate", "o_norm"):
        if role == "o" and kind == "bias":
            return None
        split = layout.head_split(heads.q // layout.tpa)
        h0 = tpa_rank * (heads.q // layout.tpa) + sum(split[:kvp_rank])
        if role == "o":
            return Shard(1, h0 * dv, (h0 + split[kvp_rank]) * dv)
        per = shape[0] // heads.q  # rows per head: D (per feature) or 1 (a per-head gate)
        if per * heads.q != shape[0]:
            raise ValueError(f"an {role} parameter of {shape[0]} rows is not a multiple of the {heads.q} heads")
        return Shard(0, h0 * per, (h0 + split[kvp_rank]) * per)
    if role in ("ffn_in", "ffn_out", "ffn_in_pair"):
        if role == "ffn_out" and kind == "bias":
            return None
        inter = shape[0] if role != "ffn_out" else shape[1]
        if role == "ffn_in_pair":
            inter //= 2
        n = layout.world_size
        if inter % n:
            raise ValueError(f"N={n} ranks do not divide the dense FFN intermediate size {inter}")
        per = inter // n
        r = rank
        if role == "ffn_in_pair":
            return Pieces(0, ((r * per, (r + 1) * per), (inter + r * per, inter + (r + 1) * per)))
        return Shard(0 if role == "ffn_in" else 1, r * per, (r + 1) * per)
    raise KeyError(role)


def role_by_name(name: str) -> tuple[str | None, str]:
    """(role, kind) of a checkpoint parameter by its HF name, e.g. ('q', 'weight'); (None, kind) if unsharded."""
    parts = name.split(".")
    if len(parts) < 2:
        return None, parts[-1]
    kind = parts[-1]
    if ".".join(parts[-2:]) in ROLE_BY_NAME:  # a fused expert tensor is a parameter of the experts module itself
        return ROLE_BY_NAME[".".join(parts[-2:])], "bias" if parts[-1].endswith("_bias") else "weight"
    triple, pair = ".".join(parts[-4:-1]), ".".join(parts[-3:-1])
    role = ROLE_BY_NAME.get(triple) if len(parts) >= 4 else None  # attention.output.dense before output.dense
    role = role or (ROLE_BY_NAME.get(pair) if len(parts) >= 3 else None)
    role = role or ROLE_BY_NAME.get(parts[-2])
    return role, kind
