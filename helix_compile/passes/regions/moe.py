"""Region matcher: a mixture-of-experts FFN (router + fused experts + shared experts) as TPF x EP.

Match (pattern): one FFN module of the global Dynamo graph that ``is_moe`` (an ``experts`` child, a top-k, a 3-D
parameter, or a MoE class at or below it; a family's dense ``...MoeMLP`` first layers are dense) and holds an
``experts`` child: transformers 5.x fused 3-D expert weights ``experts.gate_up_proj`` / ``experts.down_proj``,
stored (E, 2I, H) / (E, H, I) or transposed (E, H, 2I) / (E, I, H) (Aria; read from how the matmul consumes
them), optional biases ``gate_up_proj_bias`` (E, 2I) / ``down_proj_bias`` (E, H), run by the ``grouped_mm``
(default) or ``batched_mm`` experts implementation; a router (a projection with E outputs, then any replicated
ops: softmax or sigmoid, correction bias, grouped top-k), shared-expert MLPs (any child module with two or more
projections: ``shared_expert(s)``, HunYuan's ``shared_mlp``; matched as dense FFNs) and a shared-expert gate (a
projection with 1 output). The experts' ops are checked by where they sit:
    between the two matmuls   the intermediate, split by columns over tpf: ops on each element only (a custom
                              gate such as MiniMax-M3's clamp / sigmoid / ``up + 1``), and either one
                              chunk(2, dim=-1) into the gate and up halves, or the two strided cuts
                              ``[..., ::2]`` / ``[..., 1::2]`` of gate_up rows interleaved [g0 u0 g1 u1 ...] (gpt-oss)
    after the down matmul     partial sums over tpf: linear ops only (routing weights, gathers, the sum over k,
                              the down bias)
    elsewhere                 the routing bookkeeping of the two implementations (sort, histc, gathers)
``placements`` gives the roles ``experts_gate_up`` / ``experts_down`` (``expert_shard``, asked by
``roles.role_shard``, which ``loading.from_pretrained`` shares); ``replace_with`` is the rewrite below.
Refuses (``UnsupportedModelError`` naming the node or parameter): unfused or unknown expert parameters, ops
across the intermediate features (any other cut of the gate_up output), non-linear ops after the down matmul (a
post-expert norm), ops inside the experts module other than the two known implementations' (e.g. the ``eager``
implementation's ``nonzero`` loop), projections in the block other than a router (E outputs), a shared-expert
gate (1 output) and shared-expert MLPs, and experts outside an FFN module (``refuse_stray_experts``: JetMoE's
routed attention heads). A MoE block is never handed to the dense matcher nor left replicated: matched or refused.

Placement (rank r, ``ep_rank = r // tpf``, ``tpf_rank = r % tpf``, El = E / ep, Il = I / tpf):
    experts.gate_up_proj   experts [ep_rank*El, (ep_rank+1)*El), rows [tpf_rank*Il, (tpf_rank+1)*Il) of the gate
                           half and the same rows of the up half, concatenated: (El, 2*Il, H); interleaved rows
                           (gpt-oss, kind ``..._interleaved``): the one range [2*tpf_rank*Il, 2*(tpf_rank+1)*Il),
                           the same features' (gate, up) pairs, which the model's own [..., ::2] / [..., 1::2] cut
    experts.down_proj      the same experts, columns [tpf_rank*Il, (tpf_rank+1)*Il): (El, H, Il)
    (transposed: the same pieces along the other dim: (El, H, 2*Il) and (El, Il, H))
    gate_up_proj_bias      the rows of gate_up_proj: (El, 2*Il);  down_proj_bias: the experts whole, (El, H),
                           added on tpf_rank 0 only (elsewhere the rewrite adds 0 * b: the all-reduce adds it once)
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
slices, every other rank adds an exact 0 (0 * finite), and the all-reduce sums the partial products.

Dense experts (Llama 4's ``Llama4TextExperts``: no expert ids; every token goes through every expert, the routing
scores already applied to the input, 0 for the experts a token does not pick): the experts' only input is
x (E*T, H), viewed (E, T, H) and run as bmm(x3, gate_up (E, H, 2I)) -> chunk -> act -> bmm(., down (E, I, H)) ->
view(E*T, H). ``dense`` is that view to (E, ...). Pattern ... into ...:
    x3 = view(x, E, -1, H)          into  x3 = narrow(view(x, E, -1, H), 0, ep_rank*El, El)     # the local experts
    y  = bmm(., down)  (E, T, H)    into  y = pad(bmm(., down_local), experts before / after)   # other experts: 0
    out = view(y, -1, H)            into  wait(all_reduce(out, "sum", world))                   # EP and TPF sums
The cost
(not optimised): each rank runs all T*k pairs through its local experts (a pair of another rank's expert goes
through local expert 0 with weight 0) instead of an all-to-all dispatch of the pairs it owns.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from ...layout import Layout
from ...shards import ExpertShard
from .common import UnsupportedModelError, is_pointwise, module_path, where
from .ffn_kind import inside as _inside, is_moe
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
    transposed: bool = False  # expert weights stored (E, in, out): gate_up (E, H, 2I), down (E, I, H) (Aria)
    interleaved: bool = False  # gate_up features interleaved [g0 u0 g1 u1 ...], cut by [..., ::2] / [..., 1::2]
    gate_up_bias: fx.Node | None = None  # placeholder (E, 2I)
    down_bias: fx.Node | None = None  # placeholder (E, H)
    down_bias_adds: list = dataclasses.field(default_factory=list)  # where the down bias joins the partial sums
    routing: list = dataclasses.field(default_factory=list)  # other parameters the router reads (ERNIE's moe_statics)
    dense: fx.Node | None = None  # dense experts (Llama 4; ids, weights None): the input's view to (E, T, H)
    down_mm: fx.Node | None = None  # dense experts: the down bmm (E, T, H)

    kind = "moe"

    def describe(self) -> str:
        shared = "".join(f"; shared {s.describe()}" for s in self.shared)
        extra = (" transposed" if self.transposed else "") + (" interleaved" if self.interleaved else "") + ("".join(
            f" {b.name}" for b in (self.gate_up_bias, self.down_bias) if b is not None))
        routing = (f"dense={self.dense.name}" if self.dense is not None else
                   f"ids={self.ids.name} weights={self.weights.name}")
        return (f"moe {self.module} experts={self.count} {routing} "
                f"gate_up={self.gate_up.name} down={self.down.name} out={self.out.name}{extra} "
                f"replicated={[p.name for p in self.replicated]}{shared}")

    def projections(self) -> set:
        """The projection nodes this match claims (detect reports unclaimed ones as left whole)."""
        return {p.node for p in self.replicated} | {p.node for s in self.shared for p in (*s.ins, s.out)}

    def placements_nodes(self):
        """The placeholders this region places or replicates on purpose (router, shared-expert gate): for the report
        of what is left whole."""
        projs = [*self.replicated, *(p for s in self.shared for p in (*s.ins, s.out))]
        biases = [(b, None, None) for b in (self.gate_up_bias, self.down_bias, *self.routing) if b is not None]
        return [(self.gate_up, None, None), (self.down, None, None), *biases] + [
            (_parameter(n), None, None) for p in projs for n in (p.weight, p.bias) if isinstance(n, fx.Node)]

    def placements(self, heads):
        kind = "weight_t" if self.transposed else "weight"
        pairs = INTERLEAVED if self.interleaved else ""  # the gate_up rows' layout (see expert_shard)
        out = [(self.gate_up, "experts_gate_up", kind + pairs), (self.down, "experts_down", kind)]
        out += [(b, role, "bias" + (pairs if role == "experts_gate_up" else ""))
                for b, role in ((self.gate_up_bias, "experts_gate_up"), (self.down_bias, "experts_down")) if b is not None]
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


def match_moe(graph: fx.Graph, ffn_modules) -> list[MoEMatch]:
    """One ``MoEMatch`` per FFN module (named as in ``ffn_modules``) that is a mixture of experts, in graph order."""
    groups: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        parts = module_path(node).split(".")
        hit = [i for i, p in enumerate(parts) if p in ffn_modules]
        if node.op in ("call_function", "call_method") and hit:
            groups.setdefault(".".join(parts[: hit[0] + 1]), []).append(node)
    refuse_stray_experts(graph, ffn_modules)
    return [match(module, nodes) for module, nodes in groups.items() if is_moe(module, nodes)]


def refuse_stray_experts(graph: fx.Graph, ffn_modules) -> None:
    """Experts outside an FFN module helix knows by name are refused, never left replicated. ``detect`` asks this
    before matching attention, so that routed experts inside an attention module (JetMoE's mixture of attention
    heads) are refused by what they are."""
    for node in graph.nodes:
        parts = module_path(node).split(".")
        if node.op == "placeholder" or "experts" not in parts or any(
                p in ffn_modules for p in parts[: parts.index("experts")]):
            continue
        owner = ".".join(parts[: parts.index("experts")])
        if "attn" in owner.split(".")[-1] or "attention" in owner.split(".")[-1]:
            weights = sorted({str(_shape(a)) for n in graph.nodes if _inside(module_path(n), owner + ".experts")
                              for a in n.all_input_nodes if a.op == "placeholder" and len(_shape(a) or ()) == 3})
            raise UnsupportedModelError(
                f"{owner}: routed experts inside the attention module (a mixture of attention heads, as JetMoE's "
                f"MoA: a router picks each token's query and output projections among the expert weights "
                f"{', '.join(weights)}); helix splits attention by fixed per-head q/k/v/o projections and cannot run "
                f"this exactly; first op: {where(node)}"
            )
        raise UnsupportedModelError(
            f"{where(node)} belongs to experts outside a module named {'/'.join(ffn_modules)}; helix does not "
            f"know this mixture-of-experts block"
        )


_PARAM_ROLES = {  # the experts' parameters by the end of their placeholder name (transformers 5.x experts)
    "gate_up_proj_bias_": "gate_up_bias", "down_proj_bias_": "down_bias", "gate_up_proj_": "gate_up",
    "down_proj_": "down",
}
_MATMULS = (torch.bmm,)  # and the grouped_mm ops (by name: torch._grouped_mm, transformers::grouped_mm_fallback,
# helix::grouped_mm: torch._grouped_mm over a virtual weight, see shards.route_virtual_experts)
_LINEAR_AFTER_DOWN = {"view", "reshape", "unsqueeze", "squeeze", "contiguous", "to", "float", "type", "sum"}


def _is_matmul(node: fx.Node) -> bool:
    return node.op == "call_function" and (node.target in _MATMULS or "grouped_mm" in str(node.target))


def _param_role(name: str):
    return next((role for end, role in _PARAM_ROLES.items() if name.endswith(end)), None)


def match(mlp: str, nodes: list[fx.Node]) -> MoEMatch:
    """Match one MoE block (see the module docstring)."""
    experts_path = mlp + ".experts"
    experts = [n for n in nodes if _inside(module_path(n), experts_path)]
    if not experts:
        children = sorted({module_path(n)[len(mlp) + 1 :].split(".")[0] for n in nodes if module_path(n) != mlp})
        raise UnsupportedModelError(
            f"{mlp}: a mixture-of-experts block without a fused '{experts_path}' module (transformers 5.x "
            f"experts with 3-D gate_up_proj/down_proj; this block's children: {children}); helix cannot partition it"
        )
    inside = set(experts)
    # tensor placeholders in graph order (a symbolic prompt length is a SymInt placeholder: not a parameter)
    params = dict.fromkeys(p for n in experts for p in n.all_input_nodes if p.op == "placeholder" and _is_tensor(p))
    by_role = {}
    for p in params:
        role = _param_role(p.name)
        if role is None or role in by_role:
            raise UnsupportedModelError(
                f"{experts_path}: parameter '{p.name}' {_shape(p)} is not one of the fused gate_up_proj / down_proj "
                f"weights (and their biases) helix knows how to split (an unfused up_proj is not supported yet)"
            )
        by_role[role] = p
    if not {"gate_up", "down"} <= set(by_role):
        raise UnsupportedModelError(f"{experts_path}: expected gate_up_proj and down_proj, found {sorted(by_role)}")
    outs = [n for n in experts if _is_tensor(n) and any(u not in inside for u in n.users)]  # sizes read outside: no
    if len(outs) != 1 or _shape(outs[0]) is None or len(_shape(outs[0])) != 2:
        raise UnsupportedModelError(f"{experts_path}: expected one (tokens, hidden) output, found {[n.name for n in outs]}")
    hidden = _shape(outs[0])[-1]
    gu_mm, gu_t = _weight_matmul(experts_path, by_role["gate_up"], inside)
    dn_mm, dn_t = _weight_matmul(experts_path, by_role["down"], inside)
    gu, dn = _shape(by_role["gate_up"]), _shape(by_role["down"])
    if gu_t != dn_t:
        raise UnsupportedModelError(f"{experts_path}: gate_up_proj {gu} and down_proj {dn} are used in different "
                                    f"orientations ({'(E, in, out)' if gu_t else '(E, out, in)'} and the other)")
    # (E, 2I, H) and (E, H, I) as stored, or transposed (E, H, 2I) and (E, I, H) (Aria: the layout grouped_mm reads)
    inter = dn[1] if dn_t else dn[2]
    want_gu, want_dn = ((gu[0], hidden, 2 * inter), (gu[0], inter, hidden)) if gu_t else (
        (gu[0], 2 * inter, hidden), (gu[0], hidden, inter))
    if len(gu) != 3 or (gu, dn) != (want_gu, want_dn):
        raise UnsupportedModelError(
            f"{experts_path}: gate_up_proj {gu} and down_proj {dn} are not {want_gu} and {want_dn} for hidden size "
            f"{hidden} ({'transposed: (E, in, out)' if gu_t else '(E, out, in)'})"
        )
    count = gu[0]
    for role, want in (("gate_up_bias", (count, 2 * inter)), ("down_bias", (count, hidden))):
        if role in by_role and _shape(by_role[role]) != want:
            raise UnsupportedModelError(f"{experts_path}: {by_role[role].name} {_shape(by_role[role])} is not {want}")
    mid, post = _check_expert_ops(experts_path, experts, inside, gu_mm, dn_mm, by_role)
    interleaved = _check_gate_split(experts_path, gu_mm, mid, inter)
    external = []
    for n in experts:
        for a in n.all_input_nodes:
            if a not in inside and a.op != "placeholder" and a not in external:
                external.append(a)
    ints = [a for a in external if _dtype(a) is not None and not _dtype(a).is_floating_point]
    dense = _dense_input(experts_path, external, gu_mm, count, hidden) if not ints and gu_t else None
    if dense is not None:
        ints, weights = [None], [None]
    elif len(ints) != 1:
        raise UnsupportedModelError(f"{experts_path}: expected one expert-id input from the router, found {[a.name for a in ints]}")
    ids = ints[0]
    if dense is None:
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
    bias = by_role.get("down_bias")
    down_bias_adds = [n for n in post if any(a.op == "call_function" and a.target is operator.getitem and a.args[0] is bias
                                             for a in n.all_input_nodes)] if bias is not None else []
    if bias is not None and (len(down_bias_adds) != 1 or len(bias.users) != 1):
        raise UnsupportedModelError(f"{experts_path}: expected the down bias {bias.name} to be gathered and added once "
                                    f"after the down projection, found {[n.name for n in down_bias_adds]}")
    weights_of = {x for r in replicated for x in (r.weight, r.bias)}
    routing = list(dict.fromkeys(a for n in rest for a in n.all_input_nodes
                                 if a.op == "placeholder" and _is_tensor(a) and a not in weights_of))
    return MoEMatch(mlp, experts_path, count, ids, weights[0], by_role["gate_up"], by_role["down"], histc, outs[0],
                    experts, shared, replicated, transposed=gu_t, interleaved=interleaved,
                    gate_up_bias=by_role.get("gate_up_bias"),
                    down_bias=by_role.get("down_bias"), down_bias_adds=down_bias_adds, routing=routing, dense=dense,
                    down_mm=dn_mm if dense is not None else None)


def _dense_input(experts_path: str, external: list, gu_mm: fx.Node, count: int, hidden: int) -> fx.Node | None:
    """Dense experts (see the module doc): the view (E, -1, H) of the experts' one input that the gate_up bmm
    reads; None when the experts are not of that form (then ``match`` asks for the router's ids)."""
    x3 = gu_mm.args[0]
    if len(external) != 1 or gu_mm.target is not torch.bmm or not isinstance(x3, fx.Node):
        return None
    if not (x3.op == "call_method" and x3.target in ("view", "reshape") and x3.args[0] is external[0]):
        return None
    if _shape(x3) is None or len(_shape(x3)) != 3 or (_shape(x3)[0], _shape(x3)[2]) != (count, hidden):
        raise UnsupportedModelError(f"{experts_path}: {where(x3)} feeds the experts {_shape(x3)}, not ({count}, "
                                    f"tokens, {hidden}) (every token through every expert)")
    if x3.args[1:2] != (count,) or len(x3.users) != 1:
        raise UnsupportedModelError(f"{experts_path}: {where(x3)} does not view the experts' input as ({count}, -1, "
                                    f"{hidden}) once")
    return x3


def _from(source: fx.Node, inside: set) -> set:
    """``source`` and every node of the experts module computed from it."""
    seen, stack = {source}, [source]
    while stack:
        for u in stack.pop().users:
            if u in inside and u not in seen:
                seen.add(u)
                stack.append(u)
    return seen


def _weight_matmul(experts_path: str, weight: fx.Node, inside: set):
    """The one matmul that reads an expert weight (through transpose / index / cast only), and whether it reads it
    as stored transposed, (E, in, out): grouped_mm(x, W) or bmm(x, W[ids]); (E, out, in) is grouped_mm(x, W.mT)
    or bmm(W[ids], x)."""
    node, flips = weight, 0
    while True:
        users = [u for u in node.users if u in inside]
        if len(users) != 1:
            raise UnsupportedModelError(f"{experts_path}: expected one use of {node.name}, found {[u.name for u in users]}")
        user = users[0]
        if _is_matmul(user):
            if user.args[0] is node and user.args[1] is not node and user.target in _MATMULS:
                return user, flips % 2 == 1  # bmm(W, x): out = W x, stored (E, out, in) unless flipped
            if user.args[1] is node and user.args[0] is not node:
                return user, flips % 2 == 0  # grouped_mm(x, W) / bmm(x, W): x @ W, W is (in, out)
            raise UnsupportedModelError(f"{experts_path}: {where(user)} reads {weight.name} in a way helix does not know")
        if user.op == "call_method" and user.target == "transpose" and sorted(
                a % 3 for a in user.args[1:]) == [1, 2]:
            flips += 1
        elif not ((user.op == "call_method" and user.target in ("to", "float", "type", "contiguous"))
                  or (user.op == "call_function" and user.target is operator.getitem and user.args[0] is node
                      and isinstance(user.args[1], fx.Node))):  # W[expert_ids]: the batched_mm gather
            raise UnsupportedModelError(f"{experts_path}: {where(user)} is not a use of the expert weight {weight.name} "
                                        f"that helix knows")
        node = user


def _check_expert_ops(experts_path, experts, inside, gu_mm, dn_mm, by_role):
    """Every op of the experts module, by where it sits: between the two matmuls (the intermediate, split by
    columns over tpf: ops on each element only, so a custom gate such as MiniMax-M3's clamp / sigmoid / ``up +
    1`` is exact), after the down matmul (partial sums over tpf: linear ops only, the routing weights, the
    down bias (added once, see ``rewrite``)), or elsewhere (routing bookkeeping: transformers' grouped_mm /
    batched_mm vocabulary)."""
    after_gu = _from(gu_mm, inside)
    if dn_mm not in after_gu:
        raise UnsupportedModelError(f"{experts_path}: the down projection {dn_mm.name} does not read the gate_up output")
    before_dn, stack = set(), [dn_mm]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a in inside and a not in before_dn:
                before_dn.add(a)
                stack.append(a)
    mid = (after_gu & before_dn) | {gu_mm}
    post = _from(dn_mm, inside) - {dn_mm}
    for n in experts:  # an in-place op (``out.add_(bias)``: its result unused) belongs where the tensor it changes is
        if n.op == "call_method" and str(n.target).endswith("_") and n.args and n.args[0] in mid:
            mid.add(n)
        elif n.op == "call_method" and str(n.target).endswith("_") and n.args and n.args[0] in post | {dn_mm}:
            post.add(n)
    down_bias = _from(by_role["down_bias"], inside) if "down_bias" in by_role else set()
    gu_bias = _from(by_role["gate_up_bias"], inside) if "gate_up_bias" in by_role else set()
    for n in experts:
        if n in (gu_mm, dn_mm):
            continue
        if n in mid:
            ok = (is_pointwise(n) and n.target is not operator.getitem) or (n.op == "call_method" and n.target in (
                "chunk", "to", "float", "type", "contiguous", "squeeze", "unsqueeze")) or (
                n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[1], int)
                and n.args[0].op == "call_method" and n.args[0].target == "chunk") or _strided_cut(n) is not None or (
                n.op == "call_method" and n.target in ("view", "reshape") and _last(n) == _last(n.args[0]))
            if not ok:
                raise UnsupportedModelError(
                    f"{experts_path}: {where(n)} acts on the experts' intermediate features across columns; helix splits "
                    f"them over tpf ranks and supports only ops on each element there"
                )
        elif n in post:
            others = [a for a in n.all_input_nodes if a not in post and a is not dn_mm]
            linear = (n.op == "call_method" and n.target in _LINEAR_AFTER_DOWN) or (
                n.op == "call_function" and n.target is operator.getitem) or (
                n.op in ("call_function", "call_method") and n.target in (operator.mul, torch.mul, "mul")
                and len(others) == len(n.all_input_nodes) - 1) or (
                n.op == "call_method" and n.target in ("masked_fill", "masked_fill_") and n.args[2] in (0, 0.0)) or (
                n.target in (operator.add, operator.iadd, torch.add, "add", "add_") and others
                and all(a in down_bias for a in others))
            if not linear:
                raise UnsupportedModelError(
                    f"{experts_path}: {where(n)} follows the down projection but is not linear in it; under tpf > 1 "
                    f"each rank holds a partial sum there, so helix cannot run it exactly (e.g. a post-expert norm)"
                )
        elif n in down_bias or n in gu_bias:
            if not (n.op == "call_function" and n.target is operator.getitem):
                raise UnsupportedModelError(f"{experts_path}: {where(n)} is not the per-pair gather of an expert bias")
        else:
            ok = (n.op == "call_method" and n.target in _EXPERT_METHODS) or (
                n.op == "call_function" and n.target in _EXPERT_FUNCS)
            if not ok:
                raise UnsupportedModelError(
                    f"{experts_path}: {where(n)} is not an op of transformers' grouped_mm or batched_mm experts; "
                    f"compile the model with experts_implementation='grouped_mm' (default) or 'batched_mm'"
                )
    return mid, post


