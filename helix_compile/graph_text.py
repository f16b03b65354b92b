"""Readable, stable text of an FX graph: the review artefact of every pass (``tests/golden/``)."""

from __future__ import annotations

import re

import torch.fx as fx

from .layout import group_ranks

# Dynamo names placeholders after the attribute path: l_args_0_modules_model_modules_layers_modules_0_... .
_PREFIX = re.compile(r"l_(?:args_0|self|kwargs)_(?:modules_)?")


def _short(text: str) -> str:
    text = _PREFIX.sub("", text)
    return text.replace("_modules_", ".").replace("_parameters_", ".").replace("modules_", "")


def graph_text(gm: fx.GraphModule) -> str:
    """One line per node: ``name = target(args)  # local shape``; no stack traces, no addresses."""
    lines = []
    for node in gm.graph.nodes:
        val = node.meta.get("example_value", node.meta.get("val"))
        shape = f"  # {tuple(val.shape)}" if hasattr(val, "shape") and node.op == "placeholder" else ""
        if node.op == "placeholder":
            lines.append(f"input {_short(node.name)}{shape}")
        elif node.op == "output":
            lines.append(f"return {_short(str(node.args[0]))}")
        else:
            target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
            if hasattr(node.target, "_schema"):
                target = str(node.target)
            fmt_args = [_fmt(a) for a in node.args]
            if target.startswith("_c10d_functional.") and "wait_tensor" not in target:
                fmt_args[-1] = f"ranks={group_ranks(node.args[-1])}"  # group names are process-local counters
            args = ", ".join(fmt_args + [f"{k}={_fmt(v)}" for k, v in node.kwargs.items()])
            lines.append(f"{_short(node.name)} = {target}({args})")
    return "\n".join(lines) + "\n"


def _fmt(arg) -> str:
    if isinstance(arg, fx.Node):
        return _short(arg.name)
    if isinstance(arg, (list, tuple)):
        inner = ", ".join(_fmt(a) for a in arg)
        return f"[{inner}]" if isinstance(arg, list) else f"({inner}{',' if len(arg) == 1 else ''})"
    if isinstance(arg, float):
        return repr(arg)
    return _short(str(arg))
