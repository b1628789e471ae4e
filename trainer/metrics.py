"""Metrics: torchrec's AUC and NE aggregated across ranks, log-loss, and the metrics file.

Every ``compute()`` is a collective: all ranks must call it at the same step.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
from torchrec.metrics.auc import AUCMetric
from torchrec.metrics.metrics_config import RecTaskInfo
from torchrec.metrics.ne import NEMetric


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
        self._sums = torch.zeros(2, dtype=torch.float64, device=device)  # logloss sum, count

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
        self._sums += torch.stack([(bce * weights).sum().double(), weights.sum().double()])

    def compute(self) -> Dict[str, float]:
        """``auc``, ``ne``, ``logloss`` and ``examples`` over the window, all ranks."""
        out: Dict[str, float] = {}
        for key, value in self.auc.compute().items():
            if key.endswith("window_auc"):
                out["auc"] = float(value.reshape(-1)[0])
        for key, value in self.ne.compute().items():
            if key.endswith("window_ne"):
                out["ne"] = float(value.reshape(-1)[0])
        sums = self._sums.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        out["logloss"] = float(sums[0] / sums[1].clamp(min=1))
        out["examples"] = float(sums[1])
        return out

    def reset(self) -> None:
        self.auc.reset()
        self.ne.reset()
        self._sums.zero_()


class MetricsFile:
    """Appends one JSON object per record to ``<run_dir>/metrics.jsonl`` (rank 0 only)."""

    def __init__(self, run_dir: str, enabled: bool) -> None:
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.enabled = enabled

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
