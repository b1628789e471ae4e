"""The ``multitask`` task kind: several labels, one loss and one set of metrics per task.

The model is a :class:`models.multitask.common.MultiTaskModel` (shared-bottom, MMoE, PLE,
ESMM, POSO). Its ``predictions`` say, per output column, which label the loss uses (BCE for
binary, MSE for regression), the loss weight (``[model.args] loss_weights``) and the rows it
sees, and which label and rows evaluation uses. The wrapper
(:class:`models.multitask.common.MultiTaskTrain`) returns ``(loss, (loss, logits [B, P],
labels [B, T]))``.

Metrics go through torchrec's metric modules with one ``RecTaskInfo`` per prediction: AUC and
NE for binary predictions, MSE for regression ones; rows outside a prediction's evaluation
mask get weight 0. The ``final`` line holds, per prediction, ``auc_<name>``, ``ne_<name>``,
``logloss_<name>`` (binary) or ``mse_<name>`` (regression) and, on synthetic data,
``oracle_auc_<name>`` (the planted model's AUC against the same label over all rows).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchrec.metrics.auc import AUCMetric
from torchrec.metrics.metrics_config import RecTaskInfo
from torchrec.metrics.mse import MSEMetric
from torchrec.metrics.ne import NEMetric

from data.batch import Batch
from data.schema import Schema
from models.blocks import autocast_dtype, autocast_forward
from models.multitask.common import MultiTaskModel, Prediction
from sharding.dist import DistContext
from trainer.config import Config
from trainer.metrics import WindowedSums
from trainer.tasks.base import LogitsLabelsKind


class MultiTaskMetrics:
    """Per-prediction metrics over a window of examples (all ranks together).

    Args:
        predictions: the model's output columns.
        world_size, rank: the process group's.
        batch_size: examples per rank per update.
        window_examples: examples (all ranks) the windows hold.
        device: where the metric state lives.
    """

    def __init__(self, predictions: List[Prediction], world_size: int, rank: int,
                 batch_size: int, window_examples: int, device: torch.device) -> None:
        self.predictions = predictions
        self.device = device
        kwargs: Dict[str, Any] = dict(world_size=world_size, my_rank=rank,
                                      batch_size=batch_size,
                                      window_size=max(window_examples, batch_size * world_size))

        def infos(kind: str) -> List[RecTaskInfo]:
            return [RecTaskInfo(name=p.name, label_name=p.name, prediction_name=p.name,
                                weight_name=p.name) for p in predictions if p.kind == kind]

        binary, regression = infos("binary"), infos("regression")
        self.auc = AUCMetric(tasks=binary, **kwargs).to(device) if binary else None
        self.ne = NEMetric(tasks=binary, **kwargs).to(device) if binary else None
        self.mse = MSEMetric(tasks=regression, **kwargs).to(device) if regression else None
        # Per prediction (binary ones only): weighted log-loss sum, weight sum, weighted
        # prediction sum and weighted label sum (calibration = predictions / labels, torchrec's
        # CalibrationMetric); the extra last row counts the rows seen.
        self._sums = WindowedSums((len(predictions) + 1, 4),
                                  kwargs["window_size"] // world_size, device)

    def update(self, logits: torch.Tensor, labels: torch.Tensor,
               mask: Optional[torch.Tensor] = None) -> None:
        """Add a batch; ``mask`` (bool ``[B]``) marks the real rows (padding weighs 0)."""
        logits = logits.detach().float()
        labels = labels.detach().float().reshape(logits.shape[0], -1)
        preds: Dict[str, Dict[str, torch.Tensor]] = {"binary": {}, "regression": {}}
        targets: Dict[str, Dict[str, torch.Tensor]] = {"binary": {}, "regression": {}}
        weights: Dict[str, Dict[str, torch.Tensor]] = {"binary": {}, "regression": {}}
        sums = torch.zeros_like(self._sums.total())
        for k, p in enumerate(self.predictions):
            y = labels[:, p.eval_label]
            w = labels[:, p.eval_given] if p.eval_given >= 0 else torch.ones_like(y)
            if mask is not None:
                w = w * mask.to(w.dtype)
            x = logits[:, k]
            preds[p.kind][p.name] = torch.sigmoid(x) if p.kind == "binary" else x
            targets[p.kind][p.name] = y
            weights[p.kind][p.name] = w
            if p.kind == "binary":
                bce = torch.nn.functional.binary_cross_entropy_with_logits(x, y, reduction="none")
                sums[k] = torch.stack([(bce * w).sum().double(), w.sum().double(),
                                       (preds["binary"][p.name] * w).sum().double(),
                                       (y * w).sum().double()])
        sums[-1, 0] = logits.shape[0]
        self._sums.add(sums, logits.shape[0])
        for kind, modules in (("binary", (self.auc, self.ne)), ("regression", (self.mse,))):
            for m in modules:
                if m is not None:
                    m.update(predictions=preds[kind], labels=targets[kind],
                             weights=weights[kind])

    def compute(self) -> Dict[str, float]:
        """``auc_<p>``, ``ne_<p>``, ``logloss_<p>``, ``calibration_<p>``, ``mse_<p>`` and
        ``examples``; a collective."""
        out: Dict[str, float] = {}
        for prefix, module in (("auc", self.auc), ("ne", self.ne), ("mse", self.mse)):
            if module is None:
                continue
            for key, value in module.compute().items():
                # torchrec keys: "<metric>-<task>|window_<metric>"
                head, _, tail = key.partition("|")
                if tail == f"window_{prefix}":
                    out[f"{prefix}_{head.split('-', 1)[1]}"] = float(value.reshape(-1)[0])
        sums = self._sums.total()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        for k, p in enumerate(self.predictions):
            if p.kind == "binary":
                out[f"logloss_{p.name}"] = float(sums[k, 0] / sums[k, 1].clamp(min=1))
                out[f"calibration_{p.name}"] = (float(sums[k, 2] / sums[k, 3]) if sums[k, 3] > 0
                                                else float("nan"))
        out["examples"] = float(sums[-1, 0])
        return out


class MultiTaskKind(LogitsLabelsKind):
    """Several labels trained together by a multi-task head (see the module docstring)."""

    name = "multitask"

    def __init__(self, cfg: Config, schema: Schema) -> None:
        super().__init__(cfg, schema)
        self._predictions: Optional[List[Prediction]] = None
        self.label_names = [lab.name for lab in schema.labels]

    @property
    def predictions(self) -> List[Prediction]:
        """The head's outputs, read from the model this kind wrapped (the trainer builds it
        once); asked before any model was built, the head is built on the meta device (no
        memory, no init cost) to read them."""
        if self._predictions is None:
            self._set_predictions(self.spec.build(self.schema, self.args, "meta"))
        assert self._predictions is not None
        return self._predictions

    def _set_predictions(self, model: nn.Module) -> None:
        if not isinstance(model, MultiTaskModel):
            raise ValueError(f"model {self.cfg.model.name!r} is not a multi-task head")
        self._predictions = list(model.predictions)

    def wrap(self, model: nn.Module, device_type: str) -> nn.Module:
        self._set_predictions(model)
        return MultiTaskTrain(model, self.cfg.training.dense_dtype, device_type)

    def metrics(self, ctx: DistContext, batch_size: int, window_examples: int
                ) -> MultiTaskMetrics:
        return MultiTaskMetrics(self.predictions, ctx.world_size, ctx.rank, batch_size,
                                window_examples, ctx.device)

    def summary(self, metrics: Mapping[str, float]) -> str:
        parts = []
        for p in self.predictions:
            key = f"auc_{p.name}" if p.kind == "binary" else f"mse_{p.name}"
            parts.append(f"{key} {metrics.get(key, float('nan')):.4f}")
        return " ".join(parts)

    def final(self, metrics: Mapping[str, float], meta: Mapping[str, Any]
              ) -> Dict[str, Optional[float]]:
        oracle = meta.get("oracle", {})
        out: Dict[str, Optional[float]] = {}
        for p in self.predictions:
            if p.kind == "regression":
                out[f"mse_{p.name}"] = metrics.get(f"mse_{p.name}")
                continue
            out[f"auc_{p.name}"] = metrics.get(f"auc_{p.name}")
            # The oracle is over all rows: comparable only without an evaluation mask.
            value = oracle.get(f"auc_{self.label_names[p.eval_label]}")
            if p.eval_given < 0 and value is not None:
                out[f"oracle_auc_{p.name}"] = float(value)
        for p in self.predictions:
            if p.kind == "binary":
                out[f"logloss_{p.name}"] = metrics.get(f"logloss_{p.name}")
                out[f"ne_{p.name}"] = metrics.get(f"ne_{p.name}")
                out[f"calibration_{p.name}"] = metrics.get(f"calibration_{p.name}")
        out["eval_rows"] = metrics.get("eval_rows")
        return out


class MultiTaskTrain(nn.Module):
    """Wraps a :class:`MultiTaskModel` with its per-prediction losses.

    ``forward(batch)`` returns ``(loss, (loss, logits [B, P], labels [B, T]))``: the loss is
    ``Σ_p weight_p · loss_p`` with ``loss_p`` the mean BCE (binary) or MSE (regression) over
    the rows its ``given`` mask keeps (a batch without such rows contributes 0).

    Args:
        model: the multi-task model.
        dense_dtype, device_type: autocast of the dense compute, as for ``CTRTrain``.
    """

    def __init__(self, model: MultiTaskModel, dense_dtype: str = "fp32",
                 device_type: str = "cpu") -> None:
        super().__init__()
        self.model = model
        self.predictions = list(model.predictions)
        self.autocast_dtype = autocast_dtype(dense_dtype)
        self.device_type = device_type

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor,
                                                                 torch.Tensor]]:
        logits = autocast_forward(self.model, batch, self.autocast_dtype, self.device_type)
        labels = batch.labels.reshape(logits.shape[0], -1)
        loss = torch.zeros((), dtype=logits.dtype, device=logits.device)
        for k, p in enumerate(self.predictions):
            if p.weight == 0:
                continue
            y = labels[:, p.label]
            if p.kind == "binary":
                per_row = F.binary_cross_entropy_with_logits(logits[:, k], y, reduction="none")
            else:
                per_row = (logits[:, k] - y).pow(2)
            if p.given >= 0:
                mask = labels[:, p.given]
                per_row = per_row * mask
                loss = loss + p.weight * per_row.sum() / mask.sum().clamp(min=1.0)
            else:
                loss = loss + p.weight * per_row.mean()
        return loss, (loss.detach(), logits.detach(), labels)
