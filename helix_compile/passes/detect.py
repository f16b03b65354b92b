"""Pass 1, detect: find each layer's regions (attention, FFN) in the global Dynamo FX graph.

Contract
    in:  the global (single-device) Dynamo graph of an HF causal LM called with a helix ``StaticCache``, and the
         model's text config (sliding windows and soft-capping are per-layer facts of the config).
    out: ``Regions``: the matches of the region matchers (``passes/regions/``), attention first then FFN, each in
         graph order, plus the projections inside decoder layers that no matcher claimed (left whole: replicated
         on every rank, reported by the plan). The graph is not changed.
    refuses (``UnsupportedModelError`` naming the node and module path): attention that does not read the helix
         cache, ops that mix heads between the projections and attention, anything but elementwise ops inside
         a dense FFN, MoE blocks and MLA attention the ``moe`` / ``mla`` matchers do not understand, user attention masks (padded batches), transformers' own caches, and models without a
         softmax attention over a KV cache (state-space, RWKV-like).

Pseudo-code
    refuse writes into a transformers cache
    mla       = regions.match_mla(graph)                      # a helix::kv_write of a latent cache (DeepSeek)
    attention = regions.match_attention(graph, config)        # one per other helix::kv_write
    moe       = regions.match_moe(graph)                      # FFN modules with routed experts
    ffn       = regions.match_dense_ffn(graph, claimed)       # one per other FFN module
    whole     = projections inside decoder layers claimed by no match
"""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.fx as fx

from ..lowering import ops as _ops  # noqa: F401  registers helix::kv_write
from .regions import match_attention, match_dense_ffn, match_mla, match_moe
from .regions.moe import refuse_stray_experts
from .regions.dense_ffn import FFN_MODULES
from .regions.attention_core import KV_WRITE
from .regions.common import UnsupportedModelError, module_path, shape, where  # noqa: F401  (re-exported)
from .regions.projection import is_projection, projection_of


@dataclasses.dataclass
class WholeRegion:
    """Projections no matcher claimed: they stay whole (replicated) on every rank; the plan reports their bytes."""

    module: str
    projections: list

    kind = "whole"

    def describe(self) -> str:
        return f"whole {self.module} projections={[p.name for p in self.projections]} (replicated on every rank)"

    def parameters(self) -> list[fx.Node]:
        return [n for p in self.projections for n in (p.weight, p.bias) if n is not None and n.op == "placeholder"]


@dataclasses.dataclass
class Regions:
    matches: list  # AttentionMatch, DenseFFNMatch, ... (regions/)
    whole: list = dataclasses.field(default_factory=list)  # WholeRegion

    @property
    def attention(self) -> list:
        return [m for m in self.matches if m.kind == "attention"]

    @property
    def ffn(self) -> list:
        return [m for m in self.matches if m.kind == "ffn"]

    def writes(self) -> list[fx.Node]:
        """Every cache write (attention and MLA), in graph order."""
        return sorted({m.kv_write for m in self.matches if hasattr(m, "kv_write")}, key=_order)  # kv-shared: once

    def describe(self) -> str:
        return "\n".join(r.describe() for r in [*self.matches, *self.whole])


def detect(gm: fx.GraphModule, config=None) -> Regions:
    graph = gm.graph
    for node in graph.nodes:
        if node.op == "call_method" and node.target == "index_copy_" and node.args[0].op == "placeholder":
            raise UnsupportedModelError(
                f"{where(node)} writes a transformers cache; pass past_key_values=helix_compile.StaticCache(...)"
            )
    writes = [n for n in graph.nodes if n.op == "call_function" and n.target in KV_WRITE]
    if not writes:
        raise UnsupportedModelError(
            "no helix cache write in the graph: call the compiled model with past_key_values=helix_compile.StaticCache(...)"
            " (a model without softmax attention over a KV cache, e.g. state-space or RWKV-like, is not supported)"
        )
    refuse_stray_experts(graph, FFN_MODULES)  # experts where no FFN is (JetMoE's routed attention heads)
    mla = match_mla(graph)
    attention = match_attention(graph, config, skip={m.kv_write for m in mla})
    for node in graph.nodes:  # never a silent wrong answer: a user mask that no attention applies is refused
        if node.op == "placeholder" and "attention_mask" in node.name and (
            any(a.key_mask is not node for a in [*attention, *mla])
        ):
            raise UnsupportedModelError(
                f"the attention_mask input '{node.name}' {shape(node)} does not reach every attention layer as HF's "
                f"2-D padding mask; helix cannot apply it"
            )
    claimed = {n for a in attention for n in a.projections()} | {n for m in mla for n in m.projections()}
    moe = match_moe(graph, FFN_MODULES)
    claimed |= {n for m in moe for n in m.projections()}
    ffn = match_dense_ffn(graph, claimed, skip={m.module for m in moe})
    claimed |= {p.node for f in ffn for p in (*f.ins, f.out)}
    matches = [*attention, *mla, *ffn, *moe]
    return Regions(matches, _left_whole(graph, claimed, matches))


def _order(node: fx.Node) -> int:
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return order[node]


def _left_whole(graph: fx.Graph, claimed: set, matches: list) -> list[WholeRegion]:
    """What inside a decoder layer (a numbered module path) no matcher claimed, by module: projections, and any
    other parameter of two or more dims (e.g. the experts of an MoE block no matcher recognises)."""
    groups: dict[str, list] = {}
    taken = set()
    for node in graph.nodes:
        if is_projection(node) and node not in claimed:
            path = module_path(node)
            if re.search(r"\.\d+(\.|$)", path):
                proj = projection_of(node)
                groups.setdefault(path.rsplit(".", 1)[0] if "." in path else path, []).append(proj)
                taken |= {proj.weight, proj.bias}
    owned = {p.name for m in matches for p, _, _ in m.placements_nodes()} if matches else set()
    for node in graph.nodes:
        val = node.meta.get("example_value")
        if node.op != "placeholder" or node in taken or node.name in owned or not isinstance(val, torch.Tensor):
            continue
        module = _parameter_module(node.name)
        if val.dim() >= 2 and module and re.search(r"\.\d+(\.|$)", module):
            groups.setdefault(module, []).append(_Param(node))
    return [WholeRegion(module, projs) for module, projs in groups.items()]


@dataclasses.dataclass
class _Param:
    """A parameter no matcher claimed (reported like a projection: its name and its bytes)."""

    weight: fx.Node
    bias: None = None

    @property
    def name(self) -> str:
        return self.weight.name


def _parameter_module(name: str) -> str | None:
    """Module path of a Dynamo parameter placeholder, e.g. ``..._modules_layers_modules_0_modules_mlp_parameters_w_``
    -> ``layers.0.mlp``; None for anything else (inputs, buffers, cache tensors)."""
    if "_parameters_" not in name or "_modules_" not in name:
        return None
    modules = name.split("_parameters_")[0].split("_modules_")[1:]
    return ".".join(modules)
