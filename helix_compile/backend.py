"""The ``helix`` torch.compile backend: capture -> detect -> plan -> partition -> schedule -> lower.

    compiled = torch.compile(model, backend="helix", options={"layout": Layout(kvp=2, tpa=2)})
    logits = compiled(input_ids=ids, past_key_values=helix_compile.StaticCache(...)).logits

Dynamo gives the global (single-device) graph of the unmodified HF model; its inputs are the live parameters
and the helix cache's virtual tensors. The passes turn it into this rank's local program; the returned
``Runtime`` swaps every sharded input for this rank's piece (a registered shard, or a slice of a materialised
parameter, made once) and checks the cache bound on the host before anything is written.

Helix is inference-only: the local program always runs without autograd. Called in grad mode (parameters that
require grad, no ``torch.no_grad()``), the outputs still require grad, and a ``backward`` through them raises an
error saying so.

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
from .cache import FIX as cache_fix
from .graph_text import graph_text
from .layout import Layout, current_world
from .lowering.compile import Lowered
from .passes.detect import KV_WRITE, Regions, detect
from .passes.partition import partition
from .passes.plan import Placements, place
from .passes.regions import KV_SCALE_OF
from .passes.schedule import schedule


@dataclasses.dataclass
class Compiled:
    """What the passes made of one Dynamo graph on this rank."""

    stages: dict  # pass name -> GraphModule after it ("capture" is the global graph)
    regions: Regions
    plan: Placements  # the plan pass's placements


def run_passes(gm: fx.GraphModule, example_inputs, layout_option) -> Compiled:
    """capture -> detect -> plan -> partition -> schedule, for this rank."""
    _check_cache_fits(gm)
    cache = _find_cache(example_inputs)
    config = cache.config
    layout = _layout(layout_option, cache)
    rank, world = current_world()
    layout.validate(config, world_size=world)
    if layout != cache.layout:
        raise ValueError(f"the StaticCache was built for {cache.layout} but the backend was given {layout}")
    writes = sum(n.op == "call_function" and n.target in KV_WRITE for n in gm.graph.nodes)
    if writes and writes != cache.writing_layers:
        raise ValueError(
            f"helix StaticCache does not fit the model: the model has {writes} attention layers that write KV but the "
            f"cache has {cache.writing_layers} (num_hidden_layers={config.num_hidden_layers}). {cache_fix}"
        )
    regions = detect(gm, config)
    kv_dtype = "float8_e4m3fn" if cache.kv_dtype == torch.float8_e4m3fn else None
    the_plan = place(gm, regions, config, layout, rank, kv_dtype)
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
    scales = _scale_sources(placeholders, done.stages["schedule"])
    executor = options.get("executor", "inductor")
    examples = _local_examples(placeholders, done.plan, example_inputs, scales) if executor == "inductor" else None
    with torch.no_grad():  # inference only: Inductor compiles no backward, even for a grad-mode call
        lowered = Lowered(done.stages["schedule"], executor, options.get("cudagraphs"), examples)
    return Runtime(placeholders, done.plan, lowered, done.regions, _key_mask_padding(placeholders, done), scales)


def _scale_sources(placeholders, local: fx.GraphModule) -> list[int]:
    """For each input the local graph has beyond the global ones (the scales of an FP8 cache, in order): the index
    of the global cache input whose scale it is."""
    names = [p.name for p in placeholders]
    extra = [n for n in local.graph.nodes if n.op == "placeholder"][len(names):]
    return [names.index(n.meta[KV_SCALE_OF]) for n in extra]


class Runtime:
    """Called by Dynamo with the global inputs; runs the local program on this rank's pieces."""

    def __init__(self, placeholders, the_plan, lowered: Lowered, regions, mask_padding=None, scales=()):
        self.plan, self.lowered = the_plan, lowered
        self.mask_padding = mask_padding  # (mask input index, its length's SymInt input index) or None
        self.placements = [the_plan.inputs[p.name] for p in placeholders]
        self.names = [p.name for p in placeholders]
        self._seen = [None] * len(placeholders)
        self.kv_key = ("kv", the_plan.layout, the_plan.rank)
        self.scales = list(scales)  # FP8 cache: the cache input of each extra local input (its scale)
        self.scale_key = ("kv_scale", the_plan.layout, the_plan.rank)
        self.cache_index = self.placements.index("kv")
        self.q_len = _q_len_source(placeholders, regions.writes()[0].args[2])

    def __call__(self, *args):
        cache = shards.lookup(args[self.cache_index], "helix_cache")
        q_len = self.q_len if isinstance(self.q_len, int) else _read(args, self.q_len)
        if cache.host_length + q_len > cache.max_cache_len:
            raise ValueError(
                f"helix StaticCache holds {cache.host_length} tokens and max_cache_len={cache.max_cache_len}: "
                f"{q_len} more do not fit; nothing was written"
            )
        if self.mask_padding is not None:
            args = _pad_key_mask(args, *self.mask_padding, cache.max_cache_len)
        with torch.no_grad():  # inference only: parameter slices and the local program never record autograd
            local = [self._swap(i, a) for i, a in enumerate(args)]
            local += [shards.lookup(args[i], self.scale_key) for i in self.scales]
            out = self.lowered(local)
        cache.host_length += q_len
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            out = _inference_only(out)
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


