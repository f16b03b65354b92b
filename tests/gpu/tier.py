"""Helpers of the GPU tier's tests."""

import pytest
import torch


def gpus(n: int):
    """Skip unless ``n`` GPUs are visible, naming how many are."""
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return pytest.mark.skipif(have < n, reason=f"needs {n} GPUs, {have} visible")
