"""A transformers ``Cache`` that keeps on each rank only that rank's KV shard.

The cache looks global to the model (``layers[i].keys`` is a virtual (B, K, max_cache_len, D) tensor, so the HF
program traces unchanged), while the rank stores ``ceil(K/tpa)`` KV heads of the positions it owns
(``Layout.owner``), in ``layers[i].local_keys`` / ``local_values`` of shape (B, K/tpa, capacity + 1, D) (one
head when tpa > K: ``Layout.kv_heads``, so ``nbytes`` shows the TP baseline's duplication). The
extra slot takes the writes of positions owned by other KVP ranks and is never read.

A batch smaller than ``max_batch_size`` uses the first rows (``update`` returns ``keys[:b]``; the partition pass
narrows the shards the same way). Anything else about the model that disagrees with the cache (layers, KV heads,
head_dim, a larger batch, dtype, device) is found while Dynamo traces ``update``: instead of letting the trace
fail inside fake-tensor propagation, ``update`` returns stand-ins made by ``helix::cache_mismatch(..., message)``
and the backend raises ``message`` before any pass runs.

MLA (DeepSeek-V2/V3): transformers 5.x caches the compressed latent, one KV "head": ``keys`` holds the normalised
compressed kv (D = kv_lora_rank) and ``values`` the rotary key (D = qk_rope_head_dim); tpa = 1, so each rank
holds (B, 1, capacity + 1, kv_lora_rank) and (B, 1, capacity + 1, qk_rope_head_dim).

FP8 (``kv_dtype=torch.float8_e4m3fn``): the shards hold float8_e4m3fn (one byte per element) and each layer holds
one fp32 scale per local KV head for its keys and one for its values, ``k_scale`` / ``v_scale`` of shape (K/tpa,):
a stored element e stands for e * scale. The model still computes in its own dtype; the global virtual
keys/values keep it, so the traced program is the same. The scales are set by the first write after a reset (the
prefill): scale = amax(|x|) over that call's keys (values) of the head, every batch row and every position written,
/ 448 * 2 (``lowering.ops.fp8_scale``, ``FP8_HEADROOM``), so every KVP rank computes the same scale. Later tokens
up to twice the prompt's largest value keep e4m3's precision (3 mantissa bits: relative error <= 2**-4);
larger ones saturate at +-448 * scale, never inf or NaN. Scales are computed on the device (no host sync), inside
the compiled step. A checkpoint's calibrated scales (``quantized.kv_scales``: ``k_scale`` / ``v_scale`` tensors,
read by ``from_pretrained``), or ``kv_scales`` given to the cache, are used instead and kept across resets.
MLA's latent cache has no FP8 form (refused).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, StaticLayer

try:
    from transformers.cache_utils import DummyLayer
except ImportError:  # transformers without kv-shared layers: no model asks for one

    class DummyLayer:  # noqa: D101  (same interface as transformers' DummyLayer, never written)
        is_initialized, is_compileable, keys, values = True, True, None, None

        def reset(self):
            pass

from . import shards
from .layout import Layout, attention_shape, mla_latent
from .lowering.ops import ShardedEagerError  # importing ops registers helix::kv_write, which HelixLayer.update calls


@torch.library.custom_op("helix::cache_mismatch", mutates_args=())
def cache_mismatch(like: torch.Tensor, length: int, message: str) -> torch.Tensor:
    """Trace-time stand-in for the keys (or values) of a cache that does not fit the model; never runs."""
    raise ValueError(message)


@cache_mismatch.register_fake
def _(like, length, message):
    return like.new_empty((*like.shape[:2], length, like.shape[-1]))


EAGER_MESSAGE = (
    "this helix StaticCache keeps its {shape} keys/values in rank-local shards, so the model cannot run eagerly "
    "(uncompiled) on it. Compile the model's forward:\n"
    "    model.forward = torch.compile(model.forward, backend='helix', options={{'layout': layout}})\n"
    "and then call model(...) or model.generate(..., past_key_values=cache) as usual. "
    "(torch.compile(model, ...).generate(...) runs the *uncompiled* forward: generate is a method of the original "
    "model, not of the compiled wrapper.)"
)


class HelixLayer(StaticLayer):
    """One decoder layer's cache: global virtual ``keys``/``values``, rank-local ``local_keys``/``local_values``."""

    # Not "compileable" for transformers' generate: it would then (1) turn the 2-D attention mask into a 4-D one
    # outside the model, hiding the per-key padding mask that helix passes to partial attention, and (2) on CUDA wrap
    # the model in its own torch.compile (Inductor), around the helix-compiled forward.
    is_compileable = False

    def __init__(self, cache: "StaticCache", max_cache_len: int, batch: int, heads: int, k_dim: int, v_dim: int,
                 dtype, device, kv_dtype=None, scales=None):
        super().__init__(max_cache_len=max_cache_len)
        layout, rank = cache.layout, cache.rank
        first, stop = layout.kv_heads(heads, rank)
        local_heads = stop - first  # K/tpa; 1 when tpa > K (the TP baseline duplicates that head)
        capacity = layout.local_capacity(max_cache_len)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.batch_size, self.num_heads, self.k_head_dim, self.v_head_dim = batch, heads, k_dim, v_dim
        self.keys = shards.virtual((batch, heads, max_cache_len, k_dim), dtype, self.device)
        self.values = shards.virtual((batch, heads, max_cache_len, v_dim), dtype, self.device)
        stored = kv_dtype or dtype
        self.local_keys = torch.zeros((batch, local_heads, capacity + 1, k_dim), dtype=stored, device=self.device)
        self.local_values = torch.zeros((batch, local_heads, capacity + 1, v_dim), dtype=stored, device=self.device)
        self.dtype, self.device = dtype, self.local_keys.device  # "cuda" resolved to "cuda:<current>"
        self.kv_dtype = stored
        self.cumulative_length = torch.zeros((), dtype=torch.int64, device=self.device)
        shards.register(self.keys, ("kv", cache.layout, rank), self.local_keys)
        shards.register(self.values, ("kv", cache.layout, rank), self.local_values)
        self.k_scale = self.v_scale = self.fixed_scales = None
        if stored == FP8:  # per local KV head; 0 = not set yet (the next write sets it)
            self.k_scale = torch.zeros((local_heads,), dtype=torch.float32, device=self.device)
            self.v_scale = torch.zeros((local_heads,), dtype=torch.float32, device=self.device)
            if scales is not None:  # the checkpoint's, for every KV head: this rank's heads, kept across resets
                self.fixed_scales = tuple(x[first:stop].to(self.device, torch.float32) for x in scales)
                self.k_scale.copy_(self.fixed_scales[0])
                self.v_scale.copy_(self.fixed_scales[1])
            shards.register(self.keys, ("kv_scale", cache.layout, rank), self.k_scale)
            shards.register(self.values, ("kv_scale", cache.layout, rank), self.v_scale)
        shards.register(self.keys, "helix_cache", cache)
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states):  # allocated in __init__
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not torch.compiler.is_compiling():
            raise ShardedEagerError(EAGER_MESSAGE.format(shape=tuple(self.keys.shape)))
        problem = self.mismatch(key_states, value_states)
        if problem is not None:
            return stand_ins(key_states, value_states, self.max_cache_len, problem)
        kv_length = key_states.shape[-2]
        cache_position = torch.arange(kv_length, device=self.device) + self.cumulative_length
        self.cumulative_length.add_(kv_length)
        torch.ops.helix.kv_write(self.keys, self.values, key_states, value_states, cache_position)
        batch = key_states.shape[0]
        if batch < self.batch_size:  # the rows beyond the batch stay unused (Dynamo guards on the batch size)
            return self.keys[:batch], self.values[:batch]
        return self.keys, self.values

    def mismatch(self, key_states: torch.Tensor, value_states: torch.Tensor) -> str | None:
        """What about the model's new keys/values disagrees with this cache (static facts at trace time), or None."""
        b, heads, _, k_dim = key_states.shape
        v_dim = value_states.shape[-1]
        # Each message is built only when its check fails: formatting a symbolic size would specialise it. The
        # checks read plain attributes, not self.keys: what the trace touches first orders the graph's inputs.
        if b > self.batch_size:
            what = f"the batch has {b} rows but the cache's max_batch_size is {self.batch_size}"
        elif heads != self.num_heads:
            what = f"the model has {heads} KV heads per layer but the cache {self.num_heads}"
        elif (k_dim, v_dim) != (self.k_head_dim, self.v_head_dim):
            what = f"the model's key/value head_dim is {k_dim}/{v_dim} but the cache's {self.k_head_dim}/{self.v_head_dim}"
        elif key_states.dtype != self.dtype:
            what = f"the model computes in {key_states.dtype} but the cache holds {self.dtype}"
        elif key_states.device != self.device:
            what = f"the model computes on {key_states.device} but the cache is on {self.device}"
        else:
            return None
        return f"helix StaticCache does not fit the model: {what}. {FIX}"

    def reset(self) -> None:
        self.local_keys.zero_()
        self.local_values.zero_()
        self.cumulative_length.zero_()
        if self.fixed_scales is not None:
            self.k_scale.copy_(self.fixed_scales[0])
            self.v_scale.copy_(self.fixed_scales[1])
        elif self.k_scale is not None:
            self.k_scale.zero_()
            self.v_scale.zero_()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("helix StaticCache cannot be cropped; call reset()")

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("helix StaticCache does not support beam search reordering")

    @property
    def nbytes(self) -> int:
        scales = 0 if self.k_scale is None else self.k_scale.nbytes + self.v_scale.nbytes
        return self.local_keys.nbytes + self.local_values.nbytes + scales


