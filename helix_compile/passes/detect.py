"""Pass 1, detect: find each layer's attention region and FFN region in the global Dynamo FX graph.

Contract
    in:  the global (single-device) Dynamo graph of an HF causal LM called with a helix ``StaticCache``.
    out: ``Regions`` (attention and FFN regions, in graph order); the graph is not changed.
    refuses (``UnsupportedModelError`` naming the node and module path): attention that does not read the
    helix cache, fused qkv / gate_up projections, ops that mix heads between the projections and attention,
    anything but elementwise ops inside the FFN, and user attention masks (padded batches). MoE blocks and MLA
    attention are matched (or refused) by their own matchers, `moe.py` and `mla.py`.

Pseudo-code
    for each helix::kv_write(keys, values, k, v, pos):          # the cache write of one attention layer
        core  = the SDPA node, or the final matmul of matmul -> *scale -> +mask -> softmax -> dropout -> matmul,
                whose key/value trace back (through repeat_kv views) to keys/values
        q/k/v = the unique linear among the ancestors of the query, of k, of v (inside the attention module)
        o     = the first linear after core; only reshapes between them
    for each linear whose module path ends in ``.mlp.<name>``:
        group by module; the linear feeding the module output is the row-parallel ``out``, the others ``ins``
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
import torch.fx as fx

from ..lowering import ops as _ops  # noqa: F401  registers helix::kv_write


class UnsupportedModelError(ValueError):
    """The model structure is not one helix can partition exactly."""



LINEAR = torch._C._nn.linear
SDPA_TARGETS = {torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention}
KV_WRITE = {torch.ops.helix.kv_write, torch.ops.helix.kv_write.default}  # Dynamo records the packet

# Ops that act on each element or only reshape: safe on a head-sharded or column-sharded tensor.
_SHAPE_METHODS = {"view", "reshape", "transpose", "contiguous", "unsqueeze", "squeeze", "permute", "flatten", "expand"}
_ELEMENTWISE_METHODS = {"to", "float", "type_as", "half", "bfloat16", "neg", "mul", "add", "sub", "div", "pow", "rsqrt",
                        "sigmoid", "tanh", "exp", "clamp"}
_ELEMENTWISE_FUNCS = {
    operator.mul, operator.add, operator.sub, operator.truediv, operator.neg, operator.pow, operator.getitem,
    torch.mul, torch.add, torch.sub, torch.neg, torch.rsqrt, torch.tanh, torch.sigmoid, torch.exp, torch.cat,
    torch.nn.functional.silu, torch.nn.functional.gelu, torch.nn.functional.relu, torch.nn.functional.dropout,
    torch.nn.functional.sigmoid, torch.nn.functional.tanh, torch.pow, torch.clamp, torch.where,
}
_REDUCE_METHODS = {"mean", "sum", "var", "norm"}

# The matchers of MoE blocks and MLA attention, one file each; they import the names above from here.
from . import mla as _mla  # noqa: E402
from . import moe as _moe  # noqa: E402


@dataclasses.dataclass
class AttentionRegion:
    module: str  # e.g. "model.layers.0.self_attn"
    form: str  # "sdpa" or "eager"
    q_linear: fx.Node
    k_linear: fx.Node
    v_linear: fx.Node
    o_linear: fx.Node
    kv_write: fx.Node
    keys: fx.Node  # cache placeholders
    values: fx.Node
    pos: fx.Node  # global positions of the new tokens
    query: fx.Node  # (B, Hq, L, D) after RoPE
    core: fx.Node  # node whose output is the attention output (B, Hq, L, D)
    scale: float


@dataclasses.dataclass
class FFNRegion:
    module: str  # e.g. "model.layers.0.mlp"
    ins: list[fx.Node]  # column-parallel linears (gate, up)
    out: fx.Node  # row-parallel linear (down)


@dataclasses.dataclass
class Regions:
    attention: list[AttentionRegion]
    ffn: list[FFNRegion]
    moe: list = dataclasses.field(default_factory=list)  # moe.MoERegion
    mla: list = dataclasses.field(default_factory=list)  # mla.MLARegion

    def writes(self) -> list[fx.Node]:
        """Every cache write (standard attention and MLA), in graph order."""
        return [r.kv_write for r in self.attention] + [r.kv_write for r in self.mla]

    def describe(self) -> str:
        lines = [m.describe() for m in self.mla]
        for a in self.attention:
            lines.append(
                f"attention {a.module} [{a.form}] q={a.q_linear.name} k={a.k_linear.name} v={a.v_linear.name} "
                f"o={a.o_linear.name} write={a.kv_write.name} core={a.core.name} scale={a.scale:g}"
            )
        for f in self.ffn:
            lines.append(f"ffn {f.module} ins={[n.name for n in f.ins]} out={f.out.name}")
        lines += [m.describe() for m in self.moe]
        return "\n".join(lines)


def module_path(node: fx.Node) -> str:
    """Innermost ``nn_module_stack`` path of a node, without Dynamo's ``L['...']`` root."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    if path.startswith("L["):
        path = path[path.index("]") + 1 :]
        while path.startswith("["):  # L['args'][0]
            path = path[path.index("]") + 1 :]
        path = path.lstrip(".")
    return path


