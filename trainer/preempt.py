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
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from types import FrameType
from typing import Dict, Optional

import torch
import torch.distributed as dist

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
