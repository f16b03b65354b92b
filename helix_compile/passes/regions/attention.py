"""Region matcher: softmax attention over the helix KV cache (MHA / GQA / MQA; separate or fused q/k/v).

Contract
    in:  the global Dynamo graph (each attention layer's cache write is a ``helix::kv_write(keys, values, k, v,
         pos)``), the model's text config (windows, chunks, soft-capping per layer), and the writes another
         matcher claimed (``skip``: MLA).
    out: ``match_attention`` -> one ``AttentionMatch`` per cache write, and one per kv-shared reader of it, in graph
         order. A match names its projections, places its inputs (``placements``: q/k/v rows, o columns, norm
         weights, the cache) and rewrites its region on one rank's copy of the graph (``replace_with``). The graph
         is not changed.
    refuses (``UnsupportedModelError`` naming the node and module): whatever the parts below cannot prove exact.

The matcher in parts, in the order a match is built:
    attention_core.py         finding the core: the attention nodes that read the cache, their form, scale,
                              soft-cap, ALiBi bias and sink
    attention_masks.py        checking the mask: causal over positions, built from the 2-D attention_mask of
                              padded batches at most, dropout the identity
    attention_projections.py  checking the heads: the q/k/v projections behind the core and o after it, every op
                              between them per head
    attention_values.py       routing values: the cache's values to each core, whole KV heads rearranged per position
    attention_rewrite.py      the rewrite: owner-only write, partial attention, the exchange and merge, the
                              projections' shards
    this file                 the match itself: its fields, placements, per-layer facts of the config, kv-shared
                              readers
and what it shares with other matchers: ``heads.py``, ``rope.py``, ``alibi.py``, ``sinks.py``, ``chunks.py``,
``where_mask.py``, ``projection.py``.

Match (pattern), per ``helix::kv_write(keys, values, k, v, pos)`` (the cache write of one attention layer):
    core    the SDPA node, or the final matmul of the eager chain
            matmul(q, k^T) -> *scale -> [/softcap -> tanh -> *softcap] -> [+mask] -> softmax -> [to] -> [dropout]
            -> matmul(., v), whose keys/values trace back (through repeat_kv views) to the cache placeholders
            (a where(mask, scores, min) among them only where ``where_mask.py`` proves the causal mask implies it);
            or the (B*H, L, D) batched-matmul form with an optional ALiBi bias (BLOOM, XGLM: ``alibi.py``);
            several cores in the writing module over one query, each over values made of the cache's by
            per-position rearrangements of whole KV heads (DiffLLaMA: ``chunk(values, 2, dim=1)[i].repeat(1, 2, 1,
            1)``; ``ValueRoute``, proved per rank against its heads, refused by name otherwise)
    q, k, v the projection among the ancestors of the query, of k, of v inside the attention module, reached
            through per-head ops only (reshapes, elementwise ops, RoPE, per-head norms, and norms over all heads'
            features, which become exact under tpa > 1 by an all-reduce of partial sums of squares); one fused
            projection for all three (qkv) is cut by ``FusedSplit`` (or by index, BLOOM: ``alibi.IndexSplit``); values
            that are the key projection's output (Gemma 4's ``attention_k_eq_v``: v = v_norm(k_proj(x)),
            k = rope(k_norm(k_proj(x)))) share k's rows
    o       the first projection after core, only reshapes between them
    window  per layer from the config (``layer_types`` / ``sliding_window`` / ``use_sliding_window``)
    chunk   per layer from the config (``layer_types`` "chunked_attention", Llama 4), its mask checked: ``chunks.py``
    readers a core in another attention module that reads the same cache placeholders (Gemma 3n's kv-shared
            layers, ``kv_sharing_modes == "reuse"``: no k/v projections and no cache write of their own): a match
            of its own with ``shares`` = the writing module, k = v = None; its q and o as above

Sliding windows vs. KV sharding: a sliding-window layer keeps every position in the helix cache, sharded along the
sequence like a full-attention layer, and partial attention masks keys older than the window by their global
position (exact; the memory of a full layer, 1/kvp of it per rank). Sharding only the window (a rolling buffer
over kvp ranks) would save memory but move each block's owner as the window slides; it is not implemented.
A kv-shared reader is exact for the same reason: every rank holds the writer's shard, all positions, and the
reader's partial attention over that shard (with the reader's own mask and window) merges like the writer's.

The rewrite (``replace_with``, pattern ... into ...): ``attention_rewrite.py``.
"""

from __future__ import annotations

import dataclasses
import re

import torch.fx as fx

