"""The ``helix`` torch.compile backend: capture -> detect -> plan -> partition -> schedule -> lower.

    compiled = torch.compile(model, backend="helix", options={"layout": Layout(kvp=2, tpa=2)})
    logits = compiled(input_ids=ids, past_key_values=helix_compile.StaticCache(...)).logits

Dynamo gives the global (single-device) graph of the unmodified HF model; its inputs are the live parameters
and the helix cache's virtual tensors. The passes turn it into this rank's local program; the returned
``Runtime`` swaps every sharded input for this rank's piece (a registered shard, or a slice of a materialised
parameter, made once) and checks the cache bound on the host before anything is written.

Options: ``layout`` (a ``Layout``, a dict of its fields, or "auto": the planner picks), ``executor``
("inductor", default, or "eager": run the local FX graph without Inductor), ``dump`` (a folder: the graph
text before and after each pass, and plan.json, per rank), ``cudagraphs`` (replay each compiled step as one CUDA
graph; default: on for the inductor executor on CUDA; see ``lowering/compile.py``).
"""

from __future__ import annotations

import dataclasses
import weakref
from pathlib import Path

import torch
import torch.fx as fx

from . import shards
from .graph_text import graph_text
from .layout import Layout, current_world
from .lowering.compile import Lowered
from .passes.detect import Regions, detect
from .passes.partition import partition
from .passes.plan import Plan
from .passes.plan import plan as make_plan
from .passes.schedule import schedule


@dataclasses.dataclass
class Compiled:
    """What the passes made of one Dynamo graph on this rank."""

    stages: dict  # pass name -> GraphModule after it ("capture" is the global graph)
    regions: Regions
    plan: Plan


def run_passes(gm: fx.GraphModule, example_inputs, layout_option) -> Compiled:
    """capture -> detect -> plan -> partition -> schedule, for this rank."""
    cache = _find_cache(example_inputs)
    config = cache.config
    layout = _layout(layout_option, cache)
    rank, world = current_world()
    layout.validate(config, world_size=world)
    if layout != cache.layout:
        raise ValueError(f"the StaticCache was built for {cache.layout} but the backend was given {layout}")
    regions = detect(gm, config)
    the_plan = make_plan(gm, regions, config, layout, rank)
    local = partition(gm, regions, the_plan)
    scheduled = schedule(local, the_plan)
    return Compiled({"capture": gm, "partition": local, "schedule": scheduled}, regions, the_plan)


def helix_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None, **_unused):
    """The Dynamo backend (entry point ``helix``): the passes now, Inductor lazily at the first call."""
    options = dict(options or {})
    unknown = set(options) - {"layout", "executor", "dump", "cudagraphs"}
    if unknown:
        raise ValueError(f"unknown helix options {sorted(unknown)}; known: layout, executor, dump, cudagraphs")
    done = run_passes(gm, example_inputs, options.get("layout"))
    if options.get("dump"):
        write_stages(Path(options["dump"]) / f"rank{done.plan.rank}", done)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    lowered = Lowered(done.stages["schedule"], options.get("executor", "inductor"), options.get("cudagraphs"))
    return Runtime(placeholders, done.plan, lowered, done.regions)


class Runtime:
    """Called by Dynamo with the global inputs; runs the local program on this rank's pieces."""

    def __init__(self, placeholders, the_plan, lowered: Lowered, regions):
        self.plan, self.lowered = the_plan, lowered
        self.placements = [the_plan.inputs[p.name] for p in placeholders]
        self.names = [p.name for p in placeholders]
        self._seen = [None] * len(placeholders)
        self.kv_key = ("kv", the_plan.layout, the_plan.rank)
        self.cache_index = self.placements.index("kv")
        self.q_len = _q_len_source(placeholders, regions.attention[0].kv_write.args[2])

    def __call__(self, *args):
        cache = shards.lookup(args[self.cache_index], "helix_cache")
        q_len = self.q_len if isinstance(self.q_len, int) else _read(args, self.q_len)
        if cache.host_length + q_len > cache.max_cache_len:
            raise ValueError(
                f"helix StaticCache holds {cache.host_length} tokens and max_cache_len={cache.max_cache_len}: "
                f"{q_len} more do not fit; nothing was written"
            )
        local = [self._swap(i, a) for i, a in enumerate(args)]
        out = self.lowered(local)
        cache.host_length += q_len
        return out

    def _swap(self, i, arg):
        """This rank's piece of input i, remembered per input (weakly, by identity): decode steps pass the same
        parameters and cache tensors every time, so the registry lookups and checks run once."""
        if not isinstance(arg, torch.Tensor):
            return arg  # SymInt values of dynamic sizes
        seen = self._seen[i]
        if seen is not None and seen[0]() is arg:
            return arg if seen[1] is None else seen[1]
        piece = self._local(i, arg)
        self._seen[i] = (weakref.ref(arg), None if piece is arg else piece)
        return piece

    def _local(self, i, arg):
        placement = self.placements[i]
        if placement == "replicate":
            if isinstance(arg, torch.Tensor) and shards.is_virtual(arg):
                raise RuntimeError(f"input '{self.names[i]}' is a sharded tensor but the plan replicates it")
            return arg
        if placement == "kv":
            piece = shards.lookup(arg, self.kv_key)
            if piece is None:
                raise RuntimeError(f"cache input '{self.names[i]}' has no local shard for {self.plan.layout} on rank {self.plan.rank}")
            return piece
        return shards.local_piece(arg, placement, self.names[i])


def _find_cache(example_inputs):
    for t in example_inputs:
        if isinstance(t, torch.Tensor):
            cache = shards.lookup(t, "helix_cache")
            if cache is not None:
                return cache
    raise ValueError(
        "the helix backend needs the model to be called with past_key_values=helix_compile.StaticCache(config, "
        "max_batch_size, max_cache_len, layout): none was found among the graph inputs"
    )


def _layout(value, cache) -> Layout:
    if value is None:
        raise ValueError('the helix backend needs options={"layout": helix_compile.Layout(...)}')
    if isinstance(value, Layout):
        return value
    if isinstance(value, dict):
        return Layout(**value)
    if value == "auto":
        return cache.layout  # the StaticCache was already built with a layout; the planner chose it or the user did
    raise ValueError(f"layout must be a helix_compile.Layout, a dict of its fields or 'auto', got {value!r}")


def _q_len_source(placeholders, k_node: fx.Node):
    """How to read the number of new tokens per call: an int, or (input index, dim) / (input index, None)."""
    size = k_node.meta["example_value"].shape[-2]
    if isinstance(size, int):
        return size
    for i, p in enumerate(placeholders):
        val = p.meta.get("example_value")
        if isinstance(val, torch.SymInt) and str(val) == str(size):
            return (i, None)
        if isinstance(val, torch.Tensor):
            for d, s in enumerate(val.shape):
                if str(s) == str(size):
                    return (i, d)
    raise RuntimeError(f"cannot find the input that carries the query length {size}")


def _read(args, source):
    i, d = source
    return int(args[i]) if d is None else args[i].shape[d]


def write_stages(folder: Path, done: Compiled) -> None:
    """The graph text before and after each pass, the detected regions and the plan: the review artefacts."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, g in done.stages.items():
        (folder / f"{name}.txt").write_text(graph_text(g))
    (folder / "detect.txt").write_text(done.regions.describe() + "\n")
    (folder / "plan.json").write_text(done.plan.to_json() + "\n")
