"""The MoE matcher: a mixture-of-experts FFN (router + fused experts + shared experts) as TPF x EP.

Contract
    in:  the nodes of one ``...mlp`` module of the global Dynamo graph whose module holds an ``experts`` child
         (transformers 5.x: fused 3-D expert weights ``experts.gate_up_proj`` (E, 2I, H) and
         ``experts.down_proj`` (E, H, I), run by the ``grouped_mm`` or ``batched_mm`` experts implementation).
    out: a ``MoERegion`` (detect); the placements of the expert weights (``expert_shard``, used by
         ``plan.role_shard``); the rank-local rewrite (``rewrite``, used by partition).
    refuses (``UnsupportedModelError`` naming the node): experts with biases, transposed or unfused expert
         weights, ops inside the experts module other than the two known implementations' (e.g. the ``eager``
         implementation's ``nonzero`` loop), other linears in the block than a router, a shared-expert gate
         and shared-expert MLPs. A block is never left replicated without saying so: it is matched or refused.

Placement (rank r, ``ep_rank = r // tpf``, ``tpf_rank = r % tpf``, El = E / ep, Il = I / tpf):
    experts.gate_up_proj   experts [ep_rank*El, (ep_rank+1)*El), rows [tpf_rank*Il, (tpf_rank+1)*Il) of the gate
                           half and the same rows of the up half, concatenated: (El, 2*Il, H)
    experts.down_proj      the same experts, columns [tpf_rank*Il, (tpf_rank+1)*Il): (El, H, Il)
    router, shared-expert gate, e_score_correction_bias    replicated: routing is computed identically everywhere
    shared experts (a dense MLP)                          TP over all N ranks, like a dense FFN

Pseudo-code of the rewrite (pattern ... into ...):
    out = experts(h, ids, w)        # ids, w: (T, k) router outputs; HF's grouped_mm / batched_mm body
into
    local  = ids - ep_rank*El;  mine = (0 <= local < El)
    ids'   = where(mine, local, 0);  w' = where(mine, w, 0)      # pairs of other ranks' experts weigh 0
    out'   = experts(h, ids', w') with the local weights, histc(bins=El, max=El-1)
    out    = wait(all_reduce(out', "sum", world))                  # sum over EP (experts) and TPF (columns)
The combine is exact: each (token, expert) pair is computed on exactly the ranks holding that expert's column
slices, every other rank adds an exact 0 (0 * finite), and the all-reduce sums the partial products. The cost
(later work): each rank runs all T*k pairs through its local experts (a pair of another rank's expert goes
through local expert 0 with weight 0) instead of an all-to-all dispatch of the pairs it owns.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from ..layout import Layout
from ..shards import ExpertShard
from .detect import UnsupportedModelError

funcol = torch.ops._c10d_functional
LINEAR = torch._C._nn.linear

# What the grouped_mm and batched_mm experts implementations of transformers 5.x trace to (and nothing else).
_EXPERT_METHODS = {"reshape", "view", "float", "to", "type", "transpose", "chunk", "unsqueeze", "squeeze", "sum",
                   "repeat_interleave", "contiguous", "clamp"}
_EXPERT_FUNCS = {
    torch.sort, operator.getitem, operator.floordiv, operator.mul, operator.setitem, torch.histc, torch.cumsum,
    torch.bmm, torch.empty_like, torch.arange, torch.mul, torch.nn.functional.silu, torch.nn.functional.gelu,
    torch.nn.functional.relu, torch.tanh, torch.sigmoid, torch.nn.functional.sigmoid,
}


@dataclasses.dataclass
class MoERegion:
    module: str  # e.g. "model.layers.1.mlp"
    experts: str  # e.g. "model.layers.1.mlp.experts"
    count: int  # routed experts E
    ids: fx.Node  # router output: expert ids (T, k), int
    weights: fx.Node  # router output: routing weights (T, k)
    gate_up: fx.Node  # placeholder (E, 2I, H)
    down: fx.Node  # placeholder (E, H, I)
    histc: list[fx.Node]  # grouped_mm: tokens per expert, bins = E
    out: fx.Node  # the experts module's output (T, H)
    nodes: list[fx.Node]  # every node of the experts module
    shared: list  # FFNRegions of the shared-expert MLPs (dense, TP over N)

    def describe(self) -> str:
        shared = [f"{s.module} ins={[n.name for n in s.ins]} out={s.out.name}" for s in self.shared]
        return (f"moe {self.module} experts={self.count} ids={self.ids.name} weights={self.weights.name} "
                f"gate_up={self.gate_up.name} down={self.down.name} out={self.out.name} shared={shared}")


def is_moe(mlp: str, nodes: list[fx.Node], module_path) -> bool:
    """A block is MoE when it has an ``experts`` child, a top-k, or a MoE-looking class: then this matcher owns it."""
    classes = {getattr(cls, "__name__", str(cls)) for n in nodes for _, cls in (n.meta.get("nn_module_stack") or {}).values()}
    return any(_inside(module_path(n), mlp + ".experts") or n.target is torch.topk or n.target == "topk" for n in nodes) or any(
        "moe" in c.lower() or "sparse" in c.lower() or "expert" in c.lower() for c in classes
    )


def _inside(path: str, module: str) -> bool:
    return path == module or path.startswith(module + ".")


def match(mlp: str, nodes: list[fx.Node], module_path, where, match_dense) -> MoERegion:
    """Match one MoE block (see the module docstring); ``match_dense(module, nodes)`` matches a shared-expert MLP."""
    experts_path = mlp + ".experts"
    experts = [n for n in nodes if _inside(module_path(n), experts_path)]
    if not experts:
        raise UnsupportedModelError(
            f"{mlp}: a mixture-of-experts block without a fused '{experts_path}' module (transformers 5.x "
            f"experts with 3-D gate_up_proj/down_proj); helix cannot partition it"
        )
    inside = set(experts)
    for n in experts:
        ok = (n.op == "call_method" and n.target in _EXPERT_METHODS) or (
            n.op == "call_function" and (n.target in _EXPERT_FUNCS or "grouped_mm" in str(n.target))
        )
        if not ok:
            raise UnsupportedModelError(
                f"{experts_path}: {where(n)} is not an op of transformers' grouped_mm or batched_mm experts; "
                f"compile the model with experts_implementation='grouped_mm' (default) or 'batched_mm'"
            )
    params = {p for n in experts for p in n.all_input_nodes if p.op == "placeholder"}
    by_role = {}
    for p in params:
        role = "gate_up" if p.name.endswith("gate_up_proj_") else "down" if p.name.endswith("down_proj_") else None
        if role is None or role in by_role:
            raise UnsupportedModelError(
                f"{experts_path}: parameter '{p.name}' is not one of the fused gate_up_proj / down_proj weights "
                f"helix knows how to split (expert biases or an unfused up_proj are not supported yet)"
            )
        by_role[role] = p
    if set(by_role) != {"gate_up", "down"}:
        raise UnsupportedModelError(f"{experts_path}: expected gate_up_proj and down_proj, found {sorted(by_role)}")
    gu, dn = (tuple(by_role[r].meta["example_value"].shape) for r in ("gate_up", "down"))
    if len(gu) != 3 or len(dn) != 3 or gu[0] != dn[0] or gu[2] != dn[1] or gu[1] != 2 * dn[2]:
        raise UnsupportedModelError(
            f"{experts_path}: gate_up_proj {gu} and down_proj {dn} are not (E, 2I, H) and (E, H, I); transposed "
            f"expert layouts are not supported yet"
        )
    count = gu[0]
    external = []
    for n in experts:
        for a in n.all_input_nodes:
            if a not in inside and a.op != "placeholder" and a not in external:
                external.append(a)
    ints = [a for a in external if _dtype(a) is not None and not _dtype(a).is_floating_point]
    if len(ints) != 1:
        raise UnsupportedModelError(f"{experts_path}: expected one expert-id input from the router, found {[a.name for a in ints]}")
    ids = ints[0]
    weights = [a for a in external if a is not ids and _shape(a) == _shape(ids) and _dtype(a).is_floating_point]
    if len(weights) != 1:
        raise UnsupportedModelError(
            f"{experts_path}: expected one routing-weight input shaped like the ids {_shape(ids)}, found "
            f"{[a.name for a in weights]}"
        )
    histc = [n for n in experts if n.target is torch.histc]
    for h in histc:
        if (h.kwargs.get("bins"), h.kwargs.get("min"), h.kwargs.get("max")) != (count, 0, count - 1) or len(h.args) != 1:
            raise UnsupportedModelError(f"{experts_path}: {where(h)} does not count tokens over the {count} experts")
    outs = [n for n in experts if any(u not in inside for u in n.users)]
    if len(outs) != 1:
        raise UnsupportedModelError(f"{experts_path}: expected one output, found {[n.name for n in outs]}")
    shared, rest = _shared(mlp, nodes, inside, module_path, match_dense)
    for n in rest:
        if n.op == "call_function" and n.target is LINEAR:
            rows = _shape(n)[-1] if _shape(n) else None
            if rows not in (count, 1):  # the router (E logits) or a shared-expert gate (one scalar per token)
                raise UnsupportedModelError(
                    f"{mlp}: {where(n)} is neither the router ({count} outputs), a shared-expert gate (1 output) nor "
                    f"inside an experts / shared-expert module; helix would not know how to split it"
                )
    return MoERegion(mlp, experts_path, count, ids, weights[0], by_role["gate_up"], by_role["down"], histc, outs[0],
                     experts, shared)


def _shared(mlp, nodes, experts, module_path, match_dense):
    """Shared-expert MLPs (Qwen2-MoE ``shared_expert``, DeepSeek ``shared_experts``): matched as dense FFNs."""
    groups: dict[str, list[fx.Node]] = {}
    rest = []
    for n in nodes:
        if n in experts:
            continue
        path = module_path(n)
        child = path[len(mlp) + 1 :].split(".")[0] if path.startswith(mlp + ".") else ""
        if child.startswith("shared_expert") and child != "shared_expert_gate":
            groups.setdefault(f"{mlp}.{child}", []).append(n)
        else:
            rest.append(n)
    return [match_dense(module, group) for module, group in groups.items()], rest


def _shape(node):
    val = node.meta.get("example_value")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _dtype(node):
    val = node.meta.get("example_value")
    return val.dtype if isinstance(val, torch.Tensor) else None


# -- plan ----------------------------------------------------------------------------------------------------------
ROLES = {"gate_up_proj": "experts_gate_up", "down_proj": "experts_down"}


def expert_shard(role: str, shape, layout: Layout, rank: int) -> ExpertShard:
    """This rank's piece of a fused expert weight (see the module docstring). Raises naming the numbers."""
    count = shape[0]
    if count % layout.ep:
        raise ValueError(f"ep={layout.ep} does not divide the {count} experts of a {tuple(shape)} expert weight")
    per_e = count // layout.ep
    e0 = layout.ep_rank(rank) * per_e
    dim, parts = (1, 2) if role == "experts_gate_up" else (2, 1)
    inter = shape[dim] // parts
    if inter % layout.tpf:
        raise ValueError(f"tpf={layout.tpf} does not divide the expert intermediate size {inter} ({tuple(shape)})")
    per = inter // layout.tpf
    t = layout.tpf_rank(rank)
    return ExpertShard(e0, e0 + per_e, dim, t * per, (t + 1) * per, parts)


