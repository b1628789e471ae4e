"""Run records: every record of ``metrics.jsonl`` also as TensorBoard scalars.

A record is a flat dict such as ``{"split": "train", "step": 100, "loss": 0.44, "auc": 0.80,
"lr/dense": 1e-3, "examples_per_s": 25000.0}``; each finite number becomes the scalar
``<split>/<key>`` at ``step`` (the ``final`` record at its ``steps``), so train, eval/valid
and test curves of every metric sit side by side in TensorBoard without a list of tags to
keep in sync with the task kinds. Event files go to ``<run_dir>/tb`` on rank 0 only.

``torch.utils.tensorboard.SummaryWriter`` queues events and writes them from a background
thread; the time spent in our calls is kept in :attr:`TensorBoardWriter.seconds` so the
trainer can report the overhead against training time.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Dict, Optional

from trainer.metrics import MetricsFile

_NOT_SCALARS = ("time", "split", "step")


class TensorBoardWriter:
    """Scalars of records under ``log_dir`` (nothing at all when ``enabled`` is false)."""

    def __init__(self, log_dir: str, enabled: bool, flush_secs: int = 10,
                 purge_step: Optional[int] = None) -> None:
        self.log_dir = log_dir
        self.seconds = 0.0
        self._writer: Any = None
        if enabled:
            # Imported here: a run with tensorboard off (or a rank > 0) needs no tensorboard.
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(log_dir, exist_ok=True)
            # purge_step: events at or after it (from a run that was interrupted and is now
            # redoing those steps) are hidden, so each step shows once.
            self._writer = SummaryWriter(log_dir=log_dir, flush_secs=flush_secs,
                                         purge_step=purge_step)

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def write(self, record: Dict[str, Any]) -> None:
        if self._writer is None:
            return
        t0 = time.perf_counter()
        split = record.get("split", "train")
        step = int(record.get("step", record.get("steps", 0)))
        for key, value in record.items():
            if key in _NOT_SCALARS or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(f"{split}/{key}", float(value), step)
        self.seconds += time.perf_counter() - t0

    def close(self) -> None:
        if self._writer is not None:
            t0 = time.perf_counter()
            self._writer.close()  # flushes the queue
            self.seconds += time.perf_counter() - t0
            self._writer = None


class RunRecords:
    """``metrics.jsonl`` and TensorBoard together: one ``write`` feeds both (rank 0).

    ``resumed_at``: the step a resumed run starts from; the interrupted run's records after it
    are dropped from ``metrics.jsonl`` and purged from TensorBoard (this run writes them again).
    """

    def __init__(self, run_dir: str, is_main: bool, tensorboard: bool,
                 resumed_at: int = 0) -> None:
        self.file = MetricsFile(run_dir, is_main)
        self.file.drop_after(resumed_at)
        self.tb = TensorBoardWriter(os.path.join(run_dir, "tb"), is_main and tensorboard,
                                    purge_step=resumed_at + 1 if resumed_at else None)

    def write(self, record: Dict[str, Any]) -> None:
        self.file.write(record)
        self.tb.write(record)

    def close(self) -> None:
        self.tb.close()

    def overhead(self, train_seconds: float) -> Optional[float]:
        """TensorBoard seconds / training seconds (None when TensorBoard is off, or when this
        process trained no step: a rerun of a finished run only evaluates)."""
        if (not self.tb.enabled and self.tb.seconds == 0.0) or train_seconds <= 0.0:
            return None
        return self.tb.seconds / max(train_seconds, 1e-9)