def _strided_cut(node: fx.Node):
    """0 for ``x[..., ::2]``, 1 for ``x[..., 1::2]`` (the gate / up features of interleaved rows), else None."""
    if not (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], tuple)):
        return None
    index = node.args[1]
    if len(index) != 2 or index[0] is not Ellipsis or not isinstance(index[1], slice):
        return None
    cut = index[1]
    if cut.step != 2 or cut.stop is not None or cut.start not in (None, 0, 1):
        return None
    return cut.start or 0


def _check_gate_split(experts_path, gu_mm, mid, inter) -> bool:
    """How the gate_up output is cut into gate and up (whether its rows are interleaved), in one of the two layouts
    whose tpf slices keep each feature's gate and up on one rank: [gate | up] halves cut by one
    ``chunk(2, dim=-1)`` (False), or [g0 u0 g1 u1 ...] cut by ``[..., ::2]`` and ``[..., 1::2]`` of one node of
    all 2I features (True: gpt-oss; the ops before it are per element, checked by ``_check_expert_ops``). Refuses
    anything else."""
    cuts = [n for n in mid if n.op == "call_method" and n.target == "chunk"]
    strided = sorted((_strided_cut(n), n.name) for n in mid if _strided_cut(n) is not None)
    sources = {n.args[0] for n in mid if _strided_cut(n) is not None}  # the matmul's output (+ bias: per element)
    if not cuts and [s for s, _ in strided] == [0, 1] and len(sources) == 1 and _last(*sources) == 2 * inter:
        return True
    ok = not strided and len(cuts) == 1 and len(cuts[0].args) >= 2 and cuts[0].args[1] == 2 and (
        cuts[0].args[2] if len(cuts[0].args) > 2 else cuts[0].kwargs.get("dim", 0)) in (-1, len(_shape(gu_mm) or ()) - 1)
    if not ok:
        raise UnsupportedModelError(
            f"{experts_path}: the gate_up output ({2 * inter} features) is cut neither once as chunk(2, dim=-1) into "
            f"gate and up halves nor as [..., ::2] / [..., 1::2] of interleaved rows: chunks "
            f"{[where(c) for c in cuts]}, strided cuts {[name for _, name in strided]}"
        )
    return False


