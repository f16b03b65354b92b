"""Pass 3, partition: global graph -> rank-local graph.

Contract
    in:  the global Dynamo graph, its ``Regions`` and this rank's ``Placements``.
    out: a new GraphModule that computes this rank's part when its placeholders receive the plan's local
         tensors (parameter shards, the cache's local shards). Its output (the logits) equals the global
         graph's on every rank. The input graph is not changed.

Pseudo-code
    local = copy of the graph; env = name -> node of the copy
    for match in regions.matches (attention first, then FFN; graph order within each):
        match.replace_with(local.graph, env, ctx)      # each region kind owns its rewrite (passes/regions/)
    dead code (HF's mask construction, repeat_kv) is removed

The rewrites, in short (each matcher's docstring has the pattern ... into ...):
    attention  kv_write -> kv_write_local (owner-only); core -> partial_attention (key_mask = the 2-D
               attention_mask of padded batches, if any) -> all_to_all over the KVP
               group (kvp > 1) -> lse_merge; o projection row-parallel (all-reduce over the world, bias once);
               norms over all heads' features -> all-reduce of partial sums over the TPA group (tpa > 1)
    dense FFN  in projections column-parallel, out projection row-parallel (all-reduce, bias once)

Most models' reshapes use -1 for the head dimension, so the local head counts flow through unchanged; views that
name the head count (``view(B, L, num_heads, D)``), the constant widths of Conv1D views and fused-projection cuts
are rewritten by their matchers (``regions/heads.py``, ``projection.py``).

FP8 cache (``plan.kv_dtype``): the local graph has one more input per cache tensor, its fp32 per-head scale,
after the global ones (``RewriteContext.kv_scale``; the ``Runtime`` passes it).

Batch: a call with b < max_batch_size rows reads and writes the first b rows of the cache shards (the attention
matcher narrows them); the rows beyond stay unused.
"""

from __future__ import annotations

import torch.fx as fx

from ..lowering import ops as _ops  # noqa: F401  registers the helix:: ops the rewrites emit
from .detect import Regions
from .plan import Placements
from .regions import RewriteContext


def partition(gm: fx.GraphModule, regions: Regions, plan: Placements) -> fx.GraphModule:
    layout = plan.layout
    local = copy_module(gm)
    graph = local.graph
    env = {n.name: n for n in graph.nodes}
    groups = layout.group_names() if layout.world_size > 1 else (None, None)
    tpa_group = layout.tpa_group_name() if layout.tpa > 1 else None
    ctx = RewriteContext(layout, plan.rank, plan.heads, groups[0], tpa_group, groups[1],
                         kv_fp8=plan.kv_dtype == "float8_e4m3fn")
    for match in regions.matches:
        match.replace_with(graph, env, ctx)
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
