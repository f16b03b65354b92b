"""Attention (part): the rewrite, with the exchange and merge. What ``AttentionMatch.replace_with`` does to one
rank's copy of the graph.

Contract
    rewrite(match, graph, env, ctx)   rewrites ``match``'s region in ``graph`` (``env``: name -> node of the copy;
                    ``ctx``: a ``RewriteContext``) so that the rank computes its part: its KV blocks, its heads' partial
                    attention, after the exchange its heads' exact attention output, and its slice of the o
                    projection, summed over the world. Refuses (``UnsupportedModelError``) a layout under which heads
                    in parts (``Heads.parts``) or rearranged value heads (``ValueRoute``) would not be exact.
    exchange_and_merge(graph, packed, ctx, head_dim, parts=1)   the Helix exchange shared by every attention kind
                    (GQA/MHA here, MLA in ``mla.py``): all-to-all of the packed partials over the KVP group
                    (kvp > 1), then ``lse_merge``

Pattern ... into ...:
    kv_write(keys, values, k, v, pos)
        into  kv_write_local(keys, values, k, v, pos, kvp_rank, kvp, kv_block)          # owner-only write
        FP8 cache: kv_write_local_fp8(keys, values, k_scale, v_scale, k, v, pos, ...), where k_scale / v_scale are
              new inputs of the local graph (``RewriteContext.kv_scale``), and partial attention takes
              k_scale=, v_scale=
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
A kv-shared reader's match leaves the write to its writer's and reads the same local shard. A batch smaller than
the cache's reads and writes its first rows of the shards (``_batch_rows``).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from .alibi import IndexSplit
from .attention_values import ValueRoute
from .common import UnsupportedModelError
from .heads import all_reduce_mean, per_group_qkv
from .sinks import add_sink

funcol = torch.ops._c10d_functional


def rewrite(match, graph: fx.Graph, env: dict, ctx) -> None:
    """``match``'s region on this rank (module docstring); ``match`` an ``attention.AttentionMatch``."""
    if ctx.heads.per_layer:  # this layer's shape (Gemma 4: full-attention layers have their own head_dim)
        ctx = dataclasses.replace(ctx, heads=ctx.heads.layer(match.layer))
    layout, heads = ctx.layout, ctx.heads
    check_parts(match, heads, layout, ctx.rank)
    keys, values, k, v, pos = (env[x.name] for x in match.kv_write.args)
    query = env[match.query.name]
    first, stop = layout.kv_heads(heads.k, ctx.rank)  # tpa > K: one KV head, duplicated (TP baseline)
    scales = (ctx.kv_scale(graph, keys, stop - first), ctx.kv_scale(graph, values, stop - first))
    if scales[0] is not None and any(route.ops for route in match.routes or []):
        raise UnsupportedModelError(f"{match.module}: an FP8 KV cache with rearranged value heads is not supported")
    if match.shares is not None:  # the writer's match rewrites the write; this layer reads the same local shard
        with graph.inserting_before(env[match.core.name]):
            keys, values = _batch_rows(graph, keys, values, k)
    else:
        write = env[match.kv_write.name]
        with graph.inserting_before(write):
            keys, values = _batch_rows(graph, keys, values, k)
            if scales[0] is None:
                graph.call_function(
                    torch.ops.helix.kv_write_local.default,
                    (keys, values, k, v, pos, ctx.kvp_rank, layout.kvp, layout.kv_block),
                )
            else:
                graph.call_function(
                    torch.ops.helix.kv_write_local_fp8.default,
                    (keys, values, *scales, k, v, pos, ctx.kvp_rank, layout.kvp, layout.kv_block),
                )
        graph.erase_node(write)
    for route in match.routes or [ValueRoute(match.core, match.values, match.values, [])]:
        core, value = env[route.core.name], values
        if route.ops:  # the model's own rearrangement of the local values (checked by check_parts)
            with graph.inserting_before(core):
                _, value = _batch_rows(graph, env[match.keys.name], env[route.node.name], k)
        _attend(match, graph, env, ctx, core, query, keys, value, pos, scales)
    if match.fused == "qkv_heads":
        group = per_group_qkv(match.module, match.q, match.split, heads)
        if (heads.q // layout.tpa) % group:
            raise UnsupportedModelError(
                f"{match.module}: fused qkv {match.q.name} interleaves q, k and v per group of {group} heads; "
                f"tpa={layout.tpa} gives each rank {heads.q // layout.tpa} heads, not whole groups"
            )
    q_local, k_local, v_local = heads.q // layout.tpa * heads.d, (stop - first) * heads.d, (stop - first) * heads.dv
    if match.shares is not None:
        match.q.column_parallel(env, q_local)
    elif match.fused is None:
        for proj, width in ((match.q, q_local), (match.k, k_local), (match.v, v_local)):
            if proj is match.v and match.v.node is match.k.node:
                continue  # k = v (attention_k_eq_v): rewritten once, as k
            proj.column_parallel(env, width)
    else:
        match.q.column_parallel(env, q_local + k_local + v_local)
        if isinstance(match.split, IndexSplit):
            match.split.replace_with(env)
        if match.fused == "qkv" and match.split is not None:
            qd, kd, vd = heads.q * heads.d, heads.k * heads.d, heads.k * heads.dv
            match.split.replace_with(env, [0, qd, qd + kd, qd + kd + vd],
                                     [0, q_local, q_local + k_local, q_local + k_local + v_local])
    for norm in match.norms:
        if layout.tpa > 1:
            all_reduce_mean(graph, env[norm.mean.name], norm.width, ctx.tpa_group)
    ratios = {"q": (heads.q // layout.tpa, heads.q), "kv": (stop - first, heads.k),
              "qkv": (heads.q // layout.tpa + 2 * (stop - first), heads.q + 2 * heads.k)}
    for view in match.views:
        view.replace_with(env, *ratios[view.path])
    if match.output is not None:
        match.output.replace_with(graph, env, ctx, heads.dv)
    match.o.row_parallel(graph, env, ctx.world_group, layout.world_size, ctx.split[ctx.kvp_rank] * heads.dv)


def _attend(match, graph: fx.Graph, env: dict, ctx, core: fx.Node, query: fx.Node, keys: fx.Node, values: fx.Node,
            pos: fx.Node, scales=(None, None)) -> None:
    """core = attention(query, cache)  into  lse_merge(exchange(partial_attention(query, keys, values, ...)))."""
    layout, heads = ctx.layout, ctx.heads
    args = (query, keys, values, pos, ctx.kvp_rank, layout.kvp, layout.kv_block, match.scale)
    if match.softcap or match.window:
        args += (float(match.softcap), int(match.window))
    kwargs = {"key_mask": env[match.key_mask.name]} if match.key_mask is not None else {}
    if match.chunk:
        kwargs["chunk"] = int(match.chunk)
    if scales[0] is not None:  # FP8 shards
        kwargs["k_scale"], kwargs["v_scale"] = scales
    with graph.inserting_before(core):
        if match.alibi is not None:  # the slopes of this rank's query heads (its TPA slice)
            per = heads.q // layout.tpa
            slopes = match.alibi.local_slopes(layout.tpa_rank(ctx.rank) * per, per)
            device = query.meta["example_value"].device if "example_value" in query.meta else None
            kwargs["alibi_slopes"] = graph.call_function(
                torch.tensor, (slopes,), {"dtype": torch.float32, "device": device})
            if match.alibi.positions is not None:
                kwargs["alibi_pos"] = env[match.alibi.positions.name]
        packed = graph.call_function(torch.ops.helix.partial_attention.default, args, kwargs)
        if match.sink is not None and ctx.kvp_rank == 0:  # the sink joins one partial per KVP group
            packed = add_sink(graph, packed, env[match.sink.name], heads.dv, match.query.meta["example_value"].dtype)
        merged = exchange_and_merge(graph, packed, ctx, heads.dv, heads.parts)
    core.replace_all_uses_with(merged)


def check_parts(match, heads, layout, rank: int) -> None:
    """Refuse a layout under which the heads in parts of ``match`` would not be exact on ``rank``: the parts the
    graph cuts the output heads into must be the config's (``Heads.parts``: the q/k/v rows the rank holds and
    the exchange follow those), and every rearrangement of the value heads must give each local query head its
    global value head (``ValueRoute.check``)."""
    if layout.world_size == 1:
        return
    parts = match.output.parts if match.output is not None else 1
    if parts != heads.parts:
        cut = f"at {match.output.cut.node.name}" if parts > 1 else "nowhere"
        raise UnsupportedModelError(
            f"{match.module}: the graph cuts the attention output's heads into {parts} part(s) ({cut}), but the "
            f"config's heads are in {heads.parts} (layout._HEAD_PARTS: model types whose attention pairs heads "
            f"across parts); helix cannot shard these heads exactly"
        )
    if heads.parts > 1 and match.alibi is not None:
        raise UnsupportedModelError(f"{match.module}: ALiBi over heads in {heads.parts} parts is not supported")
    for route in match.routes:
        route.check(heads, layout, rank)


def exchange_and_merge(graph: fx.Graph, packed: fx.Node, ctx, head_dim: int, parts: int = 1) -> fx.Node:
    """packed partials -> wait(all_to_all over the KVP group) (kvp > 1) -> lse_merge: the Helix exchange, shared by
    every attention kind (GQA/MHA, MLA in mla.py).

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