def _last(node):
    shape = _shape(node)
    return shape[-1] if shape else None


def _shared(mlp, nodes, experts):
    """Shared-expert MLPs (Qwen2-MoE ``shared_expert``, DeepSeek ``shared_experts``, HunYuan ``shared_mlp``): every
    child module of the block other than the experts that holds two or more projections, matched as a dense FFN
    (which refuses what is not one). A child with a single projection (the router, a shared-expert gate) stays
    with the block: ``match`` checks its width."""
    groups: dict[str, list[fx.Node]] = {}
    rest = []
    for n in nodes:
        if n in experts:
            continue
        path = module_path(n)
        child = path[len(mlp) + 1 :].split(".")[0] if path.startswith(mlp + ".") else ""
        groups.setdefault(child, []).append(n)
    from .dense_ffn import match_one  # the dense matcher, on the shared expert's own projections

    shared = []
    for child, group in groups.items():
        projections = [projection_of(n) for n in group if is_projection(n)]
        if child and len(projections) >= 2:
            shared.append(match_one(f"{mlp}.{child}", projections))
        else:
            rest.extend(group)
    return shared, rest


def _shape(node):
    val = node.meta.get("example_value")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _is_tensor(node) -> bool:
    return isinstance(node.meta.get("example_value"), torch.Tensor)


