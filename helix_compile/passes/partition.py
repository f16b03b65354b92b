"""Pass 3, partition: global graph -> rank-local graph.

Contract
    in:  the global Dynamo graph, its ``Regions`` and this rank's ``Plan``.
    out: a new GraphModule that computes this rank's part when its placeholders receive the plan's local
         tensors (parameter shards, the cache's local shards). Its output (the logits) equals the global
         graph's on every rank. The input graph is not changed.

Rewrites, per attention region (pattern ... into ...):
    kv_write(keys, values, k, v, pos)
        into  kv_write_local(keys, values, k, v, pos, kvp_rank, kvp, kv_block)          # owner-only write
    core = sdpa(q, repeat_kv(keys), repeat_kv(values), mask)   (or the eager matmul-softmax-matmul chain)
        into  packed = partial_attention(q, keys, values, pos, kvp_rank, kvp, kv_block, scale)
              recv   = wait(all_to_all_single(packed, out=[h]*kvp, in=split, kvp_group))  # kvp > 1 only
              core'  = lse_merge(recv, kvp, D)                                          # (B, h, L, D)
          split = Layout.head_split(Q/tpa): the heads of each KVP rank (Q/N each when N divides Q);
          h = split[kvp_rank], the heads this rank holds
    o = linear(x, Wo, b)
        into  o' = wait(all_reduce(linear(x, Wo_shard), "sum", world)) [+ b]           # N > 1 only
per MLA region (``mla.py``): the same, with keys/values = this rank's up-projected latent shard and D = v_head_dim
per FFN region (and per shared-expert MLP of a MoE block):
    out = linear(h, Wdown, b)  into  wait(all_reduce(linear(h, Wdown_shard), "sum", world)) [+ b]
per MoE block (``moe.py``): routed experts over the local experts only, their output all-reduced over the world
then dead code (HF's mask construction, repeat_kv) is removed.

The model's reshapes use -1 for the head dimension, so the local head counts flow through unchanged; the
detect pass has already refused graphs where that does not hold.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..lowering import ops as _ops  # noqa: F401  registers the helix:: ops this pass emits
from . import mla as _mla
from . import moe as _moe
from .detect import Regions
from .plan import Plan

funcol = torch.ops._c10d_functional


def partition(gm: fx.GraphModule, regions: Regions, plan: Plan) -> fx.GraphModule:
    layout, rank, heads = plan.layout, plan.rank, plan.heads
    local = copy_module(gm)
    graph = local.graph
    by_name = {n.name: n for n in local.graph.nodes}
    kvp_group, world_group = layout.group_names() if layout.world_size > 1 else (None, None)
    kvp_rank = layout.kvp_rank(rank)
    split = layout.head_split(heads.q // layout.tpa)  # query heads each KVP rank holds after the all-to-all

    for a in regions.attention + regions.mla:
        keys, values, k, v, pos = (by_name[x.name] for x in a.kv_write.args)
        write, core, query = by_name[a.kv_write.name], by_name[a.core.name], by_name[a.query.name]
        with graph.inserting_before(write):
            graph.call_function(
                torch.ops.helix.kv_write_local.default, (keys, values, k, v, pos, kvp_rank, layout.kvp, layout.kv_block)
            )
        graph.erase_node(write)
        with graph.inserting_before(core):
            k_read, v_read = keys, values
            if isinstance(a, _mla.MLARegion):  # up-project this rank's latent shard only
                k_read, v_read = _mla.local_keys_values(graph, a, keys, values, by_name[a.kv_b_weight.name])
            packed = graph.call_function(
                torch.ops.helix.partial_attention.default,
                (query, k_read, v_read, pos, kvp_rank, layout.kvp, layout.kv_block, a.scale),
            )
            recv = packed
            if layout.kvp > 1:
                sent = graph.call_function(
                    funcol.all_to_all_single.default, (packed, [split[kvp_rank]] * layout.kvp, split, kvp_group)
                )
                recv = graph.call_function(funcol.wait_tensor.default, (sent,))
            merged = graph.call_function(torch.ops.helix.lse_merge.default, (recv, layout.kvp, heads.d))
        core.replace_all_uses_with(merged)
        if isinstance(a, _mla.MLARegion):
            graph.erase_node(core)
            _mla.erase_expand(graph, a, by_name)
        _row_parallel(graph, by_name[a.o_linear.name], world_group, layout.world_size)

    for f in regions.ffn + [s for m in regions.moe for s in m.shared]:
        _row_parallel(graph, by_name[f.out.name], world_group, layout.world_size)
    for m in regions.moe:
        _moe.rewrite(graph, m, by_name, layout, rank, world_group)

    eliminate_dead_code(graph)
    graph.lint()
    local.recompile()
    return local


def copy_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph (node meta shared shallowly): passes leave their input alone."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return fx.GraphModule(gm, graph)


def eliminate_dead_code(graph: fx.Graph) -> None:
    """FX's DCE, keeping in-place tensor methods (``cumulative_length.add_``), which FX treats as pure."""
    graph.eliminate_dead_code(
        is_impure_node=lambda node: node.is_impure() or (node.op == "call_method" and str(node.target).endswith("_"))
    )


def _row_parallel(graph: fx.Graph, linear: fx.Node, world_group: str | None, n: int) -> None:
    """linear(x, W_shard, b) -> all_reduce(linear(x, W_shard)) + b: the partial sums of all N ranks, bias once."""
    if n == 1:
        return
    bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
    linear.args = (linear.args[0], linear.args[1], None)
    linear.kwargs = {}
    with graph.inserting_after(linear):
        reduced = graph.call_function(funcol.all_reduce.default, (linear, "sum", world_group))
    with graph.inserting_after(reduced):
        result = graph.call_function(funcol.wait_tensor.default, (reduced,))
    if bias is not None:
        with graph.inserting_after(result):
            result = graph.call_function(torch.add, (result, bias))
    linear.replace_all_uses_with(result, delete_user_cb=lambda user: user is not reduced)
