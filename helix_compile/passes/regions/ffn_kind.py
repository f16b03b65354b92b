"""Which FFN matcher owns a block: ``is_moe``, the test the dense and the MoE matchers share.

Contract
    is_moe(mlp, nodes)    takes an FFN module path and the graph nodes inside it; True for a mixture of experts.
                          The MoE matcher (``moe.py``) matches or refuses every block it is True for; the dense
                          matcher (``dense_ffn.py``) refuses to run one as a dense FFN, so a MoE block is never
                          left replicated.
    inside(path, module)  whether a module path is ``module`` or lies below it
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .common import module_path, shape


def inside(path: str, module: str) -> bool:
    return path == module or path.startswith(module + ".")


def _strip(path: str) -> str:
    """An ``nn_module_stack`` path without Dynamo's ``L['self']`` root (as ``module_path``)."""
    if path.startswith("L["):
        path = path[path.index("]") + 1 :]
        while path.startswith("["):
            path = path[path.index("]") + 1 :]
    return path.lstrip(".")


def is_moe(mlp: str, nodes: list[fx.Node]) -> bool:
    """A block is MoE when it has an ``experts`` child, a top-k, a 3-D parameter, or a MoE-looking class at or
    below the block (``...MoE``, ``...SparseMoeBlock``, ``...Experts``; not a family's dense ``...MoeMLP``, the
    dense first layers of GLM-4-MoE, ERNIE-4.5-MoE, EXAONE-MoE): then the MoE matcher owns it (and matches or
    refuses it: it is never handed to the dense matcher nor left replicated)."""
    classes = set()
    for n in nodes:
        for path, cls in (n.meta.get("nn_module_stack") or {}).values():
            if inside(_strip(path), mlp):
                classes.add(getattr(cls, "__name__", str(cls)).lower())
    params = {a for n in nodes for a in n.all_input_nodes if a.op == "placeholder"}
    return any(inside(module_path(n), mlp + ".experts") or n.target is torch.topk or n.target == "topk" for n in nodes) or any(
        len(shape(p) or ()) == 3 for p in params) or any(
        ("moe" in c or "sparse" in c or "expert" in c) and not c.endswith("mlp") for c in classes
    )
