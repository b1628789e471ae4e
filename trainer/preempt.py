"""Stopping a run on purpose: preemption signals and non-finite losses, agreed by all ranks.

Schedulers preempt with a signal and a grace period: kubernetes and ``torchrun`` send
SIGTERM (torchrun forwards the SIGTERM it gets to every worker), slurm sends what
``--signal`` names (SIGUSR1 by convention). :class:`StopSignals` turns SIGTERM and SIGUSR1
into a flag instead of death. :class:`StepGuard` then runs one small all-reduce per training
step, a float vector ``[signal seen, non-finite loss seen, world_size - lowest such rank]``
with ``MAX``, so every rank learns at the same step that

* some rank got a stop signal: the loop stops taking new batches, finishes the steps in
  flight, saves a checkpoint and ends with :class:`Preempted` (exit code
  :data:`EXIT_PREEMPTED`); a rerun resumes from that checkpoint exactly;
* some rank's loss was NaN or ±inf: the loop raises :class:`NonFiniteLoss` (exit code
  :data:`EXIT_NONFINITE`) naming the step, the rank and the last good checkpoint, before any
  further checkpoint is written.

The cost is one 3-element all-reduce per step (tens of microseconds on gloo between local
ranks; on CUDA it also waits for the step's loss, one host sync per step).

:class:`SegmentStops` is what the training loop asks after each step and at each log line
whether to end the current segment early: a stop signal (above), or a timed checkpoint
(``checkpoint.every_minutes``, voted by all ranks at log lines). :class:`FaultInjection`
runs the recovery drills of ``training.fail_at``.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from types import FrameType
from typing import Dict, Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

EXIT_NONFINITE = 3
EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): "try again later", i.e. rerun to continue

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_last_signal = 0  # the last stop signal any StopSignals of this process recorded


def wait_for_stop_signal(timeout_s: float) -> bool:
    """Poll until a stop signal has been recorded (True) or ``timeout_s`` passed (False).
    The SIGTERM drill uses it so that the rank that signalled its launcher stops at a
    predictable step instead of racing the forwarded signal."""
    deadline = time.monotonic() + timeout_s
    while not _last_signal and time.monotonic() < deadline:
        time.sleep(0.01)
    return bool(_last_signal)


class NonFiniteLoss(RuntimeError):
    """A rank's loss was NaN or inf; nothing was saved after that step."""

    exit_code = EXIT_NONFINITE


class Preempted(Exception):
    """A stop signal ended the run after a checkpoint was written (not a failure)."""

    exit_code = EXIT_PREEMPTED


class StopSignals:
    """Records SIGTERM / SIGUSR1 instead of dying (installed only in the main thread)."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: Dict[int, object] = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        # Only a flag: logging or collectives are not safe inside a signal handler.
        global _last_signal
        self.received = _last_signal = signum

    def install(self) -> "StopSignals":
        global _last_signal
        _last_signal = 0
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the default behaviour
                pass
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""


@dataclass
class StepVerdict:
    stop: bool  # some rank got a stop signal
    nonfinite_rank: Optional[int]  # lowest rank whose loss was not finite, if any


class StepGuard:
    """The per-step agreement of all ranks (see the module docstring)."""

    def __init__(self, signals: StopSignals, rank: int, world_size: int,
                 device: torch.device) -> None:
        self.signals = signals
        self.rank = rank
        self.world_size = world_size
        self.device = device

    def after_step(self, loss: torch.Tensor) -> StepVerdict:
        bad = ~torch.isfinite(loss.detach()).all()
        flags = torch.stack([
            torch.tensor(1.0 if self.signals.received else 0.0, device=loss.device),
            bad.float(),
            bad.float() * (self.world_size - self.rank),
        ]).to(self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        sig, nonfinite, lowest = flags.tolist()
        return StepVerdict(stop=sig > 0,
                           nonfinite_rank=int(self.world_size - lowest) if nonfinite else None)

    def check(self, loss: torch.Tensor, step: int, last_good: Optional[str]) -> bool:
        """After training step ``step``: True when a stop signal reached some rank; raises
        :class:`NonFiniteLoss` when some rank's loss was not finite (on every rank)."""
        verdict = self.after_step(loss)
        if verdict.nonfinite_rank is not None:
            where = (f"the last good checkpoint is {last_good} (nothing was saved after it); "
                     f"resume from it with --checkpoint.resume_from={last_good} and a lower "
                     f"--training.dense_lr / --training.sparse_lr" if last_good else
                     "no checkpoint was written before it")
            raise NonFiniteLoss(
                f"non-finite loss (NaN or inf) at step {step} on rank {verdict.nonfinite_rank}; "
                f"training stopped before writing any checkpoint after it: {where}")
        return verdict.stop


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank (a collective)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


