"""Region matcher: softmax attention over the helix KV cache (MHA / GQA / MQA; separate or fused q/k/v).

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

Rewrite (``replace_with``; pattern ... into ...):
    kv_write(keys, values, k, v, pos)
        into  kv_write_local(keys, values, k, v, pos, kvp_rank, kvp, kv_block)          # owner-only write
    core = sdpa(q, repeat_kv(keys), repeat_kv(values), mask)   (or the eager chain)
        into  packed = partial_attention(q, keys, values, pos, kvp_rank, kvp, kv_block, scale[, softcap, window]
                                         [, key_mask=][, alibi_slopes= this rank's heads' slopes, alibi_pos=]
                                         [, chunk=])
              recv   = wait(all_to_all_single(packed, out=[h]*kvp, in=split, kvp_group))  # kvp > 1 only
              core'  = lse_merge(recv, kvp, D)                                          # (B, h, L, D)
    o = proj(x, Wo, b)   into  wait(all_reduce(proj(x, Wo_shard), "sum", world)) [+ b]  # N > 1 only
    attention sinks (sinks.py): folded into the partial of the first KVP rank before the exchange
    several cores: the same for each, partial attention over the model's rearrangement of the local values; heads in
        p parts (DiffLLaMA, ``Heads.parts``): the rank holds the same block of each part (q/k/v rows: roles.py),
        packed reordered part-minor before the all-to-all (``exchange_and_merge``), and the output side's cut of
        the heads into p parts stays as it is (heads.py)
    views naming the head count, output gates and norms between core and o: heads.py
    mean(x*x, -1) over all heads' features (q/k norm)
        into  wait(all_reduce(sum(x*x, -1), "sum", tpa_group)) / (heads * D)             # tpa > 1 only
    fused qkv cuts: global offsets (0, Q*D, (Q+K)*D) into the local ones
    constant head counts in views (heads.py): view(B, -1, H, D) after a projection (OPT), reshape(B, L, H*D)
        before o (BLOOM, XGLM), view(attn, ..., Q*D) (eager BERT-style attention) into the local ones
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re

import torch
import torch.fx as fx

from .common import (
    CATS, REDUCE_METHODS, SHAPE_METHODS, UnsupportedModelError, check_only, is_call, is_method, is_pointwise,
    module_path, shape, where,
)
from .alibi import BADDBMM, BMM, IndexSplit, alibi_or_none, bmm_core, find_index_split
from .chunks import check_chunk_mask, layer_chunk
from .heads import (
    GroupSlices, OutputSide, all_reduce_mean, cut_dim, fused_rows, group_slices, head_select, head_slices, input_views,
    is_cut, is_head_index, match_output, per_group_qkv, per_head_index,
)
from .roles import head_ranges
from .rope import complex_views, is_complex_view, within_last_axis
from .projection import (
    SPLIT_METHODS, FusedSplit, Projection, find_split, is_last_dim_slice, is_projection, is_projection_output,
    projection_of,
)
from .sinks import add_sink, concat_sink, is_drop_last, max_shift, scale_sink
from .where_mask import check_where_mask

SDPA_TARGETS = {torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention}
KV_WRITE = {torch.ops.helix.kv_write, torch.ops.helix.kv_write.default}  # Dynamo records the packet
funcol = torch.ops._c10d_functional
MATMUL = {torch.matmul, operator.matmul}  # ``a @ b`` (Falcon's eager attention) traces to operator.matmul
DIV = {operator.truediv, operator.itruediv, torch.div}  # ``scores /= sqrt(D)`` (Falcon): operator.itruediv


@dataclasses.dataclass
class CrossHeadNorm:
    """A norm over all heads' features of q or k (OLMo2): its mean over the sharded features, and its width."""

    mean: fx.Node
    width: int  # global features (heads * D)
    weights: list  # 1-D parameters of that width (sharded like the projection rows)
    role: str  # "q_norm" or "k_norm"


