"""The pieces of `helix bench` that run without a GPU: the GPU-busy time of a profile."""

import torch

from helix_compile.bench import measure


def test_busy_time_is_the_union_of_kernel_intervals():
    assert measure.busy_us([(0, 2), (1, 3), (5, 6)]) == 4  # overlapping kernels (streams) count once
    assert measure.busy_us([(0, 10), (2, 3)]) == 10
    assert measure.busy_us([]) == 0


def test_profile_summary_without_kernels(monkeypatch, tmp_path):
    """On CPU no kernel runs: every millisecond of the step is exposed, and the trace is written."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    x = torch.randn(64, 64)
    summary = measure.profile_steps(lambda: x @ x, 2, tmp_path / "trace.json")
    assert summary["gpu_busy_ms"] == 0 and summary["top"] == [] and summary["kernels_per_step"] == 0
    assert summary["exposed_ms"] == summary["wall_ms"] > 0
    assert (tmp_path / "trace.json").stat().st_size > 0