FP8 = torch.float8_e4m3fn  # the one FP8 format of the cache


def _check_kv_scales(kv_scales: dict, text, shared) -> dict:
    """``kv_scales`` ({layer: (k_scale, v_scale)}) as fp32 CPU tensors of one number per KV head; a layer the model
    lacks or that writes no KV, or a scale of another size or not positive, is a ValueError naming it."""
    out = {}
    for layer, pair in kv_scales.items():
        if not 0 <= layer < text.num_hidden_layers or layer in shared:
            raise ValueError(f"kv_scales has layer {layer}, but the model's cache layers that hold KV are 0.."
                             f"{text.num_hidden_layers - 1} without {sorted(shared)}")
        heads = _kv_shape(text, layer)[0]
        scales = [torch.as_tensor(x, dtype=torch.float32).cpu().reshape(-1) for x in pair]
        if len(scales) != 2 or any(x.numel() not in (1, heads) or not bool((x > 0).all() and torch.isfinite(x).all())
                                   for x in scales):
            raise ValueError(f"kv_scales[{layer}] must be (k_scale, v_scale), each one positive number or one per "
                             f"KV head ({heads}), got {[tuple(torch.as_tensor(x).shape) for x in pair]}")
        out[layer] = tuple(x.expand(heads).clone() for x in scales)
    return out


