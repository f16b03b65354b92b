"""Lowering: hand the rank-local graph to Inductor (``compile_fx``), or run it as is.

Contract
    in:  the partitioned (and scheduled) rank-local GraphModule; the executor name.
    out: a callable over the *local* inputs. ``inductor`` compiles once per distinct value of the graph's SymInt
         inputs (Dynamo guards everything else), lazily at the first call with real local tensors,
         outside Dynamo's tracing context; functional collectives and the helix custom ops go to Inductor as
         nodes it schedules. ``eager`` runs the FX graph directly (fast to start; used for the big test matrix).

The helix ops have reference torch implementations on every device; Inductor treats them as extern kernels.
"""

from __future__ import annotations

import torch
import torch.fx as fx


class Lowered:
    def __init__(self, gm: fx.GraphModule, executor: str):
        if executor not in ("inductor", "eager"):
            raise ValueError(f"executor must be 'inductor' or 'eager', got {executor!r}")
        self.gm, self.executor = gm, executor
        self.compiled: dict[tuple, object] = {}

    def __call__(self, args: list):
        if self.executor == "eager":
            return self.gm(*args)
        # Dynamo guards the tensor shapes of this graph; only its SymInt inputs can change between calls.
        key = tuple(a for a in args if not isinstance(a, torch.Tensor))
        fn = self.compiled.get(key)
        if fn is None:
            fn = self.compiled[key] = _inductor(self.gm, args)
        return fn(*args)


def _inductor(gm: fx.GraphModule, args: list):
    from torch._inductor.compile_fx import compile_fx

    # Rank and layout are baked into the graph (owner ranks, group names) while the shapes of different ranks
    # can coincide: the FX graph cache stays off so ranks never load each other's artifacts (pytorch #192042).
    return compile_fx(gm, args, config_patches={"fx_graph_cache": False})
