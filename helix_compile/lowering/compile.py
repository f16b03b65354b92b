"""Lowering: hand the rank-local graph to Inductor (``compile_fx``), or run it as is; on CUDA, replay it as a CUDA graph.

Contract
    in:  the partitioned (and scheduled) rank-local GraphModule; the executor name; whether to use CUDA graphs;
         example local inputs (fake tensors of the local shapes, Dynamo's SymInts for its dynamic sizes).
    out: a callable over the *local* inputs. ``inductor`` compiles once, at backend time inside Dynamo's tracing
         context, with the graph's dynamic sizes symbolic: once Dynamo has made the prompt length dynamic, every
         later prompt length runs the same Inductor program (no recompile). Functional collectives and the helix
         ops go to Inductor as nodes it schedules (partial attention as the Triton kernels of its triton_op, the
         merge and the KV write as aten code it fuses). ``eager`` runs the FX graph directly (fast to start; used
         for the big test matrix).

CUDA graphs (``cudagraphs=True``, the default for ``inductor`` on CUDA): the whole local step, collectives
included, is captured once and replayed, so a decode step costs one graph launch on the host.
    call 1 of a compiled program runs normally: it is the warm-up (Triton and cuBLAS initialisation, the NCCL
        communicators' first use). Every rank makes the same calls in the same order, so every rank warms up the
        same programs before any capture, and capture (which launches nothing) cannot wait on another rank.
    call 2 captures the program on its arguments, then replays it: no step runs twice, so the in-place state of
        the step (KV writes, the cache's position counter) advances exactly once per call.
    later calls replay. An argument that is the same tensor object as at capture (parameters, cache shards,
        position counters) is read in place; one that changed between calls 1 and 2 (input ids) is copied into
        the captured buffer. Outputs are cloned, so a caller may keep them across steps.
    a prefill (queries at more than one position) is not captured: its attention reads its positions on the host
        to pick a kernel (``prefill.py``), and a graph saves nothing on kernels that long. ``cudagraphs=True``
        applies to the steps of one query position.
    programs that copy to the host inside the step cannot be captured: transformers' ``grouped_mm_fallback``
        (the experts of MoE models whose dtype ``torch._grouped_mm`` does not take, e.g. fp32) reads its offsets
        with ``.tolist()``. Such a program runs without CUDA graphs (a warning says why); ``cudagraphs=True`` on it
        is an error.
    what invalidates a captured graph: any other input tensor becoming a new object (a new StaticCache, a reloaded
        parameter); then the call runs without the graph and the next call captures again. A new shape or batch is
        a different Dynamo graph with its own capture.
    integer inputs (Dynamo's SymInts: a dynamic prompt length; the host cache length of the families that read it,
        ``cache.HOST_LENGTH``) are baked into a capture, so each value has its own graph: the ``MAX_GRAPHS`` values
        used last keep theirs. A value that changes every call (that cache length, in decode) is never seen twice,
        so such a step runs without a graph, and holds no more than ``MAX_GRAPHS`` warm-up entries.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import torch
import torch.fx as fx

_HOST_SYNC_OPS = ("grouped_mm_fallback",)  # ops whose CUDA implementation copies a device tensor to the host
MAX_GRAPHS = 8  # captured graphs (values of the integer inputs) per compiled program, the last used kept


class Lowered:
    def __init__(self, gm: fx.GraphModule, executor: str, cudagraphs: bool | None = None, examples=None):
        if executor not in ("inductor", "eager"):
            raise ValueError(f"executor must be 'inductor' or 'eager', got {executor!r}")
        if cudagraphs and executor != "inductor":
            raise ValueError("cudagraphs=True needs executor='inductor'")
        self.gm, self.executor = gm, executor
        self.fn = _inductor(gm, examples) if executor == "inductor" else None
        tensors = [a for a in examples or [] if isinstance(a, torch.Tensor)]
        on_cuda = bool(tensors) and all(t.is_cuda for t in tensors)
        syncing = sorted({str(n.target) for n in gm.graph.nodes if any(op in str(n.target) for op in _HOST_SYNC_OPS)})
        if syncing and cudagraphs:
            raise ValueError(f"cudagraphs=True: the step calls {syncing}, which copy to the host inside the step and "
                             f"cannot be captured in a CUDA graph (MoE experts in a dtype torch._grouped_mm does not "
                             f"take: run the model in bfloat16, or pass cudagraphs=False)")
        if syncing and cudagraphs is None and on_cuda:
            warnings.warn(f"helix: CUDA graphs off for this step: it calls {syncing}, which copy to the host "
                          f"(transformers' grouped_mm fallback for expert dtypes torch._grouped_mm does not take)")
        self.cudagraphs = (cudagraphs if cudagraphs is not None else on_cuda and not syncing) and not is_prefill(gm)
        self.graphed: OrderedDict[tuple, GraphedStep] = OrderedDict()  # per value of the SymInt inputs, LRU order

    def __call__(self, args: list):
        if self.executor == "eager":
            return self.gm(*args)
        if not self.cudagraphs:
            return self.fn(*args)
        key = tuple(a for a in args if not isinstance(a, torch.Tensor))
        step = self.graphed.get(key)
        if step is None:
            step = self.graphed[key] = GraphedStep(self.fn)
            if len(self.graphed) > MAX_GRAPHS:
                self.graphed.popitem(last=False)  # frees that graph and its private memory pool
        self.graphed.move_to_end(key)
        return step(*args)


def is_prefill(gm: fx.GraphModule) -> bool:
    """Whether the program attends queries at more than one position (a prompt), not one (a decode step), as the
    example values Dynamo left on the query (or the positions) say. Without them it counts as a decode step, which
    is safe: captured, the prefill kernel takes its no-host-read path."""
    for n in gm.graph.nodes:
        if n.target is torch.ops.helix.partial_attention.default:
            for arg, dim in ((n.args[0], 2), (n.args[3], 0)):  # q (B, H, L, D), pos (L,)
                value = arg.meta.get("val", arg.meta.get("example_value")) if isinstance(arg, fx.Node) else None
                if isinstance(value, torch.Tensor):
                    length = value.shape[dim]
                    return not (isinstance(length, int) and length == 1)
    return False


def _inductor(gm: fx.GraphModule, examples: list):
    from torch._inductor.compile_fx import compile_fx

    # Rank and layout are baked into the graph (owner ranks, group names) while the shapes of different ranks
    # can coincide: the FX graph cache stays off so ranks never load each other's artifacts (pytorch #192042).
    return compile_fx(gm, examples, config_patches={"fx_graph_cache": False})


class GraphedStep:
    """A compiled local step replayed as one CUDA graph (see the module docstring for the protocol)."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = 0
        self.graph = None
        self.first: list | None = None  # the tensor arguments of call 1, by identity

    def __call__(self, *args):
        self.calls += 1
        if self.graph is not None:
            if self._bind(args):
                self.graph.replay()
                return self._results()
            self.graph = None  # an input is a new object: run plainly now, capture again next time
            self.first = None
        if self.first is None:
            self.first = list(args)
            return self.fn(*args)
        return self._capture(args)

    def _capture(self, args):
        # inputs that changed since call 1 get a buffer of their own, refreshed before each replay
        self.dynamic = {i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a is not self.first[i]}
        self.static = list(args)
        for i in self.dynamic:
            self.static[i] = args[i].clone()
        self.first = None
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # a private pool per graph: graphs are freed with their Dynamo entries
            outputs = self.fn(*self.static)
        self.graph, self.outputs = graph, outputs
        graph.replay()
        return self._results()

    def _results(self):
        cloned = [o.clone() if isinstance(o, torch.Tensor) else o for o in self.outputs]
        return tuple(cloned) if isinstance(self.outputs, tuple) else cloned

    def _bind(self, args) -> bool:
        """Copy the changing inputs into the captured buffers; False if a captured-in-place input is a new object."""
        dynamic = self.dynamic
        for i, a in enumerate(args):
            s = self.static[i]
            if a is s or not isinstance(a, torch.Tensor):
                continue
            if i not in dynamic:
                return False
        for i in dynamic:
            self.static[i].copy_(args[i])
        return True