class _InferenceOnly(torch.autograd.Function):
    """Identity whose backward refuses: outputs of a grad-mode call require grad, as the user expects, but helix
    has no backward."""

    @staticmethod
    def forward(ctx, anchor, *outs):
        return outs

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "helix is inference-only: the helix backend compiles no backward pass, so its outputs cannot be "
            "differentiated. Call the compiled model under torch.no_grad() / torch.inference_mode() for generation."
        )


def _inference_only(out):
    """``out`` (the graph's tuple of outputs) with its floating tensors routed through ``_InferenceOnly``."""
    items = list(out)
    where = [i for i, t in enumerate(items) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not where:
        return out
    anchor = torch.zeros((), requires_grad=True)  # gives the Function's outputs a grad_fn
    for i, t in zip(where, _InferenceOnly.apply(anchor, *(items[i] for i in where))):
        items[i] = t
    return type(out)(items) if isinstance(out, tuple) else items


def _key_mask_padding(placeholders, done: Compiled):
    """(mask index, length index) when the 2-D attention mask has a symbolic length that nothing else uses.

    ``generate`` grows the mask by one column per step, so Dynamo makes its length a SymInt input; with CUDA graphs
    (captured per value of the SymInt inputs, ``lowering/compile.py``) every step would capture a new graph. After
    the partition the mask feeds only partial attention, for which columns at or beyond max_cache_len and zero
    columns are the same (no visible key): the Runtime pads it with zeros to max_cache_len and passes that length,
    so every decode step replays one program. None when the length is static or used by anything else.
    """
    masks = {a.key_mask.name for a in done.regions.matches if getattr(a, "key_mask", None) is not None}
    if len(masks) != 1:
        return None
    names = [p.name for p in placeholders]
    mask_index = names.index(masks.pop())
    length = placeholders[mask_index].meta["example_value"].shape[1]
    if isinstance(length, int):
        return None
    symbol = str(length)
    sources = [i for i, p in enumerate(placeholders) if str(p.meta.get("example_value")) == symbol]
    sharing = [p for p in placeholders if isinstance(p.meta.get("example_value"), torch.Tensor)
               and any(symbol in str(s) for s in p.meta["example_value"].shape) and p is not placeholders[mask_index]]
    local = {n.name: n for n in done.stages["schedule"].graph.nodes}
    if len(sources) != 1 or sharing or local[names[sources[0]]].users:
        return None
    return mask_index, sources[0]


def _pad_key_mask(args, mask_index: int, length_index: int, max_cache_len: int):
    """args with the mask cut or zero-padded to max_cache_len columns, and that length as its SymInt value."""
    args = list(args)
    mask = args[mask_index]
    if mask.shape[1] >= max_cache_len:
        mask = mask[:, :max_cache_len].contiguous()
    else:
        mask = torch.nn.functional.pad(mask, (0, max_cache_len - mask.shape[1]))
    args[mask_index], args[length_index] = mask, max_cache_len
    return args


def _check_cache_fits(gm: fx.GraphModule) -> None:
    """Raise the first mismatch between model and cache that ``HelixLayer.update`` recorded while Dynamo traced."""
    from .cache import cache_mismatch  # noqa: F401  the op's registration

    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (torch.ops.helix.cache_mismatch, torch.ops.helix.cache_mismatch.default):
            raise ValueError(node.args[2])


def _local_examples(placeholders, the_plan, example_inputs, scales=()) -> list:
    """Example inputs of the local program for Inductor: Dynamo's own (SymInts and symbolic fakes included) where
    the input is replicated, fake tensors of the local shapes where it is sharded, then the FP8 cache's scales."""
    from torch._guards import detect_fake_mode

    fake_mode = detect_fake_mode(example_inputs)
    kv_key = ("kv", the_plan.layout, the_plan.rank)
    out = []
    for node, example in zip(placeholders, example_inputs):
        placement = the_plan.inputs[node.name]
        if placement == "replicate":
            out.append(example)
        elif placement == "kv":
            out.append(fake_mode.from_tensor(shards.lookup(example, kv_key), static_shapes=True))
        else:
            with fake_mode:
                out.append(placement.take(fake_mode.from_tensor(example, static_shapes=True)).contiguous())
    scale_key = ("kv_scale", the_plan.layout, the_plan.rank)
    out += [fake_mode.from_tensor(shards.lookup(example_inputs[i], scale_key), static_shapes=True) for i in scales]
    return out


def _find_cache(example_inputs):
    for t in example_inputs:
        if isinstance(t, torch.Tensor):
            cache = shards.lookup(t, "helix_cache")
            if cache is not None:
                return cache
    raise ValueError(
        "the helix backend needs the model to be called with past_key_values=helix_compile.StaticCache(config, "
        "max_batch_size, max_cache_len, layout): none was found among the graph inputs (either the model was called "
        "without one, or it never reads past_key_values: a model without a transformers KV cache, e.g. OpenAI GPT, "
        "or with a cache of its own, is not supported)"
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