def _dtype(node):
    val = node.meta.get("example_value")
    return val.dtype if isinstance(val, torch.Tensor) else None


# -- plan ----------------------------------------------------------------------------------------------------------
ROLES = {"gate_up_proj": "experts_gate_up", "down_proj": "experts_down"}
INTERLEAVED = "_interleaved"  # a kind suffix: gate_up rows (or bias) interleaved [g0 u0 g1 u1 ...] (gpt-oss)


def expert_shard(role: str, shape, layout: Layout, rank: int, kind: str = "weight") -> ExpertShard:
    """This rank's piece of a fused expert weight or bias (see the module docstring). ``kind``: "weight" (stored
    (E, out, in)), "weight_t" (stored (E, in, out): Aria) or "bias" ((E, 2I) for gate_up, (E, H) for down: the
    down bias is not split over tpf; ``rewrite`` adds it on one tpf rank only), each with the suffix
    ``INTERLEAVED`` for gate_up rows interleaved [g0 u0 g1 u1 ...] (gpt-oss). Raises naming the numbers."""
    interleaved = kind.endswith(INTERLEAVED)
    kind = kind.removesuffix(INTERLEAVED)
    count = shape[0]
    if count % layout.ep:
        raise ValueError(f"ep={layout.ep} does not divide the {count} experts of a {tuple(shape)} expert weight")
    per_e = count // layout.ep
    e0 = layout.ep_rank(rank) * per_e
    if kind == "bias" and role == "experts_down":
        return ExpertShard(e0, e0 + per_e, 1, 0, shape[1], 1)
    if kind == "bias":
        dim, parts = 1, 2
    elif kind == "weight_t":
        dim, parts = (2, 2) if role == "experts_gate_up" else (1, 1)
    else:
        dim, parts = (1, 2) if role == "experts_gate_up" else (2, 1)
    inter = shape[dim] // parts
    if inter % layout.tpf:
        raise ValueError(f"tpf={layout.tpf} does not divide the expert intermediate size {inter} ({tuple(shape)})")
    per = inter // layout.tpf
    t = layout.tpf_rank(rank)
    if interleaved:  # [g0 u0 g1 u1 ...]: the (gate, up) pairs of features [t*per, (t+1)*per), one range
        if role != "experts_gate_up" or parts != 2:
            raise ValueError(f"only gate_up rows are interleaved, not a {role} {kind} {tuple(shape)}")
        return ExpertShard(e0, e0 + per_e, dim, 2 * t * per, 2 * (t + 1) * per, 1)
    return ExpertShard(e0, e0 + per_e, dim, t * per, (t + 1) * per, parts)


