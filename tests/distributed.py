"""Run a test body on N real processes (gloo on CPU; NCCL puts rank r on cuda:r): the product's launcher
(``helix_compile.launch``), with a test-sized timeout. A failure on any rank is raised with its traceback."""

from helix_compile.launch import free_port, run_ranks as _run_ranks

__all__ = ["free_port", "run_ranks"]


def run_ranks(world: int, fn, *args, timeout: float = 900, backend: str = "gloo") -> list:
    return _run_ranks(world, fn, *args, timeout=timeout, backend=backend)
