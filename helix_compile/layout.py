"""The Helix layout: how N ranks are arranged for attention (KVP x TPA) and for the FFN (TPF x EP).

Rank order (kept here and nowhere else): rank r has attention coordinates
``kvp_rank = r // tpa`` and ``tpa_rank = r % tpa``. The KVP group of r is the set of ranks with the same
``tpa_rank``; the TPA group the ranks with the same ``kvp_rank``. For the FFN, ``ep_rank = r // tpf`` and
``tpf_rank = r % tpf``.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Layout:
    """A Helix layout: ``N = kvp * tpa = tpf * ep``.

    kvp: ranks that share the KV cache along the sequence (KV-parallel attention).
    tpa: ranks that split the attention heads (tensor-parallel attention). Helix proper has ``tpa <= K``
        (``num_key_value_heads``; tpa divides K, no KV byte duplicated). ``tpa > K`` (a multiple of K) is the
        tensor-parallel baseline of vLLM/SGLang: each TPA slice stores the one KV head its query heads read, so
        that head is duplicated over ``tpa // K`` slices (``kv_heads``).
    tpf: tensor-parallel width of the FFN; defaults to ``kvp * tpa // ep``.
    ep: expert-parallel width of an MoE FFN (1 for dense models).
    kv_block: tokens per round-robin KV block; block ``b = pos // kv_block`` lives on KVP rank ``b % kvp``, at
        local slot ``(b // kvp) * kv_block + pos % kv_block`` (``lowering.ops.local_slots`` / ``slot_positions``).
    hopb_chunks: batch chunks whose exchange overlaps the next chunk's attention (HOP-B); 1 = off.
    """

    kvp: int
    tpa: int = 1
    tpf: int | None = None
    ep: int = 1
    kv_block: int = 16
    hopb_chunks: int = 1

    def __post_init__(self):
        for name in ("kvp", "tpa", "ep", "kv_block", "hopb_chunks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Layout.{name} must be a positive int, got {value!r}")
        if self.tpf is None:
            if (self.kvp * self.tpa) % self.ep:
                raise ValueError(
                    f"Layout: N = kvp*tpa = {self.kvp}*{self.tpa} = {self.kvp * self.tpa} is not divisible by "
                    f"ep={self.ep}, so tpf = N/ep is not an integer"
                )
            object.__setattr__(self, "tpf", self.kvp * self.tpa // self.ep)
        if not isinstance(self.tpf, int) or isinstance(self.tpf, bool) or self.tpf < 1:
            raise ValueError(f"Layout.tpf must be a positive int, got {self.tpf!r}")
        if self.kvp * self.tpa != self.tpf * self.ep:
            raise ValueError(
                f"Layout: attention uses N = kvp*tpa = {self.kvp}*{self.tpa} = {self.kvp * self.tpa} ranks but the FFN "
                f"uses tpf*ep = {self.tpf}*{self.ep} = {self.tpf * self.ep}; they must be the same N"
            )

    @property
    def world_size(self) -> int:
        return self.kvp * self.tpa

    # -- rank coordinates -------------------------------------------------------------------------------------
    def kvp_rank(self, rank: int) -> int:
        return rank // self.tpa

    def tpa_rank(self, rank: int) -> int:
        return rank % self.tpa

    def ep_rank(self, rank: int) -> int:
        return rank // self.tpf

    def tpf_rank(self, rank: int) -> int:
        return rank % self.tpf

    def head_split(self, slice_heads: int) -> list[int]:
        """Query heads each KVP rank holds after the all-to-all, out of the ``slice_heads`` of its TPA slice.

        Even when possible; otherwise the first ``slice_heads % kvp`` ranks hold one more (e.g. 9 heads on
        kvp=2: [5, 4]).
        """
        base, extra = divmod(slice_heads, self.kvp)
        return [base + (1 if j < extra else 0) for j in range(self.kvp)]

    def kv_heads(self, num_kv_heads: int, rank: int) -> tuple[int, int]:
        """[first, stop) of the KV heads that ``rank`` stores and reads (the same for its whole KVP group).

        tpa <= K: the TPA slice's K/tpa heads. tpa > K (TP baseline, tpa % K == 0): the one KV head read by the
        slice's query heads, head ``tpa_rank // (tpa // K)``, duplicated over ``tpa // K`` slices.
        """
        t = self.tpa_rank(rank)
        if self.tpa <= num_kv_heads:
            per = num_kv_heads // self.tpa
            return t * per, (t + 1) * per
        head = t // (self.tpa // num_kv_heads)
        return head, head + 1

    # -- KV ownership ------------------------------------------------------------------------------------------
    def local_capacity(self, max_cache_len: int) -> int:
        """Positions a KVP rank can hold: ``ceil(S / (kv_block*kvp)) * kv_block``."""
        return math.ceil(max_cache_len / (self.kv_block * self.kvp)) * self.kv_block

    # -- validation against a model ----------------------------------------------------------------------------
    def validate(self, config, world_size: int | None = None) -> None:
        """Raise ``ValueError`` naming the rule and the numbers if this layout cannot run ``config``."""
        cls = type(config).__name__
        n = self.world_size
        if world_size is not None and world_size != n:
            raise ValueError(
                f"Layout kvp={self.kvp} x tpa={self.tpa} needs N={n} ranks, but the default process group has "
                f"world size {world_size}"
            )
        for q, k, parts, at in _attention_shapes(config):
            self._validate_heads(q, k, f"{cls}{at}", parts)
        if mla_latent(config) is not None and self.tpa != 1:
            raise ValueError(
                f"{cls} uses multi-head latent attention (MLA): its cache holds one latent KV head, so tpa must be 1 "
                f"(got tpa={self.tpa}); use kvp={n}, tpa=1"
            )
        experts = moe_experts(config)
        if experts is None:
            if self.ep != 1:
                raise ValueError(f"ep={self.ep} needs a mixture-of-experts FFN; {cls} has a dense FFN (use ep=1)")
            inter = getattr(config, "intermediate_size", None)
            for layer, width in enumerate(inter if isinstance(inter, (list, tuple)) else [inter]):  # Gemma 3n: per layer
                if width is not None and width % self.tpf:
                    at = f" (layer {layer})" if isinstance(inter, (list, tuple)) else ""
                    raise ValueError(f"tpf={self.tpf} does not divide intermediate_size={width}{at} of {cls}")
            return
        count, inter = experts
        if count % self.ep:
            raise ValueError(f"ep={self.ep} does not divide the {count} routed experts of {cls}")
        if inter % self.tpf:
            raise ValueError(f"tpf={self.tpf} does not divide the expert intermediate size {inter} of {cls}")

    def _validate_heads(self, q: int, k: int, cls: str, parts: int = 1) -> None:
        if parts > 1:  # heads in parts (DiffLLaMA): each TPA slice holds the same block of every part (roles.py)
            if q % parts or k % parts or (q // parts) % self.tpa or (k // parts) % self.tpa:
                raise ValueError(
                    f"{cls} pairs query head h with h + {q // parts} and KV head g with g + {k // parts} ({parts} "
                    f"parts of {q // parts} query and {k // parts} KV heads, {q} and {k} in all); tpa={self.tpa} must "
                    f"divide both {q // parts} and {k // parts} so that every TPA rank holds the same block of each "
                    f"part"
                )
            if (q // parts // self.tpa) % self.kvp:
                raise ValueError(
                    f"{cls} pairs query head h with h + {q // parts}: kvp={self.kvp} must divide the "
                    f"{q // parts // self.tpa} query heads a TPA slice holds of each of its {parts} parts, so that "
                    f"after the all-to-all every rank holds whole pairs (num_attention_heads={q}, tpa={self.tpa})"
                )
        if self.tpa > k and self.tpa % k:
            raise ValueError(
                f"tpa={self.tpa} exceeds num_key_value_heads={k} of {cls} and is not a multiple of it: a TPA slice's "
                f"query heads would read parts of two KV heads (use tpa dividing {k}, or a multiple of {k})"
            )
        if self.tpa <= k and k % self.tpa:
            raise ValueError(f"tpa={self.tpa} does not divide num_key_value_heads={k} of {cls}")
        if q % self.tpa:
            raise ValueError(f"tpa={self.tpa} does not divide num_attention_heads={q} of {cls}")
        if q // self.tpa < self.kvp:
            raise ValueError(
                f"kvp={self.kvp} exceeds the {q // self.tpa} query heads of a TPA slice (num_attention_heads={q} / "
                f"tpa={self.tpa}) of {cls}: after the all-to-all every rank must hold at least one query head"
            )

    def key(self) -> str:
        """A short stable string, used in compiled-artifact keys and file names."""
        return (
            f"kvp{self.kvp}-tpa{self.tpa}-tpf{self.tpf}-ep{self.ep}-blk{self.kv_block}-hopb{self.hopb_chunks}"
        )

    # -- process groups ----------------------------------------------------------------------------------------
    def group_names(self) -> tuple[str, str]:
        """(KVP group name, world group name) for functional collectives, from one (kvp, tpa) DeviceMesh.

        Built once per (kvp, tpa) and process; every rank must call it in the same order (it is collective).
        """
        return _group_names(self.kvp, self.tpa)[:2]

    def tpa_group_name(self) -> str:
        """Name of this rank's TPA group (the ranks with the same ``kvp_rank``), from the same DeviceMesh: the
        all-reduce of a norm over all heads' features (OLMo2's q/k norm) runs over it."""
        return _group_names(self.kvp, self.tpa)[2]


def _attention_shapes(config) -> list[tuple[int, int, int, str]]:
    """(query heads, KV heads, head parts, where) of the model's layers (``attention_shape``): one entry, or one per
    distinct shape of a model whose layers differ (Gemma 4's full-attention layers, MiMo-V2-Flash's sliding layers)."""
    shapes = {}
    for i, s in enumerate(layer_shapes(config)):
        shapes.setdefault((s.q, s.k, s.parts), i)
    if len(shapes) > 1:
        return [(q, k, parts, f" (layer {i})") for (q, k, parts), i in shapes.items()]
    ((q, k, parts),) = shapes
    return [(q, k, parts, "")]


_GROUPS: dict[tuple[int, int], tuple[str, str, str]] = {}


def _group_names(kvp: int, tpa: int) -> tuple[str, str, str]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    cached = _GROUPS.get((kvp, tpa))
    if cached is not None and not _alive(cached[0]):
        cached = None  # the default group was destroyed and re-created since
    if cached is None:
        if not dist.is_initialized():
            raise RuntimeError(
                f"helix layout kvp={kvp} x tpa={tpa} needs torch.distributed: call "
                f"dist.init_process_group(...) with {kvp * tpa} ranks first"
            )
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        mesh = init_device_mesh(device_type, (kvp, tpa), mesh_dim_names=("kvp", "tpa"))
        _GROUPS[(kvp, tpa)] = (
            mesh.get_group("kvp").group_name, dist.group.WORLD.group_name, mesh.get_group("tpa").group_name
        )
    return _GROUPS[(kvp, tpa)]


def current_world() -> tuple[int, int]:
    """(rank, world_size) of the default process group; (0, 1) when torch.distributed is not initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1