# -- partition -------------------------------------------------------------------------------------------------------
def rewrite(graph: fx.Graph, region: MoEMatch, by_name: dict, layout: Layout, rank: int, world_group) -> None:
    """The rank-local experts (see the module docstring): remap the router's ids, zero the weights of other ranks'
    experts, count tokens over the local experts, all-reduce the partial output over the world."""
    local_count = region.count // layout.ep
    first = layout.ep_rank(rank) * local_count
    if region.dense is not None:
        return _rewrite_dense(graph, region, by_name, layout, first, local_count, world_group)
    ids, weights = by_name[region.ids.name], by_name[region.weights.name]
    experts = {by_name[n.name] for n in region.nodes}
    for node in experts:  # the weight is now this rank's contiguous shard: the kernel transformers chose
        if node.op == "call_function" and node.target is torch.ops.helix.grouped_mm.default:
            a, w, offs = node.args
            node.target, node.args, node.kwargs = torch._grouped_mm, (a, w), {"offs": offs}
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
    if layout.tpf_rank(rank) != 0:  # the down bias joins the partial sums on one tpf rank: x + 0 * b elsewhere
        for add in region.down_bias_adds:
            node = by_name[add.name]
            bias = next(a for a in node.all_input_nodes if _is_bias_gather(a, region, by_name))
            with graph.inserting_before(node):
                zero = graph.call_function(operator.mul, (bias, 0.0))
            node.replace_input_with(bias, zero)
    if layout.world_size > 1:
        all_reduce_after(graph, by_name[region.out.name], world_group)


