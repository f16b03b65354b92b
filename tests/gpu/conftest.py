"""The GPU tier: every test here is marked ``gpu`` and skipped, with the reason, where no CUDA device is visible.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 python -m pytest -m gpu tests/gpu -n 6

(``-n 6``: six tests side by side on the machine, pytest-xdist; each smoke configuration is a test of its own.)

Tests that need several GPUs say how many and are skipped, naming what is missing, on a machine with fewer.
"""

import os

import pytest
import torch

for key, value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(key, value)


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(pytest.mark.skip(reason="no CUDA device: the GPU tier runs on a GPU machine "
                                                        "(python -m pytest -m gpu tests/gpu -n 6)"))