from .alibi import IndexSplit, find_index_split
from .attention_core import KV_WRITE, find_cores
from .attention_masks import find_key_mask, mask_operand
from .attention_projections import CrossHeadNorm, first_projection_after, projection_ancestor
from .attention_rewrite import rewrite
from .chunks import check_chunk_mask, layer_chunk
from .common import UnsupportedModelError, module_path, order, shape, where
from .heads import (
    GroupSlices, OutputSide, fused_rows, group_slices, head_select, head_slices, input_views, match_output,
    per_group_qkv,
)
from .projection import FusedSplit, Projection, find_split
from .rope import complex_views


@dataclasses.dataclass
class AttentionMatch:
    module: str  # e.g. "model.layers.0.self_attn"
    form: str  # "sdpa" or "eager"
    q: Projection
    k: Projection
    v: Projection
    o: Projection
    kv_write: fx.Node
    keys: fx.Node  # cache placeholders
    values: fx.Node
    pos: fx.Node  # global positions of the new tokens
    query: fx.Node  # (B, Hq, L, D) after RoPE
    core: fx.Node  # node whose output is the attention output (B, Hq, L, D)
    scale: float
    softcap: float = 0.0
    window: int = 0
    fused: str | None = None  # "qkv" (stacked q|k|v) or "qkv_heads" (per-head interleaved), None: separate
    split: FusedSplit | None = None
    norms: list = dataclasses.field(default_factory=list)  # CrossHeadNorm
    key_mask: fx.Node | None = None  # the 2-D (B, S_m) attention_mask placeholder HF's mask is built from
    alibi: object = None  # alibi.Alibi: the ALiBi bias of the scores (BLOOM), or None
    output: OutputSide | None = None  # gates and norms between core and o (heads.py)
    views: list = dataclasses.field(default_factory=list)  # heads.HeadView between q/k/v and the core
    sink: fx.Node | None = None  # a per-head attention sink parameter (Q,) (sinks.py)
    shares: str | None = None  # a kv-shared reader: the module whose cache write (``kv_write``) it reads
    layer: int | None = None  # decoder layer index (its Heads when layers differ in shape: ``Heads.layer``)
    chunk: int = 0  # chunked attention (chunks.py): keys of the query's own chunk of positions only
    routes: list = dataclasses.field(default_factory=list)  # ValueRoute of each core over this query ([] : core's
    # values are the placeholder); DiffLLaMA: two cores, each over its half of the value heads

    kind = "attention"

    def projections(self) -> set:
        """The projection nodes this region claims (q, k, v, o and output gates)."""
        gates = self.output.gates if self.output is not None else []
        return {p.node for p in (self.q, self.k, self.v, self.o, *gates) if p is not None}  # k, v: None when kv-shared

    # names kept for the backend and the schedule: the o projection's node, the q/k/v nodes
    @property
    def q_linear(self):
        return self.q.node

    @property
    def o_linear(self):
        return self.o.node

    def describe(self) -> str:
        extra = "".join(
            f" {k}={v}" for k, v in (("fused", self.fused), ("softcap", self.softcap or None), ("window", self.window or None),
                                          ("chunk", self.chunk or None))
            if v is not None
        )
        if self.norms:
            extra += f" cross_head_norms={[n.mean.name for n in self.norms]}"
        if self.output is not None and (self.output.gates or self.output.norms or self.output.cut):
            extra += self.output.describe()
        if self.routes:
            extra += " values=" + str([f"{r.core.name}: {'->'.join(op.name for op in r.ops) or self.values.name}"
                                        for r in self.routes])
        if self.shares is not None:
            return (
                f"attention {self.module} [{self.form}] q={self.q.name} reads the cache of {self.shares} "
                f"(write={self.kv_write.name}) o={self.o.name} core={self.core.name} scale={self.scale:g}{extra}"
            )
        return (
            f"attention {self.module} [{self.form}] q={self.q.name} k={self.k.name} v={self.v.name} "
            f"o={self.o.name} write={self.kv_write.name} core={self.core.name} scale={self.scale:g}{extra}"
        )

    def placements_nodes(self):
        """The placeholders this region places (whatever the heads): for the report of what is left whole."""
        projs = [p for p in (self.q, self.k, self.v, self.o) if p is not None]
        nodes = [(n, None, None) for p in projs for n in (p.weight, p.bias) if n is not None]
        nodes += [(n, None, None) for n in (self.output.nodes() if self.output is not None else [])]
        nodes += [(self.sink, None, None)] if self.sink is not None else []
        return nodes + [(w, None, None) for norm in self.norms for w in norm.weights] + [(self.keys, None, None),
                                                                                           (self.values, None, None)]

    def placements(self, heads):
        """(placeholder, role, kind) of every input this region shards; ``kv`` for the cache."""
        if self.shares is not None:  # a kv-shared reader: its query only (the writer places k, v and the cache)
            if self.q.out_features != heads.q * heads.d:
                raise ValueError(f"{self.module}: q_proj has {self.q.out_features} rows, the config says "
                                 f"{heads.q}x{heads.d}")
            out = list(self.q.placements("q"))
        elif self.fused is None:
            q_rows, k_rows = self.q.out_features, self.k.out_features
            v_rows = self.v.out_features if self.v.node is not self.k.node else heads.k * heads.dv
            if q_rows != heads.q * heads.d or k_rows != heads.k * heads.d or v_rows != heads.k * heads.dv:
                raise ValueError(
                    f"{self.module}: q_proj has {q_rows} rows, k_proj {k_rows} and v_proj {v_rows}, but the config "
                    f"says {heads.q}x{heads.d} query, {heads.k}x{heads.d} key and {heads.k}x{heads.dv} value rows"
                )
            out = [*self.q.placements("q"), *self.k.placements("k")]
            out += self.v.placements("v") if self.v.node is not self.k.node else []  # k = v: placed once
        else:
            rows, want = self.q.out_features, fused_rows(self.split, heads)
            if rows != want:
                raise ValueError(f"{self.module}: the fused qkv projection has {rows} rows, the config says {want}")
            if self.fused == "qkv_heads" and isinstance(self.split, IndexSplit):
                if self.split.width != 3 * heads.d:
                    raise UnsupportedModelError(
                        f"{self.module}: fused qkv {self.q.name} is cut at width {self.split.width} by "
                        f"{[c.name for c in self.split.cuts]}: not per-head [q k v] of {heads.d}"
                    )
            elif self.fused == "qkv_heads":
                per_group_qkv(self.module, self.q, self.split, heads)
            out = list(self.q.placements(self.fused))
        out += self.o.placements("o")
        out += self.output.placements() if self.output is not None else []
        out += [(self.sink, "q_heads", "weight")] if self.sink is not None else []
        for norm in self.norms:
            out += [(w, norm.role, "weight") for w in norm.weights]
        out += [(self.keys, "kv", "cache"), (self.values, "kv", "cache")]
        return out

    def replace_with(self, graph: fx.Graph, env: dict, ctx) -> None:
        rewrite(self, graph, env, ctx)  # attention_rewrite.py