def kv_storage_dtype(kv_dtype, dtype: torch.dtype, config=None, device=None):
    """The dtype the cache shards hold: ``dtype`` (the model's) for None / "auto" / ``dtype`` itself, or
    float8_e4m3fn for it or "fp8". Anything else, an FP8 cache for MLA, or one on a CUDA device below compute
    capability 8.9 is a ValueError naming it."""
    if kv_dtype is None or kv_dtype == "auto" or kv_dtype == dtype:
        return dtype
    if kv_dtype in ("fp8", "float8_e4m3fn", FP8):
        if config is not None and mla_latent(config) is not None:
            raise ValueError(
                f"kv_dtype=float8_e4m3fn: {type(config).__name__} caches MLA's compressed latent, which has no FP8 "
                f"form in helix; use kv_dtype=None (the model's {dtype})"
            )
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type == "cuda":
            major, minor = cuda_capability(device)
            if (major, minor) < (8, 9):
                raise ValueError(
                    f"kv_dtype=float8_e4m3fn needs a GPU of compute capability >= 8.9 (Ada, Hopper or newer); "
                    f"{device} has {major}.{minor}"
                )
        return FP8
    raise ValueError(
        f"kv_dtype must be None (the model's dtype, {dtype}) or torch.float8_e4m3fn, got {kv_dtype!r}"
    )


