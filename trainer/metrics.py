"""Metrics: torchrec's AUC and NE aggregated across ranks, log-loss, calibration, and the
metrics file.

Every ``compute()`` is a collective: all ranks must call it at the same step.
"""

from __future__ import annotations

import collections
import json
import os
import re
import time
from typing import Any, Deque, Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torchrec.metrics.auc import AUCMetric
from torchrec.metrics.metrics_config import RecTaskInfo
from torchrec.metrics.ne import NEMetric


class WindowedSums:
    """Sums of per-batch statistics over the most recent ``window_rows`` rows (this rank's),
    the window torchrec's AUC/NE keep, so that log-loss and calibration describe the same
    recent examples as the AUC next to them rather than everything since the start.

    ``add`` keeps device tensors (no host sync per step); rows are counted on the host.
    A window at least as large as the data (evaluation) gives plain totals.
    """

    def __init__(self, shape: Sequence[int], window_rows: int, device: torch.device) -> None:
        self.window_rows = max(1, window_rows)
        self._total = torch.zeros(*shape, dtype=torch.float64, device=device)
        self._parts: Deque[Tuple[int, torch.Tensor]] = collections.deque()
        self._rows = 0

    def add(self, values: torch.Tensor, rows: int) -> None:
        values = values.double()
        self._parts.append((rows, values))
        self._total += values
        self._rows += rows
        while self._rows - self._parts[0][0] >= self.window_rows:
            old_rows, old = self._parts.popleft()
            self._total -= old
            self._rows -= old_rows

    def total(self) -> torch.Tensor:
        return self._total.clone()

    def reset(self) -> None:
        self._total.zero_()
        self._parts.clear()
        self._rows = 0


class CTRMetrics:
    """Binary-task metrics over a window of examples (all ranks together).

    Args:
        world_size, rank: the process group's.
        batch_size: examples per rank per update.
        window_examples: examples (all ranks) the AUC/NE window holds; use at least the
            evaluation set's size for whole-set metrics.
        device: where the metric state lives.
    """

    def __init__(self, world_size: int, rank: int, batch_size: int, window_examples: int,
                 device: torch.device, task: str = "label") -> None:
        self.task = task
        info = RecTaskInfo(name=task, label_name=task, prediction_name=task, weight_name=task)
        kwargs = dict(world_size=world_size, my_rank=rank, batch_size=batch_size,
                      tasks=[info], window_size=max(window_examples, batch_size * world_size))
        self.auc = AUCMetric(**kwargs).to(device)  # type: ignore[arg-type]
        self.ne = NEMetric(**kwargs).to(device)  # type: ignore[arg-type]
        self.device = device
        # logloss sum, count, prediction sum, label sum (calibration = predictions / labels,
        # torchrec's CalibrationMetric with unit weights) over this rank's share of the window
        self._sums = WindowedSums((4,), max(window_examples, batch_size * world_size)
                                  // world_size, device)

    def update(self, logits: torch.Tensor, labels: torch.Tensor,
               mask: Optional[torch.Tensor] = None) -> None:
        """Add a batch; ``mask`` (bool ``[B]``) marks the real rows — padding rows get
        weight 0, which leaves AUC, NE and log-loss exactly as if they were absent."""
        logits = logits.detach().float()
        labels = labels.detach().float()
        preds = torch.sigmoid(logits)
        weights = torch.ones_like(preds) if mask is None else mask.to(preds.dtype)
        args = dict(predictions={self.task: preds}, labels={self.task: labels},
                    weights={self.task: weights})
        self.auc.update(**args)  # type: ignore[arg-type]
        self.ne.update(**args)  # type: ignore[arg-type]
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels,
                                                                   reduction="none")
        self._sums.add(torch.stack([(bce * weights).sum().double(), weights.sum().double(),
                                    (preds * weights).sum().double(),
                                    (labels * weights).sum().double()]),
                       labels.numel())

    def compute(self) -> Dict[str, float]:
        """``auc``, ``ne``, ``logloss``, ``calibration`` and ``examples`` over the window,
        all ranks."""
        out: Dict[str, float] = {}
        for key, value in self.auc.compute().items():
            if key.endswith("window_auc"):
                out["auc"] = float(value.reshape(-1)[0])
        for key, value in self.ne.compute().items():
            if key.endswith("window_ne"):
                out["ne"] = float(value.reshape(-1)[0])
        sums = self._sums.total()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        out["logloss"] = float(sums[0] / sums[1].clamp(min=1))
        out["examples"] = float(sums[1])
        # No positives: calibration is undefined (torchrec would divide by zero).
        out["calibration"] = float(sums[2] / sums[3]) if sums[3] > 0 else float("nan")
        return out

    def reset(self) -> None:
        self.auc.reset()
        self.ne.reset()
        self._sums.reset()


class MetricsFile:
    """Appends one JSON object per record to ``<run_dir>/metrics.jsonl`` (rank 0 only)."""

    def __init__(self, run_dir: str, enabled: bool) -> None:
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.enabled = enabled

    def drop_after(self, step: int) -> None:
        """Remove the records of steps after ``step``, and ``final`` records from ``step`` on
        (a resumed run redoes those steps and writes them, and its own final record, again),
        so a rerun leaves one record per step. Rewritten to a temporary file and renamed."""
        if not self.enabled or not os.path.exists(self.path):
            return
        kept, dropped = [], 0
        with open(self.path) as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                    at = rec.get("step", rec.get("steps", 0))
                    final = rec.get("split") == "final"
                except (json.JSONDecodeError, AttributeError):
                    dropped += 1  # a torn last line of a killed run
                    continue
                if isinstance(at, (int, float)) and (at > step or (final and at >= step)):
                    dropped += 1
                else:
                    kept.append(line if line.endswith("\n") else line + "\n")
        if dropped:
            tmp = f"{self.path}.tmp-{os.getpid()}"
            with open(tmp, "w") as fh:
                fh.writelines(kept)
            os.replace(tmp, self.path)

    def write(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def format_final(values: Dict[str, Optional[float]]) -> str:
    """The one line a script can read: ``final k=v k=v ...`` (absent values omitted)."""
    parts = []
    for k, v in values.items():
        if v is None:
            continue
        parts.append(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}")
    return "final " + " ".join(parts)


def parse_final(output: str) -> Optional[Dict[str, str]]:
    """The last ``final k=v ...`` line of a run's output as ``{k: v}`` (values as printed),
    or ``None`` when the output has no final line."""
    lines = [line for line in output.splitlines() if line.startswith("final ")]
    if not lines:
        return None
    return dict(re.findall(r"(\S+)=(\S+)", lines[-1]))
