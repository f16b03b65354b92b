"""helix-compile: Helix parallelism (arXiv 2507.07120) as a torch.compile backend for HuggingFace causal LMs."""

from .cache import StaticCache
from .layout import Layout
from .lowering import ops as _ops  # noqa: F401  registers the helix:: custom ops

__all__ = ["Layout", "StaticCache", "from_pretrained"]


def from_pretrained(path, layout, dtype=None, device=None, verify=True, experts_implementation=None):
    """Load an HF checkpoint or a ``helix convert`` output so that this rank reads and keeps only its own shards
    (see ``helix_compile.loading``)."""
    from .loading import from_pretrained as _load

    return _load(path, layout, dtype=dtype, device=device, verify=verify, experts_implementation=experts_implementation)
