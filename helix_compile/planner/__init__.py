"""Planner: a decode cost model that picks the Helix layout (kvp, tpa, tpf, ep) and batch.

Public API:
  choose_layout(config, world_size, context_len, batch_size=None, dtype="bf16", hw="h200") -> {kvp, tpa, tpf, ep}
  plan(model, gpus, context, ...) -> Plan    every evaluated layout, the Pareto frontier and the best one
See docs/planner.md for the model, the comparison with the paper and the calibration.
"""
from .cost import Candidate, appendix_a, evaluate
from .hardware import Hardware, get_hardware
from .model import ModelSpec, get_model
from ..parse import parse_layout, parse_tokens
from .search import Plan, choose_layout, plan

__all__ = ["Candidate", "Hardware", "ModelSpec", "Plan", "appendix_a", "choose_layout", "evaluate", "get_hardware",
           "get_model", "parse_layout", "parse_tokens", "plan"]