def match_attention(graph: fx.Graph, config=None, skip=()) -> list[AttentionMatch]:
    """One ``AttentionMatch`` per helix cache write, in graph order (refuses what it does not understand);
    ``skip``: writes claimed by another matcher (MLA)."""
    writes = [n for n in graph.nodes if n.op == "call_function" and n.target in KV_WRITE]
    matches = []
    for i, write in enumerate(writes):
        if write in skip:
            continue
        own, readers = find_cores(write)
        matches.append(_match_one(write, i, config, own))
        matches += [_match_reader(matches[-1], found, config) for found in readers]
    return sorted(matches, key=lambda m: order(m.core))


def _match_one(write: fx.Node, index: int, config, own: list) -> AttentionMatch:
    keys, values, k, v, pos = write.args
    module = module_path(write)
    form, core, query, scale, softcap, alibi, sink, _ = own[0]
    cores, routes = [c[1] for c in own], [c[7] for c in own]
    norms: list[CrossHeadNorm] = []
    q = projection_ancestor(query, module, f"query of {module}", norms, "q_norm")
    kp = projection_ancestor(k, module, f"key of {module}", norms, "k_norm")
    vp = projection_ancestor(v, module, f"value of {module}", norms, None)
    fused, split = None, None
    if len({q.node, kp.node, vp.node}) == 3 or (kp.node is vp.node and q.node is not kp.node):
        for proj in (q, kp) if kp.node is vp.node else (q, kp, vp):  # a cut of a projection's whole feature width would need a fused rewrite
            cut = find_split(proj, f"projection of {module}")
            flat = [c for c in (cut.cuts if cut else []) if len(shape(c.args[0]) or ()) < 4]  # (B, L, features)
            if flat and cut.width == proj.out_features:
                raise UnsupportedModelError(
                    f"{module}: {where(flat[0])} cuts the features of {proj.name} before they split into heads"
                )
    else:
        if not (q.node is kp.node is vp.node):
            raise UnsupportedModelError(f"{module}: two of q/k/v share projection '{q.name}' and the third does not")
        split = (find_split(q, f"fused qkv of {module}") or head_select(q) or find_index_split(q.out, shape(query)[-1])
                 or head_slices(q, shape(query)[-1]) or group_slices(q, shape(query)[-1]))
        if split is None:
            raise UnsupportedModelError(f"{module}: fused q/k/v projection {where(q.node)} without a split helix understands")
        fused = "qkv_heads" if split.width != q.out_features or isinstance(split, GroupSlices) else "qkv"
    gate_norms: list[CrossHeadNorm] = []
    output = match_output(cores, module, f"attention output of {module}",
                          lambda node, what: projection_ancestor(node, module, what, gate_norms, None))
    o = output.o
    _check_softcap(config, module, core, softcap)
    layer = _layer_index(keys, index)
    window = layer_window(config, layer) if config is not None else 0
    chunk = layer_chunk(config, layer)
    key_masks = set()
    for c in cores:
        check_chunk_mask(mask_operand(form, c), c, chunk, module)
        key_masks.add(find_key_mask(form, c))
    if len(key_masks) != 1:
        raise UnsupportedModelError(f"{module}: attention cores {[c.name for c in cores]} over one query apply "
                                    f"different attention masks")
    if len(cores) == 1 and not routes[0].ops:
        routes = []  # the values placeholder itself: the common case
    return AttentionMatch(module, form, q, kp, vp, o, write, keys, values, pos, query, core, scale, softcap, window,
                          fused, split, norms, key_masks.pop(), alibi, output, _views(q, kp, vp, query, k, v, fused),
                          sink, layer=layer, chunk=chunk, routes=routes)