def _where(node: fx.Node) -> str:
    return f"node '{node.name}' ({node.format_node()[:160]}) in module '{module_path(node) or '<model>'}'"


def _is_method(node: fx.Node, names) -> bool:
    return node.op == "call_method" and node.target in names


def _shape(node: fx.Node):
    val = node.meta.get("example_value")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _cache_source(node: fx.Node) -> fx.Node | None:
    """Follow repeat_kv (getitem None / expand / reshape / contiguous) back to a placeholder."""
    while node.op != "placeholder":
        if node.op == "call_method" and node.target in _SHAPE_METHODS or (
            node.op == "call_function" and node.target is operator.getitem
        ):
            node = node.args[0]
        else:
            return None
    return node


def _linear_ancestor(start: fx.Node, attention_module: str, what: str) -> fx.Node:
    """The unique linear among the ancestors of ``start`` reachable through per-head-safe ops of the module."""
    found, stack, seen = [], [start], set()
    while stack:
        node = stack.pop()
        if node in seen or not isinstance(node, fx.Node):
            continue
        seen.add(node)
        if node.op == "call_function" and node.target is LINEAR:
            found.append(node)
            continue
        if node.op in ("placeholder", "get_attr"):
            continue
        if not module_path(node).startswith(attention_module):
            continue  # e.g. RoPE cos/sin computed at model level: replicated, broadcast over heads
        _check_per_head(node, what)
        stack.extend(n for n in node.all_input_nodes)
    if len(found) != 1:
        raise UnsupportedModelError(
            f"{what}: expected exactly one projection feeding it inside '{attention_module}', found "
            f"{[n.name for n in found]}"
        )
    return found[0]


def _check_per_head(node: fx.Node, what: str) -> None:
    """Allow only ops that keep heads independent between a projection and attention."""
    if node.op == "call_method" and node.target in _SHAPE_METHODS | _ELEMENTWISE_METHODS:
        return
    if node.op == "call_function" and node.target in _ELEMENTWISE_FUNCS:
        return
    reduces = (node.op == "call_method" and node.target in _REDUCE_METHODS) or (
        node.op == "call_function" and node.target in (torch.mean, torch.sum)
    )
    if reduces:
        shape = _shape(node.args[0])
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", None)
        if shape is not None and len(shape) == 4 and dims in (-1, 3, (-1,), [-1]):
            return  # a per-head norm (q_norm / k_norm over head_dim)
    raise UnsupportedModelError(
        f"{what}: {_where(node)} is not a per-head op; helix shards heads across ranks and would change its result"
    )


def _check_only(nodes, allowed, region: str) -> None:
    for node in nodes:
        ok = (node.op == "call_method" and node.target in allowed) or (
            node.op == "call_function" and node.target in allowed
        )
        if not ok:
            raise UnsupportedModelError(f"{region}: {_where(node)} is not supported on a sharded tensor")


