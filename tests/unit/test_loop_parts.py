"""The training loop's parts, one process: when a segment ends early (a timed checkpoint, a
stop signal), which rank a fault drill arms, when the valid split is evaluated, and the
segment boundaries. The whole loop runs in tests/integration/test_fault_tolerance.py."""

from __future__ import annotations

import time
from typing import Optional

import torch

from trainer.config import Config
from trainer.preempt import FaultInjection, Preempted, SegmentStops
from trainer.selection import EarlyStopping, ValidEvaluations
from trainer.trainer import next_multiple

CPU = torch.device("cpu")


def test_timed_checkpoint_ends_a_segment_once() -> None:
    assert not SegmentStops(None, 0.0, CPU).at_log_line()  # off
    stops = SegmentStops(None, 1.0, CPU)
    stops.start_segment()
    assert not stops.at_log_line()  # a minute has not passed since the start
    stops.last_save = time.monotonic() - 61  # ... and now it has
    assert stops.at_log_line() and stops.timed_save
    assert not stops.at_log_line()  # once per segment
    stops.saved()
    stops.start_segment()
    assert not stops.timed_save and not stops.at_log_line()
    # Without a guard no signal is watched; the preemption names what stopped the run.
    assert not stops.after_step(torch.tensor(float("nan")), 3, None)
    error = stops.preemption(7, "ckpt/step_7")
    assert isinstance(error, Preempted) and "after step 7; checkpoint ckpt/step_7" in str(error)


def test_fault_drill_arms_one_rank_of_a_fresh_run() -> None:
    assert FaultInjection("step:5", 1, rank=1, resumed=False).armed
    assert not FaultInjection("step:5", 1, rank=0, resumed=False).armed
    assert not FaultInjection("step:5", 1, rank=1, resumed=True).armed
    assert not FaultInjection("", 0, rank=0, resumed=False).armed
    FaultInjection("step:5", 0, rank=0, resumed=False).at("step", 4)  # not yet: returns


def test_valid_evaluations_are_due_at_multiples_and_for_selection_at_the_end() -> None:
    cfg = Config()
    cfg.training.eval_every = 10

    def evals(stopper: Optional[EarlyStopping]) -> ValidEvaluations:
        parts = [None] * 8  # what an evaluation runs with; due() needs none of it
        return ValidEvaluations(cfg, *parts, stopper)  # type: ignore[arg-type]

    plain, selecting = evals(None), evals(EarlyStopping("auc", 2))
    assert [s for s in range(1, 31) if plain.due(s, done=False)] == [10, 20, 30]
    assert not plain.due(30, done=True)  # the final evaluation is the test split's
    assert selecting.due(25, done=True)  # with selection the last model is a candidate
    assert next_multiple(10, 10, 35) == 20 and next_multiple(19, 10, 35) == 20
    assert next_multiple(7, 0, 35) == 35  # off: the segment runs to the end
