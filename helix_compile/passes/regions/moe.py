"""Region matcher: a mixture-of-experts FFN (router + fused experts + shared experts) as TPF x EP.

Match (pattern): one FFN module of the global Dynamo graph that holds an ``experts`` child (transformers 5.x:
fused 3-D expert weights ``experts.gate_up_proj`` (E, 2I, H) and ``experts.down_proj`` (E, H, I), run by the
``grouped_mm`` (default) or ``batched_mm`` experts implementation), a router (a projection with E outputs, then
any replicated ops: softmax or sigmoid, correction bias, grouped top-k), optional shared-expert MLPs (matched as
dense FFNs) and a shared-expert gate (a projection with 1 output).
``placements`` gives the roles ``experts_gate_up`` / ``experts_down`` (``expert_shard``, asked by
``roles.role_shard``, which ``loading.from_pretrained`` shares); ``replace_with`` is the rewrite below.
Refuses (``UnsupportedModelError`` naming the node): experts with biases, transposed or unfused expert weights,
ops inside the experts module other than the two known implementations' (e.g. the ``eager`` implementation's
``nonzero`` loop), and projections in the block other than a router (E outputs), a shared-expert gate (1 output)
and shared-expert MLPs. A MoE block is never handed to the dense matcher nor left replicated: matched or refused.

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

from ...layout import Layout
from ...shards import ExpertShard
from .common import UnsupportedModelError, module_path, where
from .projection import is_projection, projection_of

funcol = torch.ops._c10d_functional

# What the grouped_mm and batched_mm experts implementations of transformers 5.x trace to (and nothing else).
_EXPERT_METHODS = {"reshape", "view", "float", "int", "long", "to", "type", "transpose", "chunk", "unsqueeze", "squeeze",
                   "sum", "repeat_interleave", "contiguous", "clamp", "clamp_", "masked_fill", "masked_fill_"}
# int: histc's input on CUDA (float on CPU); ge / clamp_ / masked_fill(_): the expert-parallel sentinel mask of
# transformers 5.17 (always traced there; inert under helix: the local ids are all below num_experts);
# get_device_capability: the bf16 grouped_mm path on CUDA asks which kernel the card takes
_EXPERT_FUNCS = {
    torch.sort, operator.getitem, operator.ge, torch.cuda.get_device_capability, operator.floordiv, operator.mul,
    operator.setitem, torch.histc, torch.cumsum,
    torch.bmm, torch.empty_like, torch.arange, torch.mul, torch.nn.functional.silu, torch.nn.functional.gelu,
    torch.nn.functional.relu, torch.tanh, torch.sigmoid, torch.nn.functional.sigmoid,
}


@dataclasses.dataclass
class MoEMatch:
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
    shared: list  # DenseFFNMatch of the shared-expert MLPs (TP over N)
    replicated: list  # router and shared-expert gate projections: every rank computes them whole

    kind = "moe"

    def describe(self) -> str:
        shared = "".join(f"; shared {s.describe()}" for s in self.shared)
        return (f"moe {self.module} experts={self.count} ids={self.ids.name} weights={self.weights.name} "
                f"gate_up={self.gate_up.name} down={self.down.name} out={self.out.name} "
                f"replicated={[p.name for p in self.replicated]}{shared}")

    def projections(self) -> set:
        """The projection nodes this match claims (detect reports unclaimed ones as left whole)."""
        return {p.node for p in self.replicated} | {p.node for s in self.shared for p in (*s.ins, s.out)}

    def placements_nodes(self):
        """The placeholders this region places or replicates on purpose (router, shared-expert gate): for the report
        of what is left whole."""
        projs = [*self.replicated, *(p for s in self.shared for p in (*s.ins, s.out))]
        return [(self.gate_up, None, None), (self.down, None, None)] + [
            (_parameter(n), None, None) for p in projs for n in (p.weight, p.bias) if isinstance(n, fx.Node)]

    def placements(self, heads):
        out = [(self.gate_up, "experts_gate_up", "weight"), (self.down, "experts_down", "weight")]
        return out + [pl for s in self.shared for pl in s.placements(heads)]

    def replace_with(self, graph: fx.Graph, env: dict, ctx) -> None:
        for s in self.shared:
            s.replace_with(graph, env, ctx)
        rewrite(graph, self, env, ctx.layout, ctx.rank, ctx.world_group)


def _parameter(node: fx.Node) -> fx.Node:
    """The placeholder behind a weight cast in the graph (DeepSeek's router: ``weight.type(torch.float32)``)."""
    while node.op == "call_method" and node.target in ("type", "to", "float"):
        node = node.args[0]
    return node


def is_moe(mlp: str, nodes: list[fx.Node]) -> bool:
    """A block is MoE when it has an ``experts`` child, a top-k, or a MoE-looking class: then this matcher owns it
    (and matches or refuses it: it is never handed to the dense matcher nor left replicated)."""
    classes = {  # the block's own class and its children's (not the decoder layer's: AfmoeDecoderLayer says "moe"),
        # except a dense MLP class of a MoE family (AfmoeMLP, Ernie4_5_MoeMLP)
        getattr(cls, "__name__", str(cls)) for n in nodes for path, cls in (n.meta.get("nn_module_stack") or {}).values()
        if _inside(_strip_root(path), mlp) and not getattr(cls, "__name__", "").endswith("MLP")
    }
    return any(_inside(module_path(n), mlp + ".experts") or n.target is torch.topk or n.target == "topk" for n in nodes) or any(
        "moe" in c.lower() or "sparse" in c.lower() or "expert" in c.lower() for c in classes
    )


def _strip_root(path: str) -> str:
    """A ``nn_module_stack`` path without Dynamo's ``L['...']`` root (as ``common.module_path``)."""
    if path.startswith("L["):
        path = path[path.index("]") + 1 :]
        while path.startswith("["):
            path = path[path.index("]") + 1 :]
    return path.lstrip(".")


def _inside(path: str, module: str) -> bool:
    return path == module or path.startswith(module + ".")


def match_moe(graph: fx.Graph, ffn_modules) -> list[MoEMatch]:
    """One ``MoEMatch`` per FFN module (named as in ``ffn_modules``) that is a mixture of experts, in graph order."""
    groups: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        parts = module_path(node).split(".")
        hit = [i for i, p in enumerate(parts) if p in ffn_modules]
        if node.op in ("call_function", "call_method") and hit:
            groups.setdefault(".".join(parts[: hit[0] + 1]), []).append(node)
    matches = [match(module, nodes) for module, nodes in groups.items() if is_moe(module, nodes)]
    for node in graph.nodes:  # experts outside an FFN module helix knows by name: refused, never left replicated
        path = module_path(node)
        if "experts" in path.split(".") and not any(_inside(path, m.module) for m in matches):
            raise UnsupportedModelError(
                f"{where(node)} belongs to experts outside a module named {'/'.join(ffn_modules)}; helix does not "
                f"know this mixture-of-experts block"
            )
    return matches


def match(mlp: str, nodes: list[fx.Node]) -> MoEMatch:
    """Match one MoE block (see the module docstring)."""
    experts_path = mlp + ".experts"
    experts = [n for n in nodes if _inside(module_path(n), experts_path)]
    if not experts:
        raise UnsupportedModelError(
            f"{mlp}: a mixture-of-experts block without a fused '{experts_path}' module (transformers 5.x "
            f"experts with 3-D gate_up_proj/down_proj); helix cannot partition it"
        )
    inside = set(experts)
    params = dict.fromkeys(p for n in experts for p in n.all_input_nodes if p.op == "placeholder")  # graph order
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
    for n in experts:
        ok = (n.op == "call_method" and n.target in _EXPERT_METHODS) or (
            n.op == "call_function" and (n.target in _EXPERT_FUNCS or "grouped_mm" in str(n.target))
        )
        if not ok:
            raise UnsupportedModelError(
                f"{experts_path}: {where(n)} is not an op of transformers' grouped_mm or batched_mm experts; "
                f"compile the model with experts_implementation='grouped_mm' (default) or 'batched_mm'"
            )
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
    shared, rest = _shared(mlp, nodes, inside)
    replicated = []
    for n in rest:
        if is_projection(n):
            rows = _shape(n)[-1] if _shape(n) else None
            if rows not in (count, 1):  # the router (E logits) or a shared-expert gate (one scalar per token)
                raise UnsupportedModelError(
                    f"{mlp}: {where(n)} is neither the router ({count} outputs), a shared-expert gate (1 output) nor "
                    f"inside an experts / shared-expert module; helix would not know how to split it"
                )
            replicated.append(projection_of(n))
    return MoEMatch(mlp, experts_path, count, ids, weights[0], by_role["gate_up"], by_role["down"], histc, outs[0],
                    experts, shared, replicated)


def _shared(mlp, nodes, experts):
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
    from .dense_ffn import match_one  # the dense matcher, on the shared expert's own projections

    shared = []
    for module, group in groups.items():
        shared.append(match_one(module, [projection_of(n) for n in group if is_projection(n)]))
    return shared, rest


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
def rewrite(graph: fx.Graph, region: MoEMatch, by_name: dict, layout: Layout, rank: int, world_group) -> None:
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
