"""What every region matcher shares: the error type, module paths of nodes, and the op vocabulary.

The vocabulary says which ops keep a tensor's last dimension independent per element (elementwise), which only
reshape, and which reduce: a matcher walks the dataflow between a projection and what consumes it, and
anything outside this vocabulary is refused by name rather than guessed at.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx


class UnsupportedModelError(ValueError):
    """The model structure is not one helix can partition exactly."""


LINEAR = torch._C._nn.linear
ADDMM = torch.addmm  # transformers' Conv1D (GPT-2): view(-1, in) -> addmm(bias, x, W[in, out]) -> view(..., out)

# Ops that act on each element or only reshape: safe on a head-sharded or column-sharded tensor.
SHAPE_METHODS = {"view", "reshape", "transpose", "contiguous", "unsqueeze", "squeeze", "permute", "flatten", "expand"}
ELEMENTWISE_METHODS = {"to", "float", "type_as", "half", "bfloat16", "neg", "mul", "add", "sub", "div", "pow", "rsqrt",
                       "sigmoid", "tanh", "exp", "clamp", "square", "abs", "relu", "sqrt", "erf", "clamp_min",
                       "clamp_max", "sin", "cos", "log", "reciprocal", "mul_", "add_", "div_"}
_F = torch.nn.functional
ELEMENTWISE_FUNCS = {
    operator.mul, operator.add, operator.sub, operator.truediv, operator.neg, operator.pow, operator.getitem,
    torch.mul, torch.add, torch.sub, torch.div, torch.neg, torch.rsqrt, torch.tanh, torch.sigmoid, torch.exp, torch.cat,
    torch.square, torch.abs, torch.relu, torch.sqrt, torch.erf, torch.sin, torch.cos, torch.log, torch.reciprocal,
    torch.clamp_min, torch.clamp_max, torch.minimum, torch.maximum, torch.expm1, torch.log1p, torch.sign,
    _F.silu, _F.gelu, _F.relu, _F.dropout, _F.sigmoid, _F.tanh, _F.leaky_relu, _F.elu, _F.softplus, _F.mish,
    _F.hardswish, _F.hardsigmoid, _F.relu6, _F.selu, _F.celu, _F.gelu, torch._C._nn.gelu, torch._C._nn.silu,
    torch.pow, torch.clamp, torch.where,
}
REDUCE_METHODS = {"mean", "sum", "var", "norm"}
CATS = {torch.cat, torch.concat, torch.concatenate}  # per head only along a dim within a head (the last)


def is_pointwise(node: fx.Node) -> bool:
    """An op on each element: in the lists above, or an aten op of the same name tagged pointwise."""
    if node.op == "call_method" and node.target in ELEMENTWISE_METHODS:
        return True
    if node.op == "call_function" and node.target in ELEMENTWISE_FUNCS:
        return True
    if node.op not in ("call_method", "call_function"):
        return False
    if node.target in (torch.min, torch.max, "min", "max") and len(node.args) == 2 and not node.kwargs:
        return isinstance(node.args[1], fx.Node)  # the binary form (minimum / maximum), not a reduction
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    packet = getattr(torch.ops.aten, str(name).rstrip("_"), None) if name else None
    overloads = [getattr(packet, o, None) for o in ("Tensor", "Scalar", "default")] if packet is not None else []
    return any(o is not None and torch.Tag.pointwise in o.tags for o in overloads)


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


def where(node: fx.Node) -> str:
    """A node named for a user: its name, its text and its module."""
    return f"node '{node.name}' ({node.format_node()[:160]}) in module '{module_path(node) or '<model>'}'"


def is_method(node: fx.Node, names) -> bool:
    return node.op == "call_method" and node.target in names


def is_call(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def shape(node: fx.Node):
    val = node.meta.get("example_value")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def check_only(nodes, allowed, region: str, pointwise: bool = False) -> None:
    """Refuse any node whose target is not in ``allowed`` (methods by name, functions by identity), nor, with
    ``pointwise``, an op on each element (``is_pointwise``)."""
    for node in nodes:
        ok = (node.op == "call_method" and node.target in allowed) or (
            node.op == "call_function" and node.target in allowed
        ) or (pointwise and is_pointwise(node))
        if not ok:
            raise UnsupportedModelError(f"{region}: {where(node)} is not supported on a sharded tensor")


def order(node: fx.Node) -> int:
    """Topological position: FX keeps a graph's nodes in a valid order, and a node's ``_sort_key`` follows it."""
    return node._sort_key