def _views(q, kp, vp, query, k, v, fused) -> list:
    """The head views between the projections and the core: ``heads.input_views``, and (separate projections)
    the reshapes of complex RoPE (``rope.py``)."""
    views = input_views(q, kp, vp, query, k, v)
    if fused is None:
        views += [c for c in complex_views(q, kp, vp, query, k, v) if all(c.node is not h.node for h in views)]
    return views


def _match_reader(writer: AttentionMatch, found, config) -> AttentionMatch:
    """A kv-shared layer: attention in another module over ``writer``'s cache placeholders (see the module doc)."""
    form, core, query, scale, softcap, alibi, sink, route = found
    module = module_path(core)
    if route.ops:
        raise UnsupportedModelError(f"{where(core)} reads the cache of {writer.module} through a rearrangement of its "
                                    f"value heads ({[op.name for op in route.ops]}); helix supports kv-shared layers "
                                    f"that read the values as cached only")
    if alibi is not None or sink is not None:
        raise UnsupportedModelError(f"{where(core)} reads the cache of {writer.module} with "
                                    f"{'ALiBi' if alibi is not None else 'an attention sink'}; helix supports "
                                    f"kv-shared layers with plain causal attention only")
    norms: list[CrossHeadNorm] = []
    q = projection_ancestor(query, module, f"query of {module}", norms, "q_norm")
    cut = find_split(q, f"projection of {module}")
    if cut is not None and cut.width == q.out_features:
        raise UnsupportedModelError(f"{module}: {where(cut.cuts[0])} cuts the features of {q.name}; the query of a "
                                    f"layer reading {writer.module}'s cache must be a projection of its own")
    o = first_projection_after(core, f"attention output of {module}")
    _check_softcap(config, module, core, softcap)
    layer = re.search(r"(?:^|\.)(\d+)\.[^.]+$", module)
    if config is not None and layer is None:
        raise UnsupportedModelError(f"{where(core)} reads the cache of {writer.module} but its module path names no "
                                    f"layer index, so helix cannot find its sliding window")
    index = int(layer.group(1)) if layer is not None else None
    window = layer_window(config, index) if config is not None else 0
    chunk = layer_chunk(config, index)
    check_chunk_mask(mask_operand(form, core), core, chunk, module)
    return AttentionMatch(module, form, q, None, None, o, writer.kv_write, writer.keys, writer.values, writer.pos,
                          query, core, scale, softcap, window, None, None, norms, find_key_mask(form, core),
                          shares=writer.module, layer=index, chunk=chunk)


def _check_softcap(config, module: str, core: fx.Node, softcap: float) -> None:
    configured = (getattr(config, "attn_logit_softcapping", None) or 0.0) if config is not None else 0.0
    if configured and not softcap:
        raise UnsupportedModelError(
            f"{module}: the config sets attn_logit_softcapping={configured} but helix found no soft-capping in "
            f"{where(core)}; use attn_implementation='eager'"
        )


def _layer_index(keys: fx.Node, fallback: int) -> int:
    found = re.search(r"layers_(\d+)_keys$", keys.name)  # helix StaticCache placeholders: ..._layers_{i}_keys
    return int(found.group(1)) if found else fallback


def layer_window(config, layer: int) -> int:
    """Sliding window of a decoder layer (0: full attention), as transformers' mask functions apply it."""
    window = getattr(config, "sliding_window", None) or 0
    types = getattr(config, "layer_types", None)
    if types is not None:
        kind = types[layer]
        if kind == "sliding_attention":
            return int(window)
        if kind in ("full_attention", "chunked_attention"):  # chunks: layer_chunk (chunks.py)
            return 0
        raise UnsupportedModelError(f"layer {layer} has attention type {kind!r}; helix supports full, sliding and "
                                    f"chunked attention")
    if window and getattr(config, "use_sliding_window", True) is not False:
        return int(window)  # Mistral: every layer slides
    return 0
