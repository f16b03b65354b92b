"""The launcher (``helix_compile.launch``): a failing rank stops the others and is named with its traceback.
(`helix generate`'s supervision, Ctrl-C and a killed rank: tests/test_cli_generate.py.)"""

import time

import pytest

from helix_compile.launch import run_ranks


def _rank_1_fails(rank):
    if rank == 1:
        raise ValueError("rank 1 refuses")
    time.sleep(600)  # rank 0 would go on for 10 minutes: the launcher must stop it


def test_first_failure_stops_the_others_and_is_named():
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?s)rank 1:\n.*ValueError: rank 1 refuses"):
        run_ranks(2, _rank_1_fails, timeout=120)
    assert time.monotonic() - t0 < 60  # it did not wait for rank 0's ten minutes