def _rewrite_dense(graph, region, by_name, layout, first, local_count, world_group) -> None:
    """Dense experts (see the module doc): the local experts' slice of the input, their outputs padded with zeros
    for the other experts, the world all-reduce."""
    if region.down_bias is not None or region.gate_up_bias is not None:
        raise UnsupportedModelError(f"{region.experts}: dense experts with biases are not supported")
    if local_count != region.count:
        x3 = by_name[region.dense.name]
        with graph.inserting_after(x3):
            mine = graph.call_function(torch.narrow, (x3, 0, first, local_count))
        x3.replace_all_uses_with(mine, delete_user_cb=lambda user: user is not mine)
        down = by_name[region.down_mm.name]
        with graph.inserting_after(down):
            padded = graph.call_function(torch.nn.functional.pad,
                                         (down, (0, 0, 0, 0, first, region.count - first - local_count)))
        down.replace_all_uses_with(padded, delete_user_cb=lambda user: user is not padded)
    if layout.world_size > 1:
        all_reduce_after(graph, by_name[region.out.name], world_group)


def _is_bias_gather(node: fx.Node, region: MoEMatch, by_name: dict) -> bool:
    """``down_proj_bias[expert_ids]``: the per-pair gather of the down bias."""
    bias = by_name[region.down_bias.name]
    return node.op == "call_function" and node.target is operator.getitem and node.args[0] is bias


def all_reduce_after(graph: fx.Graph, node: fx.Node, world_group) -> fx.Node:
    """node -> wait(all_reduce(node, "sum", world)) for every user of node."""
    with graph.inserting_after(node):
        reduced = graph.call_function(funcol.all_reduce.default, (node, "sum", world_group))
    with graph.inserting_after(reduced):
        result = graph.call_function(funcol.wait_tensor.default, (reduced,))
    node.replace_all_uses_with(result, delete_user_cb=lambda user: user is not reduced)
    return result