def _alive(group_name: str) -> bool:
    from torch.distributed.distributed_c10d import _resolve_process_group

    try:
        _resolve_process_group(group_name)
        return True
    except (RuntimeError, ValueError, KeyError):
        return False


def group_ranks(group_name: str) -> list[int]:
    """Global ranks of a process group given its name (for readable graph text)."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    return dist.get_process_group_ranks(_resolve_process_group(group_name))


# -- model families whose shapes change the layout rules ----------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """What one decoder layer's attention builds: ``q`` query heads, ``k`` KV heads in its cache (what the model's
    ``cache.update`` receives, which is not always the config's ``num_key_value_heads``), keys (and queries) of
    ``d`` features per head, values of ``dv`` (the attention output's features per head), heads in ``parts`` equal
    parts that the attention pairs up (``_HEAD_PARTS``; 1: heads independent)."""

    q: int
    k: int
    d: int
    dv: int
    parts: int = 1


def _falcon_kv_heads(config, layer: int) -> int:
    """FalconAttention: the new decoder architecture (Falcon-40B) broadcasts each of its ``num_kv_heads`` KV heads
    over its query group *before* the cache (``_split_heads``: ``broadcast_to(key, query.shape)``), so the cache holds
    one KV head per query head; otherwise ``multi_query`` (the default) means one KV head, and ``num_kv_heads`` the
    rest (transformers/models/falcon/modeling_falcon.py, FalconAttention.__init__ and forward)."""
    if getattr(config, "new_decoder_architecture", False):  # FalconConfig's defaults where a config.json omits them
        return config.num_attention_heads
    if getattr(config, "multi_query", True):
        return 1
    return getattr(config, "num_kv_heads", None) or config.num_attention_heads


def _mimo_kv_heads(config, layer: int) -> int:
    """MiMoV2FlashAttention: sliding-window layers have twice ``num_key_value_heads`` (and attention sinks)."""
    kinds = getattr(config, "layer_types", None) or ()  # a config.json without it: MiMo's default pattern unknown
    twice = layer < len(kinds) and kinds[layer] == "sliding_attention"
    return config.num_key_value_heads * (2 if twice else 1)


# model_type -> KV heads of layer i, for families whose attention does not build ``num_key_value_heads`` KV heads
_KV_HEADS = {"falcon": _falcon_kv_heads, "mimo_v2_flash": _mimo_kv_heads}

# model_type -> head parts p: families whose attention combines query head h with h + Q/p and reads KV head g with
# g + K/p. DiffLlamaAttention.forward (transformers/models/diffllama/modeling_diffllama.py) chunks the cached values
# into two halves of KV heads (torch.chunk(value_states, 2, dim=1), each .repeat(1, 2, 1, 1)), attends to each, and
# combines the outputs' two halves of query heads (torch.chunk(attn_output, 2, dim=2); o1 - lambda * o2). Helix
# gives each rank the same block of every part (roles.py: q/k/v rows; the exchange in attention.py), so its local
# program is the same program over fewer heads; the attention matcher proves it from the graph and refuses a graph
# whose parts differ. Known here, from the config, because loading a checkpoint slices rows before any graph exists.
_HEAD_PARTS = {"diffllama": 2}


def attention_shape(config, layer: int = 0) -> AttentionShape:
    """The attention shape of decoder layer ``layer`` as the model builds it (the one place helix derives KV heads and
    head dims from a config: the cache, ``Layout.validate``, the plan's ``Heads`` and the planner ask it).

    A heterogeneous config (Gemma 4's full-attention layers, ``per_layer_config``) gives the layer's own; MLA has one
    latent KV "head" (keys of qk_nope + qk_rope features, values of ``v_head_dim``); ``v_head_dim`` otherwise sets
    values narrower than the keys (MiMo-V2-Flash); ``_KV_HEADS`` has the families whose KV heads differ from
    ``num_key_value_heads`` (default: the query heads), ``_HEAD_PARTS`` those whose heads pair up across parts.
    """
    if getattr(config, "is_heterogeneous", False):
        config = config.per_layer_config[layer]
    q = config.num_attention_heads
    if mla_latent(config) is not None:  # (the planner's stand-in configs have the latent sizes only)
        nope, v = getattr(config, "qk_nope_head_dim", None) or 0, getattr(config, "v_head_dim", None) or 0
        return AttentionShape(q, 1, nope + config.qk_rope_head_dim, v)
    d = getattr(config, "head_dim", None) or (getattr(config, "hidden_size", None) or 0) // q  # 0: a stand-in
    family = _KV_HEADS.get(getattr(config, "model_type", None))
    k = family(config, layer) if family is not None else getattr(config, "num_key_value_heads", None) or q
    # the planner's stand-in carries the parts this function gave for the real config (ModelSpec.head_parts)
    parts = _HEAD_PARTS.get(getattr(config, "model_type", None)) or getattr(config, "head_parts", None) or 1
    return AttentionShape(q, k, d, getattr(config, "v_head_dim", None) or d, parts)


def layer_shapes(config) -> list[AttentionShape]:
    """``attention_shape`` of every decoder layer (of one, for a stand-in config without num_hidden_layers)."""
    return [attention_shape(config, i) for i in range(getattr(config, "num_hidden_layers", None) or 1)]


def mla_latent(config) -> tuple[int, int] | None:
    """(kv_lora_rank, qk_rope_head_dim) of a multi-head latent attention model (DeepSeek-V2/V3), else None.

    transformers 5.x caches these two latents per position (one KV "head"), not per-head keys and values.
    """
    rank = getattr(config, "kv_lora_rank", None)
    if not rank:
        return None
    return rank, config.qk_rope_head_dim


def moe_experts(config) -> tuple[int, int] | None:
    """(routed experts, intermediate size of one expert) of a mixture-of-experts config, else None.

    Spellings differ by family: ``num_local_experts`` (Mixtral), ``num_experts`` (Qwen-MoE, OLMoE),
    ``n_routed_experts`` (DeepSeek), ``moe_num_experts`` (Aria); ``moe_intermediate_size`` when the family also has dense layers.
    """
    for name in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"):
        count = getattr(config, name, None)
        if isinstance(count, int) and count > 0:
            inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
            return count, inter
    return None