# -- partition -------------------------------------------------------------------------------------------------------
def rewrite(graph: fx.Graph, region: MoERegion, by_name: dict, layout: Layout, rank: int, world_group) -> None:
    """The rank-local experts (see the module docstring): remap the router's ids, zero the weights of other ranks'
    experts, count tokens over the local experts, all-reduce the partial output over the world."""
    local_count = region.count // layout.ep
    first = layout.ep_rank(rank) * local_count
    ids, weights = by_name[region.ids.name], by_name[region.weights.name]
    experts = {by_name[n.name] for n in region.nodes}
    order = {n: i for i, n in enumerate(graph.nodes)}
    with graph.inserting_before(max(ids, weights, key=order.__getitem__).next):
        local = graph.call_function(operator.sub, (ids, first))
        mine = graph.call_function(
            torch.logical_and,
            (graph.call_function(operator.ge, (local, 0)), graph.call_function(operator.lt, (local, local_count))),
        )
        new_ids = graph.call_function(torch.where, (mine, local, 0))
        new_weights = graph.call_function(torch.where, (mine, weights, 0.0))
    for user in list(ids.users):
        if user in experts:
            user.replace_input_with(ids, new_ids)
    for user in list(weights.users):
        if user in experts:
            user.replace_input_with(weights, new_weights)
    for h in region.histc:
        node = by_name[h.name]
        node.kwargs = {**node.kwargs, "bins": local_count, "max": local_count - 1}
    if layout.world_size > 1:
        all_reduce_after(graph, by_name[region.out.name], world_group)


def all_reduce_after(graph: fx.Graph, node: fx.Node, world_group) -> fx.Node:
    """node -> wait(all_reduce(node, "sum", world)) for every user of node."""
    with graph.inserting_after(node):
        reduced = graph.call_function(funcol.all_reduce.default, (node, "sum", world_group))
    with graph.inserting_after(reduced):
        result = graph.call_function(funcol.wait_tensor.default, (reduced,))
    node.replace_all_uses_with(result, delete_user_cb=lambda user: user is not reduced)
    return result
