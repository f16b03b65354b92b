"""Pass 4, schedule: HOP-B (helix overlap pipeline, batch-wise).

Contract
    in:  the partitioned rank-local graph and the plan (``layout.hopb_chunks``).
    out: with ``hopb_chunks == 1``, or ``kvp == 1`` (no exchange to hide), the same graph. Otherwise a new one:
         every
         attention exchange is split into ``C = hopb_chunks`` batch chunks ordered so that the all-to-all of
         chunk i is in flight while chunk i+1's partial attention runs, and chunk i's merge overlaps chunk
         i+1's exchange. Results are bit-identical per row (each row's math is unchanged).
    refuses: a batch not divisible by ``C``; an attention chain other than
         partial_attention -> [head reorder] -> all_to_all_single -> wait_tensor -> lse_merge (it only reorders what
         it knows; the head reorder of heads in parts, ``attention.exchange_and_merge``, is copied per chunk).

Pseudo-code, per attention layer (pattern ... into ...):
    o = lse_merge(wait(a2a(partial_attention(q, K, V, pos))))
into
    for i in 0..C-1:  p_i = partial_attention(q[i], K[i], V[i], pos); s_i = a2a(p_i)     # issue
    for i in 0..C-1:  o_i = lse_merge(wait(s_i))                                        # drain
    o = cat(o_0 .. o_{C-1}, dim=0)
where x[i] = x.narrow(0, i*B/C, B/C) (batch rows; the cache shards and the key mask are sliced the same way).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .partition import copy_module, eliminate_dead_code
from .plan import Placements

PARTIAL = torch.ops.helix.partial_attention.default
A2A = torch.ops._c10d_functional.all_to_all_single.default
WAIT = torch.ops._c10d_functional.wait_tensor.default
MERGE = torch.ops.helix.lse_merge.default


def schedule(gm: fx.GraphModule, plan: Placements) -> fx.GraphModule:
    chunks = plan.layout.hopb_chunks
    if chunks == 1 or plan.layout.kvp == 1:
        return gm
    gm = copy_module(gm)
    graph = gm.graph
    partials = [n for n in graph.nodes if n.op == "call_function" and n.target is PARTIAL]
    for partial in partials:
        _chunk(graph, partial, chunks)
    eliminate_dead_code(graph)
    graph.lint()
    gm.recompile()
    return gm


def _only_user(node: fx.Node, target) -> fx.Node:
    users = list(node.users)
    if len(users) != 1 or users[0].target is not target:
        raise ValueError(
            f"HOP-B: expected '{node.name}' to feed exactly one {target}, found {[u.format_node() for u in users]}; "
            f"refusing to reschedule a graph it does not understand"
        )
    return users[0]


def _reorder(partial: fx.Node) -> list[fx.Node]:
    """The head reorder between a partial attention and its all-to-all (heads in parts: ``exchange_and_merge``),
    unflatten(0, ...) -> transpose(0, 1) -> flatten(0, 2) on the heads dim: the same for every batch chunk; [] if
    none."""
    chain, node = [], partial
    for method in ("unflatten", "transpose", "flatten"):
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_method" or users[0].target != method:
            break
        node = users[0]
        chain.append(node)
    return chain if len(chain) == 3 else []  # anything else: _chunk refuses it


def _chunk(graph: fx.Graph, partial: fx.Node, chunks: int) -> None:
    reorder = _reorder(partial)
    a2a = _only_user(reorder[-1] if reorder else partial, A2A)
    wait = _only_user(a2a, WAIT)
    merge = _only_user(wait, MERGE)
    query, keys, values, pos, *rest = partial.args
    batch = query.meta["example_value"].shape[0] if "example_value" in query.meta else None
    if batch is None or not isinstance(batch, int):
        raise ValueError(f"HOP-B needs a static batch size; '{query.name}' has batch {batch}")
    if batch % chunks:
        raise ValueError(f"HOP-B: batch {batch} is not divisible by hopb_chunks={chunks}")
    rows = batch // chunks
    sent = []
    with graph.inserting_before(partial):
        for i in range(chunks):
            q_i, k_i, v_i = (graph.call_function(torch.narrow, (x, 0, i * rows, rows)) for x in (query, keys, values))
            kwargs_i = {
                name: graph.call_function(torch.narrow, (x, 0, i * rows, rows)) if name in ("key_mask", "alibi_pos", "k_rope") else x
                for name, x in partial.kwargs.items()
            }
            p_i = graph.call_function(PARTIAL, (q_i, k_i, v_i, pos, *rest), kwargs_i)
            for node in reorder:  # on the heads dim (0): the same for a chunk of the batch (dim 1)
                p_i = graph.call_method(node.target, (p_i, *node.args[1:]), node.kwargs)
            sent.append(graph.call_function(A2A, (p_i, *a2a.args[1:])))
    with graph.inserting_before(merge):
        outs = [graph.call_function(MERGE, (graph.call_function(WAIT, (s,)), *merge.args[1:])) for s in sent]
        joined = graph.call_function(torch.cat, (outs, 0))
    merge.replace_all_uses_with(joined)
    for node in (merge, wait, a2a, *reversed(reorder), partial):
        graph.erase_node(node)
