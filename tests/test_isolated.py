"""eval.isolated: each call in a process of its own, at most one call per slot at a time, failures reported."""
from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest

from eval.isolated import run_isolated

SPAWN = multiprocessing.get_context("spawn")  # as eval.prequantize (CUDA cannot be shared with forked workers)


def hold_slot(folder: str, seconds: float) -> tuple[int, str]:
    """Hold this process's slot (CUDA_VISIBLE_DEVICES) for a while: creating its marker fails if another call
    holds the same slot at the same time."""
    slot = os.environ["CUDA_VISIBLE_DEVICES"]
    marker = Path(folder) / f"slot-{slot}"
    descriptor = os.open(marker, os.O_CREAT | os.O_EXCL)
    time.sleep(seconds)
    os.close(descriptor)
    marker.unlink()
    return os.getpid(), slot


def fail(kind: str):
    if kind == "raise":
        raise ValueError("a failing run")
    os._exit(3)  # killed: no result sent


def test_each_call_runs_alone_in_its_slot(tmp_path):
    calls = [(str(tmp_path), 0.3)] * 5
    outcomes = list(run_isolated(hold_slot, calls, ["a", "b"], SPAWN))
    assert sorted(index for index, _, _ in outcomes) == list(range(5))
    assert all(error is None for _, _, error in outcomes)
    pids = [result[0] for _, result, _ in outcomes]
    assert len(set(pids)) == 5 and os.getpid() not in pids  # a fresh process per call
    assert {result[1] for _, result, _ in outcomes} == {"a", "b"}
    assert not multiprocessing.active_children()  # nothing left behind (no replacement workers)


def test_failures_are_reported_and_the_other_calls_still_run(tmp_path):
    outcomes = {index: (result, error) for index, result, error in
                run_isolated(fail, [("raise",), ("exit",)], [None], SPAWN)}
    assert isinstance(outcomes[0][1], ValueError) and "a failing run" in str(outcomes[0][1])
    assert outcomes[1][0] is None and "ended with exit code 3 and no result" in str(outcomes[1][1])
    good = list(run_isolated(hold_slot, [(str(tmp_path), 0.0)], ["c"], SPAWN))
    assert good[0][1][1] == "c" and good[0][2] is None
    with pytest.raises(ValueError, match="at least one slot"):
        list(run_isolated(fail, [("raise",)], [], SPAWN))