class SegmentStops:
    """Whether the current training segment ends before its planned end, the same on every
    rank: after a stop signal (``guard``; a non-finite loss raises there instead) or when a
    timed checkpoint is due (``every_minutes`` since the last save, 0: off).

    Either way the loop stops taking batches, drains the steps in flight and saves; after a
    stop signal it then raises :meth:`preemption`. Call :meth:`start_segment` before each
    segment and :meth:`saved` after each checkpoint.
    """

    def __init__(self, guard: Optional[StepGuard], every_minutes: float,
                 device: torch.device) -> None:
        self.guard = guard
        self.every_minutes = every_minutes
        self.device = device
        self.last_save = time.monotonic()
        self.preempted = False  # a stop signal ended this segment
        self.timed_save = False  # a timed checkpoint ended this segment

    def start_segment(self) -> None:
        self.preempted = self.timed_save = False

    def after_step(self, loss: torch.Tensor, step: int, last_good: Optional[str]) -> bool:
        """After every training step (a collective): True at the step a stop signal first
        reached some rank; raises :class:`NonFiniteLoss` when some rank's loss was not
        finite (before any further save)."""
        if self.guard is not None and self.guard.check(loss, step, last_good) \
                and not self.preempted:
            self.preempted = True
            return True
        return False

    def at_log_line(self) -> bool:
        """At every log line (a collective while the timed checkpoint is on): True when
        ``every_minutes`` have passed since the last save on some rank."""
        if self.every_minutes > 0 and not self.timed_save and any_rank(
                time.monotonic() - self.last_save >= 60 * self.every_minutes, self.device):
            self.timed_save = True
            return True
        return False

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def preemption(self, step: int, checkpoint: Optional[str]) -> Preempted:
        """The :class:`Preempted` to raise once the checkpoint after ``step`` is written."""
        name = self.guard.signals.name if self.guard else "a signal"
        return Preempted(f"stopped by {name} after step {step}; checkpoint {checkpoint} "
                         f"written: rerun the same command to continue from it")


class FaultInjection:
    """The recovery drills of ``training.fail_at`` on rank ``fail_rank``: ``step:N`` and
    ``save:N`` SIGKILL the rank after step N / while saving step N's checkpoint (before its
    commit); ``sigterm:N`` sends SIGTERM to the launcher (``torchrun``; this process without
    one) after step N, as a scheduler's preemption would. Only in a fresh run's first
    attempt: never after a resume or a torchrun restart."""

    def __init__(self, fail_at: str, fail_rank: int, rank: int, resumed: bool) -> None:
        self.fail_at = fail_at
        self.armed = (bool(fail_at) and rank == fail_rank and not resumed
                      and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0")
        self.rank = rank

    def at(self, kind: str, step: int) -> None:
        """The drill point ``kind`` (``step``, ``save``, ``sigterm``) of step ``step``."""
        if not (self.armed and self.fail_at == f"{kind}:{step}"):
            return
        if kind == "sigterm":
            logger.warning("fault injection: SIGTERM to the launcher at step %d", step)
            launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else os.getpid()
            os.kill(launcher, signal.SIGTERM)
            wait_for_stop_signal(30.0)  # torchrun forwards it: stop at this step, not later
            return
        logger.warning("fault injection: killing rank %d at %s:%d", self.rank, kind, step)
        os.kill(os.getpid(), signal.SIGKILL)