def cuda_capability(device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device."""
    return torch.cuda.get_device_capability(device)


FIX = (
    "Build the cache for this model: StaticCache(model, max_batch_size, max_cache_len, layout) takes its config, "
    "dtype and device from the model (or pass config, dtype= and device= explicitly)."
)


def stand_ins(key_states, value_states, length: int, problem: str):
    """Keys/values of the shape the model expects, so the trace completes and the backend can raise ``problem``."""
    return (torch.ops.helix.cache_mismatch(key_states, length, problem),
            torch.ops.helix.cache_mismatch(value_states, length, problem))


# chunked attention (Llama 4): a query sees the keys of its own chunk of positions only; every position is kept
# and partial attention masks keys below the query's chunk start by global position (see the attention matcher)
_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention"}


def _kv_shape(config, layer: int) -> tuple[int, int, int]:
    """(KV heads, key dim, value dim) of decoder layer ``layer``'s cache, as the model builds it
    (``layout.attention_shape``: Gemma 4's full-attention layers with their global_head_dim, Falcon's multi-query
    cache, MiMo-V2-Flash's narrower values and its sliding layers' doubled KV heads)."""
    latent = mla_latent(config.per_layer_config[layer] if getattr(config, "is_heterogeneous", False) else config)
    if latent is not None:  # MLA caches one latent "head": keys = the compressed kv, values = the rotary key
        return (1, *latent)
    shape = attention_shape(config, layer)
    return shape.k, shape.d, shape.dv


def kv_shared_layers(text) -> set[int]:
    """Layers that read the KV cache of an earlier layer and write none (Gemma 3n's last ``num_kv_shared_layers``,
    ``kv_sharing_modes[i] == "reuse"``): transformers keeps a ``DummyLayer`` for them, and so does helix. Their
    attention reads the earlier layer's helix cache, i.e. this rank's shard of it (see the attention matcher)."""
    modes = getattr(text, "kv_sharing_modes", None)
    if modes is not None:
        return {i for i, mode in enumerate(modes) if mode == "reuse"}
    shared = getattr(text, "num_kv_shared_layers", 0) or 0
    return set(range(text.num_hidden_layers - shared, text.num_hidden_layers))


def _refuse_without_kv_attention(text) -> None:
    """Refuse, saying so, a model without softmax attention over a KV cache in every layer (state-space,
    RWKV-like, linear attention, hybrids of them)."""
    name = type(text).__name__
    if not getattr(text, "num_attention_heads", None) or not getattr(text, "hidden_size", None):
        raise ValueError(
            f"{name} has no softmax attention over a KV cache (no num_attention_heads: a state-space or RWKV-like "
            f"model); helix parallelises attention over a KV cache and cannot run it"
        )
    other = sorted({t for t in getattr(text, "layer_types", None) or [] if t not in _ATTENTION_LAYER_TYPES})
    if other:
        raise ValueError(
            f"{name} has layers without softmax attention over a KV cache (layer_types {other}); helix supports "
            f"full, sliding-window and chunked attention layers only"
        )


# Families whose forward over a static cache cannot be traced by torch.compile(fullgraph=True) in transformers
# 5.24, whatever the caller passes. transformers' own StaticCache fails the same way. Refused when the cache is
# built, before any tracing.
UNTRACEABLE = {
    "ctrl": "CTRLModel.forward re-assigns its pos_encoding buffer (self.pos_encoding = self.pos_encoding.to(...), "
            "transformers/models/ctrl/modeling_ctrl.py, line 319), which Dynamo cannot trace (register_buffer's "
            "`persistent` read fails)",
    "cpmant": "CpmAntModel.forward branches on `past_length != 0` and slices its mask, position bias and hidden "
              "states at past_length = cache.get_seq_length() (transformers/models/cpmant/modeling_cpmant.py, lines "
              "633-647), a 0-d tensor in a static cache, data-dependent under tracing; it also prepends "
              "prompt_length prompt tokens to every call and adds a relative position bias",
}

# Families whose forward reads ``cache.get_seq_length()`` as a Python number (a branch, a slice bound, an arange
# bound). transformers' StaticLayer returns its 0-d length tensor, data-dependent under tracing, so the trace fails;
# for these families the helix cache returns its host count instead (``StaticCache.get_seq_length``).
HOST_LENGTH = {
    "mpt",  # MptAttention: max(0, position_bias.size(1) - (seq_length + cache.get_seq_length()))
    "git",  # GitModel.forward: `cache_length > 0`, and position_ids[:, cache_length:]
    "trocr",  # TrOCRLearnedPositionalEmbedding: torch.arange(cache_length, cache_length + seq_len)
    "roformer",  # RoFormerSinusoidalPositionalEmbedding: torch.arange(cache_length, cache_length + seq_len)
}


# Families whose code in older transformers releases helix cannot run: model_type -> (the transformers version helix
# is tested with for it, why the older code fails). pyproject's range starts at 5.17, where each fails as said.
_SHARED_KV = ("its kv-shared layers take the writer's keys and values from a shared_kv_states dict passed between "
              "layers (transformers 5.24 reads the writer's cache), which helix's kv-shared matching does not follow")
NEEDS_TRANSFORMERS = {
    "bloom": ("5.24", "BloomModel builds its ALiBi tensor at the 2-D mask's length and adds it to scores over the "
                      "static cache's max_cache_len keys: transformers' own StaticCache fails ('The expanded size of "
                      "the tensor (max_cache_len) must match the existing size')"),
    "megatron-bert": ("5.24", "under torch.compile its attention mask spans the new tokens only, not the static "
                              "cache's keys, so `attention_scores + attention_mask` does not broadcast (transformers' "
                              "own StaticCache fails the same way)"),
    "roformer": ("5.24", "under torch.compile its attention mask spans the new tokens only, not the static cache's "
                         "keys, so `attention_scores + attention_mask` does not broadcast (transformers' own "
                         "StaticCache fails the same way)"),
    "aria_text": ("5.24", "AriaTextMoELayer runs its experts as fc1/fc2 grouped GEMMs over tokens permuted by expert "
                          "(AriaGroupedExpertsGemm), which helix's expert matcher does not split"),
    "gemma3n_text": ("5.24", _SHARED_KV),
    "gemma4_text": ("5.24", _SHARED_KV),
}


def _transformers_version() -> tuple[int, ...]:
    import transformers

    return tuple(int(part) for part in transformers.__version__.split(".")[:2] if part.isdigit())


def _refuse_old_transformers(config) -> None:
    """Refuse a family that helix cannot run with the installed transformers (``NEEDS_TRANSFORMERS``)."""
    import transformers

    text = config.get_text_config(decoder=True)
    for c in [config] + ([text] if text is not config else []):
        model_type = getattr(c, "model_type", None)
        if model_type in NEEDS_TRANSFORMERS:
            version, why = NEEDS_TRANSFORMERS[model_type]
            if _transformers_version() < tuple(int(v) for v in version.split(".")):
                raise ValueError(
                    f"{type(c).__name__} ({model_type}) does not run under helix with transformers "
                    f"{transformers.__version__}: {why}. helix runs it with transformers >= {version}."
                )


def _refuse_untraceable(config) -> None:
    _refuse_old_transformers(config)
    model_type = getattr(config, "model_type", None)
    if model_type == "falcon" and getattr(config, "alibi", False):
        raise ValueError(
            "FalconConfig (falcon) with alibi=True does not run over a static KV cache in transformers 5.24: "
            "FalconModel.forward builds its ALiBi tensor from a mask of seq_length + cache.get_seq_length() "
            "positions (transformers/models/falcon/modeling_falcon.py, lines 740-746) and adds it to scores over the "
            "cache's max_cache_len keys, a shape mismatch (transformers' own StaticCache fails: 'The size of tensor a "
            "(max_cache_len) must match the size of tensor b'); its slopes are also rounded to bfloat16 (line 176), "
            "which makes the bias depend on the absolute position. helix refuses it (BLOOM's ALiBi is supported)."
        )
    if model_type in UNTRACEABLE:
        raise ValueError(
            f"{type(config).__name__} ({model_type}) cannot be traced by torch.compile(fullgraph=True) over a static "
            f"KV cache (as of transformers 5.24): {UNTRACEABLE[model_type]}. helix needs each step in one graph and "
            f"refuses the family."
        )


class StaticCache(Cache):
    """Rank-local static KV cache for Helix (see module docstring).

    Same arguments as transformers' ``StaticCache`` plus the ``layout``; the rank is the default process
    group's; ``layout="auto"`` lets the planner pick one for this world size, context and batch. Its bytes per
    rank are about 1/(kvp*tpa) of transformers' ``StaticCache``.

    ``config`` may be the model itself: then dtype and device default to the model's. Otherwise dtype defaults
    to ``config.dtype`` (set by ``from_pretrained(dtype=...)``), else float32, and device to the CPU; a cache that
    does not fit the model is a clear error at the first call. A batch smaller than ``max_batch_size`` is fine.

    ``kv_dtype``: what the shards hold. None (or the model's dtype): the model's dtype, exact.
    ``torch.float8_e4m3fn``: one byte per element with per-head scales (module docstring), half a bf16 cache's
    bytes, an approximation (docs/perf.md, "FP8 KV cache: accuracy"); on CUDA it needs compute capability >= 8.9.
    ``kv_scales``: an FP8 cache's scales, {layer: (k_scale, v_scale)} with one number per KV head (a layer left
    out gets its scales at the prefill); by default the checkpoint's when the model came from ``from_pretrained``
    and its checkpoint has them (``model.helix_kv_scales``), else all set at the prefill.
    """

    def __init__(self, config, max_batch_size: int, max_cache_len: int, layout: Layout | str, dtype=None, device=None,
                 kv_dtype=None, kv_scales=None):
        from .layout import current_world

        given = kv_scales is not None
        if isinstance(config, torch.nn.Module):  # the model: its dtype and device, unless given
            first = next(config.parameters(), None)
            if first is not None:
                dtype = dtype or first.dtype
                device = device or first.device
            kv_scales = kv_scales if given else getattr(config, "helix_kv_scales", None)
            config = config.config
        _refuse_untraceable(config)
        model_type = getattr(config, "model_type", None)
        text = config.get_text_config(decoder=True)
        _refuse_without_kv_attention(text)
        self.rank, world = current_world()
        dtype = dtype or getattr(text, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        kv_dtype = kv_storage_dtype(kv_dtype, dtype, text, device)
        if layout == "auto":
            from .planner import choose_layout

            # the cache's dtype sizes the KV the planner costs (an fp32 cache is twice a bf16 one, an fp8 half)
            layout = Layout(**choose_layout(text, world, max_cache_len, batch_size=max_batch_size, dtype=dtype,
                                            kv_dtype=kv_dtype))
        layout.validate(text, world_size=world)
        # Sliding-window layers (Mistral, Gemma 2/3, Qwen2 with use_sliding_window) keep every position too: the
        # partial attention masks keys older than the window by their global position, which is exact, at the
        # cost of max_cache_len positions per layer instead of the window (transformers' rolling cache keeps
        # only the window; a rolling shard over kvp ranks is not implemented).
        if max_batch_size < 1 or max_cache_len < 1:
            raise ValueError(f"max_batch_size={max_batch_size} and max_cache_len={max_cache_len} must be >= 1")
        self.config = text
        self.layout = layout
        self.kv_dtype = kv_dtype  # what the shards hold: the model's dtype, or float8_e4m3fn
        self._max_batch_size, self._max_cache_len = max_batch_size, max_cache_len
        self.host_length = 0  # tokens written, tracked on the host so the bound is checked without a device sync
        self.host_seq_length = model_type in HOST_LENGTH  # get_seq_length returns host_length (see there)
        shared = kv_shared_layers(text)
        if kv_dtype != FP8:
            if given:
                raise ValueError(f"kv_scales are the scales of an FP8 cache, but this cache holds {kv_dtype}: pass "
                                 f"kv_dtype=torch.float8_e4m3fn with them")
            kv_scales = None  # a checkpoint's FP8 scales do not apply to a cache of the model's dtype
        kv_scales = _check_kv_scales(kv_scales or {}, text, shared)
        layers = [
            DummyLayer() if i in shared else
            HelixLayer(self, max_cache_len, max_batch_size, *_kv_shape(text, i), dtype, device,
                       None if kv_dtype == dtype else kv_dtype, kv_scales.get(i))
            for i in range(text.num_hidden_layers)
        ]
        super().__init__(layers=layers)

    # transformers 5.17 defines these as read-only properties of Cache
    @property
    def max_batch_size(self) -> int:
        return self._max_batch_size

    @property
    def max_cache_len(self) -> int:
        return self._max_cache_len

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx >= len(self.layers):
            problem = (
                f"helix StaticCache does not fit the model: the model asks for cache layer {layer_idx} but the cache "
                f"has {len(self.layers)} layers (num_hidden_layers={self.config.num_hidden_layers}). {FIX}"
            )
            return stand_ins(key_states, value_states, self.max_cache_len, problem)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def get_seq_length(self, layer_idx: int = 0):
        """transformers' 0-d length tensor; for the ``HOST_LENGTH`` families, ``host_length`` as a Python int.

        The host count is the number of tokens written before this call, the same on every rank (the ``Runtime``
        advances it by the call's query length after each step). Dynamo specialises on its first value (0: the
        prefill graph) and makes it a dynamic SymInt once it changes (automatic dynamic), so all decode steps share
        one graph. transformers' value is the layer's count, which a read after the layer's ``update`` sees grown
        by the call's tokens; of these families only MPT reads it there, in ``max(0, 1 - query_length)`` with
        query_length >= 1 either way (its ALiBi bias has one query row), so the result is the same.
        """
        if self.host_seq_length:
            length = self.host_length
            torch._check(length >= 0)  # a SymInt under Dynamo: its bound simplifies max(0, ...) (MPT's bias cut)
            return length
        return super().get_seq_length(layer_idx)

    def reset(self):
        super().reset()
        self.host_length = 0

    @property
    def nbytes(self) -> int:
        """Bytes of KV data this rank stores."""
        return sum(layer.nbytes for layer in self.layers if isinstance(layer, HelixLayer))

    @property
    def writing_layers(self) -> int:
        """Layers that write KV (the kv-shared layers of Gemma 3n read an earlier layer's and hold none)."""
        return sum(isinstance(layer, HelixLayer) for layer in self.layers)
