"""A transformers ``Cache`` that keeps on each rank only that rank's KV shard.

The cache looks global to the model (``layers[i].keys`` is a virtual (B, K, max_cache_len, D) tensor, so the HF
program traces unchanged), while the rank stores ``ceil(K/tpa)`` KV heads of the positions it owns
(``Layout.owner``), in ``layers[i].local_keys`` / ``local_values`` of shape (B, K/tpa, capacity + 1, D). The
extra slot takes the writes of positions owned by other KVP ranks and is never read.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, StaticLayer

from . import shards
from .layout import Layout
from .lowering import ops as _ops  # noqa: F401  registers helix::kv_write, which HelixLayer.update calls


class HelixLayer(StaticLayer):
    """One decoder layer's cache: global virtual ``keys``/``values``, rank-local ``local_keys``/``local_values``."""

    def __init__(self, cache: "StaticCache", max_cache_len: int, batch: int, heads: int, head_dim: int, dtype, device):
        super().__init__(max_cache_len=max_cache_len)
        layout, rank = cache.layout, cache.rank
        local_heads = heads // layout.tpa
        capacity = layout.local_capacity(max_cache_len)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.batch_size, self.num_heads, self.k_head_dim, self.v_head_dim = batch, heads, head_dim, head_dim
        self.keys = shards.virtual((batch, heads, max_cache_len, head_dim), dtype, self.device)
        self.values = shards.virtual((batch, heads, max_cache_len, head_dim), dtype, self.device)
        self.local_keys = torch.zeros((batch, local_heads, capacity + 1, head_dim), dtype=dtype, device=self.device)
        self.local_values = torch.zeros_like(self.local_keys)
        self.cumulative_length = torch.zeros((), dtype=torch.int64, device=self.device)
        shards.register(self.keys, ("kv", cache.layout, rank), self.local_keys)
        shards.register(self.values, ("kv", cache.layout, rank), self.local_values)
        shards.register(self.keys, "helix_cache", cache)
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states):  # allocated in __init__
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        kv_length = key_states.shape[-2]
        cache_position = torch.arange(kv_length, device=self.device) + self.cumulative_length
        self.cumulative_length.add_(kv_length)
        torch.ops.helix.kv_write(self.keys, self.values, key_states, value_states, cache_position)
        return self.keys, self.values

    def reset(self) -> None:
        self.local_keys.zero_()
        self.local_values.zero_()
        self.cumulative_length.zero_()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("helix StaticCache cannot be cropped; call reset()")

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("helix StaticCache does not support beam search reordering")

    @property
    def nbytes(self) -> int:
        return self.local_keys.nbytes + self.local_values.nbytes


_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention"}


def _refuse_without_kv_attention(text) -> None:
    """Refuse, saying so, a model without softmax attention over a KV cache in every layer (state-space,
    RWKV-like, linear attention, hybrids of them)."""
    name = type(text).__name__
    if not getattr(text, "num_attention_heads", None) or not getattr(text, "hidden_size", None):
        raise ValueError(
            f"{name} has no softmax attention over a KV cache (no num_attention_heads: a state-space or RWKV-like "
            f"model); helix parallelises attention over a KV cache and cannot run it"
        )
    if getattr(text, "kv_lora_rank", None):
        raise ValueError(
            f"{name} uses multi-head latent attention (kv_lora_rank={text.kv_lora_rank}: a compressed latent KV "
            f"cache); helix does not support MLA yet"
        )
    other = sorted({t for t in getattr(text, "layer_types", None) or [] if t not in _ATTENTION_LAYER_TYPES})
    if other:
        raise ValueError(
            f"{name} has layers without softmax attention over a KV cache (layer_types {other}); helix supports "
            f"full and sliding-window attention layers only"
        )


class StaticCache(Cache):
    """Rank-local static KV cache for Helix (see module docstring).

    Same arguments as transformers' ``StaticCache`` plus the ``layout``; the rank is the default process
    group's; ``layout="auto"`` lets the planner pick one for this world size, context and batch. Its bytes per
    rank are about 1/(kvp*tpa) of transformers' ``StaticCache``.
    """

    def __init__(self, config, max_batch_size: int, max_cache_len: int, layout: Layout | str, dtype=None, device=None):
        from .layout import current_world

        text = config.get_text_config(decoder=True)
        _refuse_without_kv_attention(text)
        self.rank, world = current_world()
        if layout == "auto":
            from .planner import choose_layout

            layout = Layout(**choose_layout(text, world, max_cache_len, batch_size=max_batch_size))
        layout.validate(text, world_size=world)
        # Sliding-window layers (Mistral, Gemma 2/3, Qwen2 with use_sliding_window) keep every position too: the
        # partial attention masks keys older than the window by their global position, which is exact, at the
        # cost of max_cache_len positions per layer instead of the window (transformers' rolling cache keeps
        # only the window; a rolling shard over kvp ranks is a later optimisation).
        if max_batch_size < 1 or max_cache_len < 1:
            raise ValueError(f"max_batch_size={max_batch_size} and max_cache_len={max_cache_len} must be >= 1")
        self.config = text
        self.layout = layout
        self._max_batch_size, self._max_cache_len = max_batch_size, max_cache_len
        self.host_length = 0  # tokens written, tracked on the host so the bound is checked without a device sync
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        dtype = dtype or getattr(text, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        layers = [
            HelixLayer(self, max_cache_len, max_batch_size, heads, head_dim, dtype, device)
            for _ in range(text.num_hidden_layers)
        ]
        super().__init__(layers=layers)

    # transformers 5.17 defines these as read-only properties of Cache
    @property
    def max_batch_size(self) -> int:
        return self._max_batch_size

    @property
    def max_cache_len(self) -> int:
        return self._max_cache_len

    def reset(self):
        super().reset()
        self.host_length = 0

    @property
    def nbytes(self) -> int:
        """Bytes of KV data this rank stores."""
        return sum(layer.nbytes for layer in self.layers)