@dataclasses.dataclass
class ValueRoute:
    """The values one attention core reads: the cache's ``values`` placeholder itself (``ops`` empty), or whole KV
    heads of it rearranged position by position (DiffLLaMA: ``chunk(values, 2, dim=1)[i].repeat(1, 2, 1, 1)``):
    ``node`` (B, K, S, Dv), made from the placeholder by ``ops`` (chunk / split / tensor_split along the heads dim
    and getitem of a part, getitem of a heads slice or of batch rows, repeat along the heads dim, cat along it,
    contiguous), before repeat_kv. Such ops take every position alike, so they commute with sharding the sequence
    (KVP); which heads they take on a rank's heads is proved by ``check``."""

    core: fx.Node
    source: fx.Node  # the cache's values placeholder
    node: fx.Node  # what the core reads through repeat_kv: ``source``, or the last of ``ops``
    ops: list  # graph order

    def heads_read(self, kv_heads: list) -> list:
        """The cache's KV heads (global indices) that ``node``'s heads hold when the cache holds ``kv_heads`` in this
        order: ``ops`` run on a (1, len(kv_heads), 1, 1) tensor of those indices."""
        env = {self.source: torch.tensor(kv_heads).view(1, -1, 1, 1)}
        for op in self.ops:
            if _rows_slice(op):  # batch rows: the same heads
                env[op] = env[op.args[0]]
                continue
            args, kwargs = fx.node.map_arg((op.args, op.kwargs), lambda n: env[n])
            env[op] = op.target(*args, **kwargs) if op.op == "call_function" else getattr(args[0], op.target)(
                *args[1:], **kwargs)
        return env[self.node].flatten().tolist()

    def check(self, heads, layout, rank: int) -> None:
        """Refuse unless the local program, running ``ops`` on this rank's KV heads, gives each of its query heads
        the value head the global program gives that query head (query head h reads head h // (Q/K) of ``node``)."""
        if not self.ops:
            return
        q_ranges, kv_ranges = head_ranges(heads, layout, rank)
        qs, ks = [h for a, b in q_ranges for h in range(a, b)], [g for a, b in kv_ranges for g in range(a, b)]
        names = " -> ".join(op.name for op in self.ops)
        try:
            whole, local = self.heads_read(list(range(heads.k))), self.heads_read(ks)
        except (RuntimeError, IndexError, ValueError) as e:
            raise UnsupportedModelError(f"{where(self.core)}: its values are rearranged ({names}) in a way that does "
                                        f"not run on this rank's {len(ks)} KV heads {kv_ranges}: {e}") from None
        if len(whole) != heads.k or len(local) != len(ks):
            raise UnsupportedModelError(
                f"{where(self.core)}: its values ({names}) have {len(whole)} heads and its keys {heads.k}; helix pairs "
                f"keys and values head by head"
            )
        group, local_group = heads.q // heads.k, len(qs) // len(ks)
        for i, h in enumerate(qs):
            if local[i // local_group] != whole[h // group]:
                raise UnsupportedModelError(
                    f"{where(self.core)}: query head {h} reads value head {whole[h // group]} of the cache (through "
                    f"{names}), but on rank {rank} ({layout.key()}: query heads {q_ranges}, KV heads {kv_ranges}) it "
                    f"would read head {local[i // local_group]}; helix keeps such rearrangements exact only when each "
                    f"rank holds the heads they pair up ({heads.parts} part(s) of the heads, layout._HEAD_PARTS)"
                )


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
        if ctx.heads.per_layer:  # this layer's shape (Gemma 4: full-attention layers have their own head_dim)
            ctx = dataclasses.replace(ctx, heads=ctx.heads.layer(self.layer))
        layout, heads = ctx.layout, ctx.heads
        self._check_parts(heads, layout, ctx.rank)
        keys, values, k, v, pos = (env[x.name] for x in self.kv_write.args)
        query = env[self.query.name]
        if self.shares is not None:  # the writer's match rewrites the write; this layer reads the same local shard
            with graph.inserting_before(env[self.core.name]):
                keys, values = _batch_rows(graph, keys, values, k)
        else:
            write = env[self.kv_write.name]
            with graph.inserting_before(write):
                keys, values = _batch_rows(graph, keys, values, k)
                graph.call_function(
                    torch.ops.helix.kv_write_local.default,
                    (keys, values, k, v, pos, ctx.kvp_rank, layout.kvp, layout.kv_block),
                )
            graph.erase_node(write)
        for route in self.routes or [ValueRoute(self.core, self.values, self.values, [])]:
            core, value = env[route.core.name], values
            if route.ops:  # the model's own rearrangement of the local values (checked by _check_parts)
                with graph.inserting_before(core):
                    _, value = _batch_rows(graph, env[self.keys.name], env[route.node.name], k)
            self._attend(graph, env, ctx, core, query, keys, value, pos)
        first, stop = layout.kv_heads(heads.k, ctx.rank)  # tpa > K: one KV head, duplicated (TP baseline)
        if self.fused == "qkv_heads":
            group = per_group_qkv(self.module, self.q, self.split, heads)
            if (heads.q // layout.tpa) % group:
                raise UnsupportedModelError(
                    f"{self.module}: fused qkv {self.q.name} interleaves q, k and v per group of {group} heads; "
                    f"tpa={layout.tpa} gives each rank {heads.q // layout.tpa} heads, not whole groups"
                )
        q_local, k_local, v_local = heads.q // layout.tpa * heads.d, (stop - first) * heads.d, (stop - first) * heads.dv
        if self.shares is not None:
            self.q.column_parallel(env, q_local)
        elif self.fused is None:
            for proj, width in ((self.q, q_local), (self.k, k_local), (self.v, v_local)):
                if proj is self.v and self.v.node is self.k.node:
                    continue  # k = v (attention_k_eq_v): rewritten once, as k
                proj.column_parallel(env, width)
        else:
            self.q.column_parallel(env, q_local + k_local + v_local)
            if isinstance(self.split, IndexSplit):
                self.split.replace_with(env)
            if self.fused == "qkv" and self.split is not None:
                qd, kd, vd = heads.q * heads.d, heads.k * heads.d, heads.k * heads.dv
                self.split.replace_with(env, [0, qd, qd + kd, qd + kd + vd],
                                        [0, q_local, q_local + k_local, q_local + k_local + v_local])
        for norm in self.norms:
            if layout.tpa > 1:
                all_reduce_mean(graph, env[norm.mean.name], norm.width, ctx.tpa_group)
        ratios = {"q": (heads.q // layout.tpa, heads.q), "kv": (stop - first, heads.k),
                  "qkv": (heads.q // layout.tpa + 2 * (stop - first), heads.q + 2 * heads.k)}
        for view in self.views:
            view.replace_with(env, *ratios[view.path])
        if self.output is not None:
            self.output.replace_with(graph, env, ctx, heads.dv)
        self.o.row_parallel(graph, env, ctx.world_group, layout.world_size, ctx.split[ctx.kvp_rank] * heads.dv)

    def _attend(self, graph: fx.Graph, env: dict, ctx, core: fx.Node, query: fx.Node, keys: fx.Node, values: fx.Node,
                pos: fx.Node) -> None:
        """core = attention(query, cache)  into  lse_merge(exchange(partial_attention(query, keys, values, ...)))."""
        layout, heads = ctx.layout, ctx.heads
        args = (query, keys, values, pos, ctx.kvp_rank, layout.kvp, layout.kv_block, self.scale)
        if self.softcap or self.window:
            args += (float(self.softcap), int(self.window))
        kwargs = {"key_mask": env[self.key_mask.name]} if self.key_mask is not None else {}
        if self.chunk:
            kwargs["chunk"] = int(self.chunk)
        with graph.inserting_before(core):
            if self.alibi is not None:  # the slopes of this rank's query heads (its TPA slice)
                per = heads.q // layout.tpa
                slopes = self.alibi.local_slopes(layout.tpa_rank(ctx.rank) * per, per)
                device = query.meta["example_value"].device if "example_value" in query.meta else None
                kwargs["alibi_slopes"] = graph.call_function(
                    torch.tensor, (slopes,), {"dtype": torch.float32, "device": device})
                if self.alibi.positions is not None:
                    kwargs["alibi_pos"] = env[self.alibi.positions.name]
            packed = graph.call_function(torch.ops.helix.partial_attention.default, args, kwargs)
            if self.sink is not None and ctx.kvp_rank == 0:  # the sink joins one partial per KVP group
                packed = add_sink(graph, packed, env[self.sink.name], heads.dv, self.query.meta["example_value"].dtype)
            merged = exchange_and_merge(graph, packed, ctx, heads.dv, heads.parts)
        core.replace_all_uses_with(merged)

    def _check_parts(self, heads, layout, rank: int) -> None:
        """Refuse a layout under which this attention's heads in parts would not be exact on ``rank``: the parts the
        graph cuts the output heads into must be the config's (``Heads.parts``: the q/k/v rows the rank holds and
        the exchange follow those), and every rearrangement of the value heads must give each local query head its
        global value head (``ValueRoute.check``)."""
        if layout.world_size == 1:
            return
        parts = self.output.parts if self.output is not None else 1
        if parts != heads.parts:
            cut = f"at {self.output.cut.node.name}" if parts > 1 else "nowhere"
            raise UnsupportedModelError(
                f"{self.module}: the graph cuts the attention output's heads into {parts} part(s) ({cut}), but the "
                f"config's heads are in {heads.parts} (layout._HEAD_PARTS: model types whose attention pairs heads "
                f"across parts); helix cannot shard these heads exactly"
            )
        if heads.parts > 1 and self.alibi is not None:
            raise UnsupportedModelError(f"{self.module}: ALiBi over heads in {heads.parts} parts is not supported")
        for route in self.routes:
            route.check(heads, layout, rank)


def exchange_and_merge(graph: fx.Graph, packed: fx.Node, ctx, head_dim: int, parts: int = 1) -> fx.Node:
    """packed partials -> wait(all_to_all over the KVP group) (kvp > 1) -> lse_merge: the Helix exchange, shared by
    every attention kind (GQA/MHA here, MLA in mla.py).

    Heads in ``parts`` parts (DiffLLaMA): the rank's heads are [part 0 | part 1 | ...], and the all-to-all sends
    contiguous shares, so they are first reordered part-minor, packed.unflatten(0, (parts, kvp, -1)).transpose(0, 1)
    .flatten(0, 2): KVP rank j then holds the j-th block of every part, in part order, as its local program expects
    (Layout.validate makes the blocks even)."""
    layout, recv = ctx.layout, packed
    if layout.kvp > 1:
        if parts > 1:
            packed = graph.call_method("unflatten", (packed, 0, (parts, layout.kvp, -1)))
            packed = graph.call_method("transpose", (packed, 0, 1))
            packed = graph.call_method("flatten", (packed, 0, 2))
        sent = graph.call_function(
            funcol.all_to_all_single.default, (packed, [ctx.split[ctx.kvp_rank]] * layout.kvp, ctx.split, ctx.kvp_group)
        )
        recv = graph.call_function(funcol.wait_tensor.default, (sent,))
    return graph.call_function(torch.ops.helix.lse_merge.default, (recv, layout.kvp, head_dim))


def _batch_rows(graph: fx.Graph, keys: fx.Node, values: fx.Node, k: fx.Node):
    """The cache shards narrowed to the batch of the new keys ``k`` when it is smaller than the cache's."""
    rows, capacity = k.meta["example_value"].shape[0], keys.meta["example_value"].shape[0]
    if isinstance(rows, int) and rows == capacity:
        return keys, values
    if not isinstance(rows, int):  # a symbolic batch: read it from k at run time
        rows = graph.call_method("size", (k, 0))
    return tuple(graph.call_function(torch.narrow, (t, 0, 0, rows)) for t in (keys, values))


def _mask_operand(form: str, core: fx.Node) -> fx.Node | None:
    """The mask the attention core applies: SDPA's attn_mask, or the addend of the eager scores."""
    if form == "sdpa":
        mask = core.args[3] if len(core.args) > 3 else core.kwargs.get("attn_mask")
        return mask if isinstance(mask, fx.Node) else None
    node = core.args[0]  # eager: walk back from the probabilities to ``scores + mask``
    if form == "bmm":  # core = view(bmm(probabilities, values))
        node = node.args[0]
    while isinstance(node, fx.Node) and node.op != "placeholder":
        if is_method(node, {"masked_fill"}):  # MPT: scores.masked_fill(mask, min), after its ALiBi bias
            return node.args[1] if isinstance(node.args[1], fx.Node) else None
        if node.op == "call_function" and node.target in (operator.add, torch.add):
            return node.args[1] if isinstance(node.args[1], fx.Node) else None
        if node.op == "call_function" and node.target in (torch.matmul, operator.matmul, torch.bmm, torch.baddbmm):
            return None
        node = node.args[1] if is_call(node, {torch.where}) else node.args[0]  # where(cond, scores, m): the scores
    return None


_SHAPE_ONLY = {torch.zeros_like, torch.ones_like, torch.empty_like}
_SHAPE_ONLY_METHODS = {"new_zeros", "new_ones", "new_empty"}


def _key_mask(form: str, core: fx.Node) -> fx.Node | None:
    """The 2-D attention_mask placeholder the core's mask is built from (None: no user mask); refuses others.

    When the model is called with a 2-D ``attention_mask`` (B, S_m) (padded batches, ``generate``), HF builds its
    4-D mask from it inside the graph (causal & mask[b, p]); partial attention applies it by global key position
    itself (``key_mask``)."""
    mask = _mask_operand(form, core)
    if mask is None:
        return None
    found, stack, seen = [], [mask], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        val = node.meta.get("example_value")
        if not isinstance(val, torch.Tensor):
            continue  # a size (SymInt) read from some input carries no mask values
        if node.op == "placeholder":
            if val.dim() >= 2:
                found.append(node)
            continue
        if is_call(node, _SHAPE_ONLY) or is_method(node, _SHAPE_ONLY_METHODS):
            continue  # its values do not depend on its input's (GIT: token types zeros_like(embeddings))
        stack.extend(node.all_input_nodes)
    if any(shape(n) is not None and len(shape(n)) != 2 for n in found) or len(found) > 1:
        raise UnsupportedModelError(
            f"the attention mask of {where(core)} is built from {[f'{n.name} {shape(n)}' for n in found]}; helix "
            f"supports only the 2-D (batch, length) attention_mask of padded batches"
        )
    return found[0] if found else None


# -- matching ------------------------------------------------------------------------------------------------------
def match_attention(graph: fx.Graph, config=None, skip=()) -> list[AttentionMatch]:
    """One ``AttentionMatch`` per helix cache write, in graph order (refuses what it does not understand);
    ``skip``: writes claimed by another matcher (MLA)."""
    writes = [n for n in graph.nodes if n.op == "call_function" and n.target in KV_WRITE]
    matches = []
    for i, write in enumerate(writes):
        if write in skip:
            continue
        own, readers = _find_cores(write)
        matches.append(_match_one(write, i, config, own))
        matches += [_match_reader(matches[-1], found, config) for found in readers]
    return sorted(matches, key=lambda m: _order(m.core))


def _match_one(write: fx.Node, index: int, config, own: list) -> AttentionMatch:
    keys, values, k, v, pos = write.args
    module = module_path(write)
    form, core, query, scale, softcap, alibi, sink, _ = own[0]
    cores, routes = [c[1] for c in own], [c[7] for c in own]
    norms: list[CrossHeadNorm] = []
    q = _projection_ancestor(query, module, f"query of {module}", norms, "q_norm")
    kp = _projection_ancestor(k, module, f"key of {module}", norms, "k_norm")
    vp = _projection_ancestor(v, module, f"value of {module}", norms, None)
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
                          lambda node, what: _projection_ancestor(node, module, what, gate_norms, None))
    o = output.o
    _check_softcap(config, module, core, softcap)
    layer = _layer_index(keys, index)
    window = layer_window(config, layer) if config is not None else 0
    chunk = layer_chunk(config, layer)
    key_masks = set()
    for c in cores:
        check_chunk_mask(_mask_operand(form, c), c, chunk, module)
        key_masks.add(_key_mask(form, c))
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
    q = _projection_ancestor(query, module, f"query of {module}", norms, "q_norm")
    cut = find_split(q, f"projection of {module}")
    if cut is not None and cut.width == q.out_features:
        raise UnsupportedModelError(f"{module}: {where(cut.cuts[0])} cuts the features of {q.name}; the query of a "
                                    f"layer reading {writer.module}'s cache must be a projection of its own")
    o = _first_projection_after(core, f"attention output of {module}")
    _check_softcap(config, module, core, softcap)
    layer = re.search(r"(?:^|\.)(\d+)\.[^.]+$", module)
    if config is not None and layer is None:
        raise UnsupportedModelError(f"{where(core)} reads the cache of {writer.module} but its module path names no "
                                    f"layer index, so helix cannot find its sliding window")
    index = int(layer.group(1)) if layer is not None else None
    window = layer_window(config, index) if config is not None else 0
    chunk = layer_chunk(config, index)
    check_chunk_mask(_mask_operand(form, core), core, chunk, module)
    return AttentionMatch(module, form, q, None, None, o, writer.kv_write, writer.keys, writer.values, writer.pos,
                          query, core, scale, softcap, window, None, None, norms, _key_mask(form, core),
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


def _projection_ancestor(start: fx.Node, attention_module: str, what: str, norms: list, norm_role) -> Projection:
    """The unique projection among the ancestors of ``start`` inside the attention module, every op between them
    per head (ops that do not depend on the projection, e.g. RoPE's cos/sin, are replicated values: any op)."""
    found, stack, seen, inner = [], [start], set(), []
    while stack:
        node = stack.pop()
        if node in seen or not isinstance(node, fx.Node):
            continue
        seen.add(node)
        if is_projection(node) or (is_method(node, {"view"}) and is_projection(node.args[0]) and node.args[0].target is torch.addmm):
            proj = projection_of(node)
            if all(p.node is not proj.node for p in found):
                found.append(proj)
            continue
        if node.op in ("placeholder", "get_attr") or is_method(node, {"size"}):
            continue  # a size (dynamic batch or length) carries no values
        if not module_path(node).startswith(attention_module):
            continue  # e.g. RoPE cos/sin computed at model level: replicated, broadcast over heads
        inner.append(node)
        shape_only = is_method(node, {"view_as", "reshape_as"})  # x.view_as(y): only y's shape
        stack.extend(node.all_input_nodes if not shape_only else [node.args[0]])
    if len(found) != 1:
        raise UnsupportedModelError(
            f"{what}: expected exactly one projection feeding it inside '{attention_module}', found "
            f"{[p.name for p in found]}"
        )
    proj = found[0]
    sharded = {proj.node, proj.out}  # the nodes whose values depend on the projection: these carry heads
    for node in sorted(inner, key=_order):
        if any(n in sharded for n in node.all_input_nodes):
            sharded.add(node)
            norm = _check_per_head(node, what)
            if norm is not None:
                norms.append(norm)
    for norm in norms:
        if norm.width == proj.out_features and norm.role is None:
            norm.role = norm_role
    if any(n.role is None for n in norms):
        raise UnsupportedModelError(f"{what}: a norm over all heads' features is only supported on the query and key")
    # 1-D parameters as wide as the projection (the norm weights) are sharded like its rows
    for norm in norms:
        if norm.role == norm_role and not norm.weights:
            norm.weights = [
                p for n in sharded - {proj.node} for p in n.all_input_nodes
                if p.op == "placeholder" and shape(p) == (norm.width,)
            ]
    return proj


def _order(node: fx.Node) -> int:
    """Topological position: FX keeps a graph's nodes in a valid order, and a node's ``_sort_key`` follows it."""
    return node._sort_key


def _check_per_head(node: fx.Node, what: str) -> CrossHeadNorm | None:
    """Allow only ops that keep heads independent between a projection and attention (or a cross-head norm)."""
    if within_last_axis(node):
        return None  # interleaved RoPE: stack / cat / repeat_interleave / reshape_as within the last axis (rope.py)
    if is_call(node, {operator.getitem}) and shape(node.args[0]) is not None:  # of a tensor, not a tuple's part
        if per_head_index(node) or _projection_cut(node):
            return None
        raise UnsupportedModelError(
            f"{what}: {where(node)} indexes a dim of {shape(node.args[0])} that may hold the heads; helix shards heads "
            f"across ranks and would change its result"
        )
    if is_call(node, CATS):
        raise UnsupportedModelError(
            f"{what}: {where(node)} concatenates along a dim other than the last of a (B, H, L, D) / (B, L, H, D) "
            f"tensor; helix shards heads across ranks and would change its result"
        )
    if node.op == "call_method" and node.target in SHAPE_METHODS | {"view_as"} or is_pointwise(node):
        return None  # view_as(x, y): y's local shape (a head-sharded y, else a loud shape error)
    if is_complex_view(node):
        return None  # complex RoPE (Llama 4): pairs within a head (rope.py)
    if is_call(node, {torch.broadcast_to}):
        return None  # copies along size-1 dims (Falcon-40B: a KV head over its group), sizes: heads.Broadcast
    if is_method(node, SPLIT_METHODS):  # cuts of the last dim: a fused qkv (checked by FusedSplit) or within a head
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
        if dim in (-1, len(shape(node.args[0]) or ()) - 1):
            return None
    if is_call(node, {torch.chunk, torch.split}) and len(shape(node.args[0]) or ()) == 4:  # gpt-oss's RoPE halves:
        if node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0) in (-1, 3):  # torch.chunk(x, 2, -1)
            return None  # within a head: the last dim of a (B, H, L, D) / (B, L, H, D) tensor is head_dim
    if is_call(node, {torch.nn.functional.layer_norm, torch.layer_norm}):
        x = shape(node.args[0]) or ()
        if len(x) == 4 and tuple(node.args[1]) == x[-1:]:
            return None  # a per-head LayerNorm over head_dim (Persimmon's q/k layernorm): weight of D, replicated
    reduces = (node.op == "call_method" and node.target in REDUCE_METHODS) or is_call(node, {torch.mean, torch.sum})
    if reduces:
        in_shape = shape(node.args[0])
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", None)
        if in_shape is not None and dims in (-1, len(in_shape) - 1, (-1,), [-1]):
            if len(in_shape) == 4:
                return None  # a per-head norm (q_norm / k_norm over head_dim)
            if len(in_shape) == 3 and node.target in ("mean", torch.mean):
                return CrossHeadNorm(node, in_shape[-1], [], None)  # over all heads' features (OLMo2)
    raise UnsupportedModelError(
        f"{what}: {where(node)} is not a per-head op; helix shards heads across ranks and would change its result"
    )


def _projection_cut(node: fx.Node) -> bool:
    """``x[..., a:b]`` or ``x[..., :-2, :]`` / ``x[..., [i], :]`` of a projection's output through views only: a cut
    of its features or heads, which ``find_split`` / ``head_slices`` own (a fused q|k|v, checked and rewritten there;
    a cut of a separate projection's whole width is refused in ``_match_one``)."""
    if not (is_last_dim_slice(node.args[1]) or is_head_index(node)):
        return False
    source = node.args[0]
    while is_method(source, SHAPE_METHODS) and not is_projection_output(source):
        source = source.args[0]
    return is_projection_output(source)


def _cache_source(node: fx.Node) -> fx.Node | None:
    """Follow repeat_kv (getitem None / expand / reshape / contiguous) back to a placeholder."""
    while node.op != "placeholder":
        if node.op == "call_method" and node.target in SHAPE_METHODS or (
            node.op == "call_function" and node.target is operator.getitem
        ):
            node = node.args[0]
        else:
            return None
    return node


def value_route(value: fx.Node, values: fx.Node, keys: fx.Node, core: fx.Node) -> ValueRoute:
    """How the ``value`` operand of ``core`` comes from the cache's ``values`` placeholder (see ``ValueRoute``):
    repeat_kv's views (and batch rows) back to the placeholder or to the last of the head rearrangements, which
    must lead to the placeholder alone; anything else is refused by name."""
    node = value
    while node.op != "placeholder" and not _head_op(node) and (
            is_method(node, SHAPE_METHODS) or is_call(node, {operator.getitem})):
        node = node.args[0]  # repeat_kv: getitem None / expand / reshape (and a batch slice)
    ops, stack, seen = [], [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            if n is not values:
                raise UnsupportedModelError(
                    f"attention reads keys of one cache layer ({keys.name}) and values of another ({n.name}): "
                    f"{where(core)}"
                )
            continue
        if not (_head_op(n) or _rows_slice(n) or is_method(n, {"contiguous", "clone"})):
            raise UnsupportedModelError(
                f"the values of {where(core)} come from the cache's {values.name} through {where(n)}: helix follows "
                f"only per-position rearrangements of whole KV heads there (chunk / split / getitem / repeat / cat "
                f"along the heads dim, and repeat_kv)"
            )
        ops.append(n)
        stack.extend(n.all_input_nodes)
    return ValueRoute(core, values, node, sorted(ops, key=_order))


def _head_op(node: fx.Node) -> bool:
    """An op on the heads dim (1) of a (B, K, S, D) tensor that takes every position alike: a cut along it and
    x[i] of one of its parts, a slice of it x[:, a:b], repeat(1, r, 1, 1), cat along it."""
    if is_cut(node):
        return len(shape(node.args[0]) or ()) == 4 and cut_dim(node) == 1
    if is_call(node, {operator.getitem}):
        source, index = node.args
        if is_cut(source):
            return isinstance(index, int)
        return (isinstance(index, tuple) and len(index) >= 2 and index[0] == slice(None) and isinstance(index[1], slice)
                and all(isinstance(v, int) or v is None for v in (index[1].start, index[1].stop, index[1].step))
                and all(i == slice(None) for i in index[2:]) and len(shape(source) or ()) == 4)
    if is_method(node, {"repeat"}):
        sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        return len(sizes) == 4 and all(isinstance(v, int) for v in sizes) and sizes[0] == sizes[2] == sizes[3] == 1
    if is_call(node, CATS):
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        return len(shape(node) or ()) == 4 and dim % 4 == 1
    return False


def _rows_slice(node: fx.Node) -> bool:
    """x[:b] / x[a:b, :, :, :]: rows of the batch, every head and position."""
    if not is_call(node, {operator.getitem}):
        return False
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    return isinstance(index[0], slice) and index[0].step is None and all(i == slice(None) for i in index[1:])


def _zero_init(mm: fx.Node) -> bool:
    """baddbmm's input is zeros (scores = alpha * q k^T), not a bias such as BLOOM's ALiBi."""
    init = mm.args[0]
    return is_call(init, {torch.zeros}) or is_method(init, {"zero_"})


def _find_cores(write: fx.Node):
    """([the writer's cores], [cores of kv-shared readers]) among the attentions over the cache ``write`` fills, each
    as (form, core, query, scale, softcap, alibi, sink, route): the writer's are those in the write's module (or
    the only one); several there must share one query, each over its own values (DiffLLaMA's two calls)."""
    keys, values = write.args[:2]
    cores = _find_core(keys, values, write)
    module = module_path(write)
    own = [c for c in cores if module_path(c[1]) == module] if len(cores) > 1 else cores
    own.sort(key=lambda c: _order(c[1]))
    same = len({(c[0], c[2], c[3], c[4]) for c in own}) == 1 and all(c[5] is None and c[6] is None for c in own)
    if not own or len(own) > 1 and not same:
        raise UnsupportedModelError(
            f"the cache written by {where(write)} is read by {len(cores)} attentions "
            f"{[where(c[1]) for c in cores]}, {len(own)} of them in the writing module; helix expects one there, or "
            f"several over one query with one scale and neither ALiBi nor sinks (the others read it as kv-shared "
            f"layers)"
        )
    readers = [c for c in cores if c not in own]
    for c in readers:
        if module_path(c[1]).startswith(module) or not module_path(c[1]):
            raise UnsupportedModelError(f"{where(c[1])} reads the cache written by {where(write)} a second time")
    return own, readers


def _find_core(keys: fx.Node, values: fx.Node, write: fx.Node) -> list:
    """Every (form, core, query, scale, softcap, alibi, sink, route) of an attention that reads the cache placeholders."""
    found = []
    for user in _repeat_kv_users(keys):
        if user.op == "call_function" and user.target in SDPA_TARGETS:
            query, value = user.args[0], user.args[2] if len(user.args) > 2 else user.kwargs["value"]
            route = value_route(value, values, keys, user)
            if user.kwargs.get("dropout_p", 0.0) not in (0.0, 0):
                raise UnsupportedModelError(f"attention dropout must be 0 at inference: {where(user)}")
            mask = user.kwargs.get("attn_mask", user.args[3] if len(user.args) > 3 else None)
            _check_causal_mask(mask, user)
            scale = user.kwargs.get("scale")
            if scale is None:
                scale = 1.0 / math.sqrt(shape(query)[-1])
            found.append(("sdpa", user, query, float(scale), 0.0, None, None, route))
        elif user.op == "call_method" and user.target == "transpose":
            for mm in user.users:
                if mm.op == "call_function" and mm.target in MATMUL and mm.args[1] is user or (
                        is_call(mm, {torch.baddbmm}) and len(mm.args) > 2 and mm.args[2] is user and _zero_init(mm)):
                    found.append(_eager_core(mm, values, keys))  # GPT-NeoX-Japanese: baddbmm(zeros, q, k^T, alpha)
                    break
                if is_call(mm, BMM | BADDBMM) or is_method(mm, {"bmm", "baddbmm"}):  # BLOOM: (B*H, L, D) batched
                    form, core, *rest = bmm_core(mm, user, values)  # matmuls, ALiBi through baddbmm's input
                    found.append((form, core, *rest, None, ValueRoute(core, values, values, [])))
                    break
    if found:
        return found
    raise UnsupportedModelError(
        f"the cache write {where(write)} is not followed by an attention helix understands (SDPA or "
        f"matmul-softmax-matmul over the whole cache)"
    )


_COMPARISONS = {operator.le, operator.lt, operator.ge, operator.gt, torch.le, torch.lt, torch.ge, torch.gt}


def _check_causal_mask(mask, attention: fx.Node) -> None:
    """Refuse attention whose mask is not transformers' causal (or sliding-window) mask over positions.

    helix masks keys by their global position (p <= t, and the layer's window), so the model's own mask must mean
    exactly that: built from a comparison of positions, carrying no additive bias (ALiBi, relative positions).
    No mask at all over a static cache means bidirectional attention (an encoder used as a decoder) or torch's
    top-left ``is_causal``; neither is what helix computes.
    """
    if mask is None:
        raise UnsupportedModelError(
            f"{where(attention)} attends without a mask over the cache (bidirectional attention, e.g. an encoder "
            f"model without is_decoder=True, or a model whose transformers code builds its causal mask only from "
            f"an attention_mask: pass one, as generate does); helix computes causal attention only"
        )
    if not isinstance(mask, fx.Node):
        raise UnsupportedModelError(f"{where(attention)}: a constant attention mask helix does not understand")
    seen, stack, causal = set(), [mask], False
    while stack and len(seen) < 400:
        node = stack.pop()
        if node in seen or not isinstance(node, fx.Node):
            continue
        seen.add(node)
        if is_call(node, _COMPARISONS) or is_method(node, {"le", "lt", "ge", "gt", "tril", "triu"}):
            causal = True
            continue  # positions compared: what lies before is index arithmetic
        val = node.meta.get("example_value")
        floating = isinstance(val, torch.Tensor) and val.is_floating_point()
        arithmetic = is_call(node, {operator.add, operator.sub, operator.mul, torch.add, torch.mul, torch.sub, torch.baddbmm})
        if floating and (arithmetic or is_method(node, {"add", "mul", "sub", "baddbmm"})):
            raise UnsupportedModelError(
                f"{where(attention)}: its mask carries a bias ({where(node)}), e.g. ALiBi; helix masks by position "
                f"only"
            )
        stack.extend(node.all_input_nodes)
    if not causal:
        raise UnsupportedModelError(
            f"{where(attention)}: its mask is not built from a comparison of positions (not a causal mask helix "
            f"understands)"
        )


def _repeat_kv_users(placeholder: fx.Node):
    """Nodes that consume the cache (directly or through repeat_kv views), excluding the write itself."""
    out, frontier = [], [placeholder]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if (user.op == "call_method" and user.target in SHAPE_METHODS - {"transpose"}) or (
                user.op == "call_function" and user.target is operator.getitem
            ) or _is_float_cast(user):
                frontier.append(user)
            elif user.op == "call_function" and user.target in KV_WRITE:
                continue
            else:
                out.append(user)
    return out


def _is_float_cast(node: fx.Node) -> bool:
    """``x.float()`` / ``x.to(torch.float32)``: partial attention computes in fp32 anyway (Flint, GPT-Neo)."""
    return is_method(node, {"float"}) or (is_method(node, {"to"}) and node.args[1:] == (torch.float32,) and not node.kwargs)


def _baddbmm_scores(mm: fx.Node):
    """(query (B, H, L, D), scale) of ``baddbmm(zeros, q.view(B*H, L, D), k^T, beta=1, alpha=scale)``."""
    init, q3 = mm.args[0], mm.args[1]
    beta, alpha = mm.kwargs.get("beta", 1), mm.kwargs.get("alpha", 1)
    zeros = is_call(init, {torch.zeros}) or is_method(init, {"zero_"})
    if not zeros or beta not in (0, 1, 0.0, 1.0) or not isinstance(alpha, (int, float)) or not is_method(q3, {"view"}):
        raise UnsupportedModelError(f"eager attention scores {where(mm)}: a baddbmm helix does not understand (it "
                                    f"needs baddbmm(zeros, q, k^T, beta=1, alpha=scale))")
    query = q3.args[0]
    if len(shape(query) or ()) != 4:
        raise UnsupportedModelError(f"eager attention scores {where(mm)}: the query is not a (B, H, L, D) view")
    return query, float(alpha)


def _dropout_is_identity(node: fx.Node) -> bool:
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
    return p in (0.0, 0) or training is False


def _eager_core(matmul: fx.Node, values: fx.Node, keys: fx.Node):
    """(form, core, query, scale, softcap, alibi, sink, route) of matmul(q, k^T) -> *scale -> [/c -> tanh -> *c]
    -> [+ALiBi] -> [+mask | .masked_fill(mask, min)] -> softmax -> [to] -> [dropout] -> matmul(., v), with an
    attention sink in either form of ``sinks.py`` (MPT: scores + ALiBi bias, then masked_fill by the causal mask);
    v from the cache's ``values`` (``value_route``)."""
    query, node, scale, softcap, capping, masked = matmul.args[0], matmul, None, 0.0, None, False
    sink, sink_lse, alibi = None, None, None
    if is_call(matmul, {torch.baddbmm}):  # baddbmm(zeros, q.view(B*H, L, D), k^T, beta=1, alpha=scale)
        query, scale = _baddbmm_scores(matmul)
    while _is_float_cast(query):
        query = query.args[0]
    while True:
        shifted = _max_shift(node)
        if shifted is not None:  # scores - scores.max(-1, keepdim=True).values: softmax is unchanged (MiMo-V2-Flash)
            node = shifted
            continue
        users = list(node.users)
        lse = [u for u in users if is_call(u, {torch.logsumexp}) or is_method(u, {"logsumexp"})]
        if len(users) == 2 and len(lse) == 1 and sink_lse is None:
            sink_lse = lse[0]  # GraniteSWA's sink scale: sigmoid(logsumexp(scores) - sink)
            users.remove(sink_lse)
        if sink is not None and is_call(node, {torch.cat}) and max_shift(node) is not None:
            node = max_shift(node)  # gpt-oss: cat - cat.max(-1, keepdim=True)[0] before the softmax, which ignores it
            continue
        if len(users) != 1:
            raise UnsupportedModelError(f"eager attention scores are used more than once: {where(node)}")
        nxt = users[0]
        if is_call(nxt, {operator.mul, torch.mul}) and isinstance(nxt.args[1], float):
            if capping is not None:  # the second half of soft-capping: tanh(s / c) * c
                if capping[1] != "tanh" or nxt.args[1] != capping[0]:
                    raise UnsupportedModelError(f"eager attention: soft-capping helix does not understand at {where(nxt)}")
                softcap, capping = capping[0], None
            elif scale is None:
                scale = nxt.args[1]
            else:
                raise UnsupportedModelError(f"eager attention scaled twice: {where(nxt)}")
        elif is_call(nxt, DIV) and isinstance(nxt.args[1], float) and scale is not None:
            capping = (nxt.args[1], "div")  # Gemma 2: scores / softcap -> tanh -> * softcap
        elif is_call(nxt, DIV) and isinstance(nxt.args[1], float):
            scale = 1.0 / nxt.args[1]  # scores / sqrt(D)
        elif is_call(nxt, {torch.tanh}) or is_method(nxt, {"tanh"}):
            if capping is None or capping[1] != "div":
                raise UnsupportedModelError(f"eager attention: tanh outside soft-capping at {where(nxt)}")
            capping = (capping[0], "tanh")
        elif capping is not None:
            raise UnsupportedModelError(f"eager attention: incomplete soft-capping before {where(nxt)}")
        elif is_call(nxt, {operator.add, torch.add}):
            addend = nxt.args[1] if nxt.args[0] is node else nxt.args[0]
            bias = alibi_or_none(addend, shape(query)[1]) if alibi is None and not masked else None
            if bias is not None:
                alibi = bias  # MPT: the ALiBi bias added before the mask
            elif masked:
                raise UnsupportedModelError(f"eager attention adds to its scores twice (a bias such as ALiBi?): {where(nxt)}")
            else:
                masked = True  # the causal mask; helix masks by global positions itself
                _check_causal_mask(addend, nxt)
        elif is_method(nxt, {"masked_fill"}) and not masked and _fills_min(nxt):
            masked = True  # MPT: scores.masked_fill(causal_mask, finfo.min), True where a key is hidden
            _check_causal_mask(nxt.args[1], nxt)
        elif is_call(nxt, {torch.nn.functional.softmax, torch.softmax}):
            pass
        elif is_call(nxt, {torch.cat}) and sink is None and sink_lse is None and concat_sink(nxt, node, "attention"):
            sink = concat_sink(nxt, node, f"eager attention at {where(nxt)}")  # Flint: cat([scores, sinks], -1)
        elif sink is not None and is_drop_last(nxt):
            pass  # [..., :-1]: the sink's column dropped from the probabilities
        elif is_method(nxt, {"to", "float", "type_as"}):
            pass
        elif is_call(matmul, {torch.baddbmm}) and node is matmul and is_method(nxt, {"view"}) and len(shape(nxt)) == 4:
            pass  # the (B*H, L, S) scores viewed back as (B, H, L, S)
        elif is_call(nxt, {torch.where}):
            check_where_mask(nxt, node)  # GPT-Neo: where(tril bias[...], scores, min), implied by the causal mask
        elif is_call(nxt, {torch.nn.functional.dropout}):
            if not _dropout_is_identity(nxt):
                raise UnsupportedModelError(f"attention dropout must be 0 at inference: {where(nxt)}")
        elif is_call(nxt, MATMUL):
            if not masked:
                _check_causal_mask(None, nxt)
            route = value_route(nxt.args[1], values, keys, nxt)
            core = nxt
            if sink_lse is not None:
                sink, core = scale_sink(sink_lse, nxt, f"eager attention at {where(nxt)}")
            route.core = core
            return "eager", core, query, float(scale if scale is not None else 1.0), float(softcap), alibi, sink, route
        else:
            raise UnsupportedModelError(f"unexpected op in eager attention: {where(nxt)}")
        node = nxt


def _fills_min(node: fx.Node) -> bool:
    """``x.masked_fill(mask, value)`` with value the lowest float of x's dtype or -inf (a hidden key)."""
    value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value")
    val = node.meta.get("example_value")
    return isinstance(value, float) and isinstance(val, torch.Tensor) and val.is_floating_point() and (
        value == float("-inf") or value == torch.finfo(val.dtype).min)


def _max_shift(node: fx.Node) -> fx.Node | None:
    """The ``sub`` node of ``node - node.max(dim=-1, keepdim=True).values`` when those are ``node``'s only users (the
    row maximum subtracted before the softmax, for bf16 stability: the probabilities do not change), else None."""
    users = list(node.users)
    if len(users) != 2:
        return None
    peak = next((u for u in users if is_method(u, {"max", "amax"}) or is_call(u, {torch.max, torch.amax})), None)
    sub = next((u for u in users if is_call(u, {operator.sub, torch.sub}) and u.args[0] is node), None)
    if peak is None or sub is None or peak.args[0] is not node:
        return None
    dim = peak.kwargs.get("dim", peak.args[1] if len(peak.args) > 1 else None)
    keepdim = peak.kwargs.get("keepdim", peak.args[2] if len(peak.args) > 2 else False)
    if dim not in (-1, (-1,), [-1], len(shape(node) or ()) - 1) or keepdim is not True:
        return None
    value = sub.args[1]
    if peak.target in ("max", torch.max):  # max(dim) returns (values, indices): .values is getitem 0
        if not (is_call(value, {operator.getitem}) and value.args == (peak, 0) and len(peak.users) == 1):
            return None
    elif value is not peak:
        return None
    return sub


def _first_projection_after(node: fx.Node, region: str) -> Projection:
    between = []
    while True:
        users = list(node.users)
        if len(users) != 1:
            raise UnsupportedModelError(
                f"{region}: {where(node)} is used by {len(users)} nodes {[u.name for u in users]}; between the "
                f"attention and its output projection helix expects reshapes only (each rank holds some heads there; "
                f"an op over all heads, such as a norm, is not supported)"
            )
        node = users[0]
        if is_projection(node):
            proj = projection_of(node)
            check_only([b for b in between if b is not proj.in_view], SHAPE_METHODS | {operator.getitem}, region)
            return proj
        between.append(node)