def _find_core(keys: fx.Node, values: fx.Node, write: fx.Node):
    """Return (form, core, query, scale) for the attention that reads the cache placeholders keys/values."""
    for user in _repeat_kv_users(keys):
        if user.op == "call_function" and user.target in SDPA_TARGETS:
            query, value = user.args[0], user.args[2] if len(user.args) > 2 else user.kwargs["value"]
            if _cache_source(value) is not values:
                raise UnsupportedModelError(f"attention reads keys of one cache layer and values of another: {_where(user)}")
            if user.kwargs.get("dropout_p", 0.0) not in (0.0, 0):
                raise UnsupportedModelError(f"attention dropout must be 0 at inference: {_where(user)}")
            scale = user.kwargs.get("scale")
            if scale is None:
                scale = 1.0 / math.sqrt(_shape(query)[-1])
            return "sdpa", user, query, float(scale)
        if user.op == "call_method" and user.target == "transpose":
            for mm in user.users:
                if mm.op == "call_function" and mm.target is torch.matmul and mm.args[1] is user:
                    return _eager_core(mm, values)
    raise UnsupportedModelError(
        f"the cache write {_where(write)} is not followed by an attention helix understands (SDPA or "
        f"matmul-softmax-matmul over the whole cache)"
    )


def _repeat_kv_users(placeholder: fx.Node):
    """Nodes that consume the cache (directly or through repeat_kv views), excluding the write itself."""
    out, frontier = [], [placeholder]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if (user.op == "call_method" and user.target in _SHAPE_METHODS - {"transpose"}) or (
                user.op == "call_function" and user.target is operator.getitem
            ):
                frontier.append(user)
            elif user.op == "call_function" and user.target in KV_WRITE:
                continue
            else:
                out.append(user)
    return out


def _eager_core(matmul: fx.Node, values: fx.Node):
    """matmul(q, k^T) -> *scale -> [+mask] -> softmax -> [to] -> [dropout] -> matmul(., v)."""
    query, node, scale = matmul.args[0], matmul, None
    while True:
        users = list(node.users)
        if len(users) != 1:
            raise UnsupportedModelError(f"eager attention scores are used more than once: {_where(node)}")
        nxt = users[0]
        if nxt.op == "call_function" and nxt.target in (operator.mul, torch.mul) and isinstance(nxt.args[1], float):
            scale = nxt.args[1]
        elif nxt.op == "call_function" and nxt.target in (operator.add, torch.add):
            pass  # the causal mask; helix masks by global positions itself
        elif nxt.op == "call_function" and nxt.target in (torch.nn.functional.softmax, torch.softmax):
            pass
        elif _is_method(nxt, {"to", "float", "type_as"}):
            pass
        elif nxt.op == "call_function" and nxt.target is torch.nn.functional.dropout:
            if nxt.kwargs.get("p", nxt.args[1] if len(nxt.args) > 1 else 0.5) not in (0.0, 0):
                raise UnsupportedModelError(f"attention dropout must be 0 at inference: {_where(nxt)}")
        elif nxt.op == "call_function" and nxt.target is torch.matmul:
            if _cache_source(nxt.args[1]) is not values:
                raise UnsupportedModelError(f"eager attention does not read the cache values: {_where(nxt)}")
            if scale is None:
                raise UnsupportedModelError(f"eager attention without a constant scale: {_where(matmul)}")
            return "eager", nxt, query, float(scale)
        else:
            raise UnsupportedModelError(f"unexpected op in eager attention: {_where(nxt)}")
        node = nxt


def _first_linear_after(node: fx.Node, region: str) -> fx.Node:
    between = []
    while True:
        users = list(node.users)
        if len(users) != 1:
            raise UnsupportedModelError(f"{region}: attention output used by {len(users)} nodes at {_where(node)}")
        node = users[0]
        if node.op == "call_function" and node.target is LINEAR:
            _check_only(between, _SHAPE_METHODS | {operator.getitem}, region)
            return node
        between.append(node)


def detect(gm: fx.GraphModule) -> Regions:
    graph = gm.graph
    for node in graph.nodes:
        if node.op == "placeholder" and "attention_mask" in node.name:
            raise UnsupportedModelError(
                f"an attention_mask input ('{node.name}') is not supported yet: helix batches must be unpadded "
                f"(every row has the same length); call without attention_mask"
            )
        if node.op == "call_method" and node.target == "index_copy_" and node.args[0].op == "placeholder":
            raise UnsupportedModelError(
                f"{_where(node)} writes a transformers cache; pass past_key_values=helix_compile.StaticCache(...)"
            )
    writes = [n for n in graph.nodes if n.op == "call_function" and n.target in KV_WRITE]
    if not writes:
        raise UnsupportedModelError(
            "no helix cache write in the graph: call the compiled model with past_key_values=helix_compile.StaticCache(...)"
        )
    attention, mla = [], []
    for write in writes:
        keys, values, k, v, pos = write.args
        module = module_path(write)
        if _mla.is_mla(keys, write):
            mla.append(_mla.match(write, module, _where, _first_linear_after))
            continue
        form, core, query, scale = _find_core(keys, values, write)
        q_lin = _linear_ancestor(query, module, f"query of {module}")
        k_lin = _linear_ancestor(k, module, f"key of {module}")
        v_lin = _linear_ancestor(v, module, f"value of {module}")
        if len({q_lin, k_lin, v_lin}) != 3:
            raise UnsupportedModelError(
                f"{module}: fused q/k/v projection ({q_lin.name}) is not supported yet; it needs a per-rank regroup"
            )
        o_lin = _first_linear_after(core, f"attention output of {module}")
        attention.append(AttentionRegion(module, form, q_lin, k_lin, v_lin, o_lin, write, keys, values, pos, query, core, scale))
    ffn, moe = _detect_ffn(graph)
    return Regions(attention, ffn, moe, mla)


def _detect_ffn(graph: fx.Graph) -> tuple[list[FFNRegion], list]:
    groups: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        parts = module_path(node).split(".")
        if node.op in ("call_function", "call_method") and "mlp" in parts:
            groups.setdefault(".".join(parts[: parts.index("mlp") + 1]), []).append(node)
    regions, moe = [], []
    for mlp, nodes in groups.items():
        if _moe.is_moe(mlp, nodes, module_path):
            moe.append(_moe.match(mlp, nodes, module_path, _where, _match_dense))
        else:
            regions.append(_match_dense(mlp, nodes))
    return regions, moe


def _match_dense(mlp: str, nodes: list[fx.Node]) -> FFNRegion:
    """A dense MLP: column-parallel input projections, elementwise ops, one row-parallel output projection."""
    linears = [n for n in nodes if n.op == "call_function" and n.target is LINEAR]
    outs = [n for n in linears if any(not module_path(u).startswith(mlp) for u in n.users)]
    if len(outs) != 1 or len(linears) < 2:
        raise UnsupportedModelError(
            f"{mlp}: expected input projections and one output projection, found linears "
            f"{[n.name for n in linears]} with outputs {[n.name for n in outs]}"
        )
    out = outs[0]
    ins = [n for n in linears if n is not out]
    _check_ffn_body(mlp, ins, out)
    return FFNRegion(mlp, ins, out)


def _check_ffn_body(mlp: str, ins: list[fx.Node], out: fx.Node) -> None:
    """Between the column-parallel ins and the row-parallel out only elementwise ops may run."""
    stack, seen = [out.args[0]], set()
    while stack:
        node = stack.pop()
        if node in seen or node in ins:
            continue
        seen.add(node)
        if node.op == "placeholder" or not module_path(node).startswith(mlp):
            raise UnsupportedModelError(
                f"{mlp}: the input of '{out.name}' depends on '{node.name}' without passing through a projection"
            )
        if node.op == "call_method" and node.target in {"chunk", "split"} or (
            node.op == "call_function" and node.target in (torch.chunk, torch.split)
        ):
            raise UnsupportedModelError(f"{mlp}: fused gate_up projection ({_where(node)}) is not supported yet")
        _check_only([node], _ELEMENTWISE_METHODS | _ELEMENTWISE_FUNCS - {operator.getitem, torch.cat}, mlp)
        stack.extend(node.all_input_nodes)
    for lin in ins:
        for user in lin.users:
            if user.op == "call_function" and user.target is operator.getitem or _is_method(user, {"chunk", "split"}):
                raise UnsupportedModelError(f"{mlp}: fused gate_up projection ({_where(user)}) is not supported yet")
