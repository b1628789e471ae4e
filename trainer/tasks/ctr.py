"""The ``ctr`` task kind: binary click prediction.

:class:`CTRTrain` wraps a ``Batch`` → logits ``[B]`` model with binary cross-entropy and
returns the pipeline's ``(loss, (loss, logits [B], labels [B]))``; :class:`CTRKind` checks the
schema's label, builds the wrapper, and owns the AUC / NE / log-loss metrics and the CTR part
of the ``final`` line (``auc``, ``oracle_auc``, ``logloss``, ``ne``, ``calibration``,
``eval_rows``).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from data.batch import Batch
from data.schema import Schema, SchemaError
from models.blocks import autocast_dtype, autocast_forward
from sharding.dist import DistContext
from trainer.config import Config
from trainer.metrics import CTRMetrics
from trainer.tasks.base import LogitsLabelsKind


class CTRTrain(nn.Module):
    """Wraps a ``Batch`` → logits ``[B]`` model with binary cross-entropy.

    A model with an ``aux_loss_weight > 0`` attribute and a ``forward_with_aux(batch) ->
    (logits, aux_loss)`` method (DIEN) trains on ``BCE + aux_loss_weight · aux_loss``.

    ``forward(batch)`` returns ``(loss, (loss, logits, labels))`` — the contract of torchrec's
    train pipelines (first element is backpropagated, second is handed to metrics).

    Args:
        model: the over-arch model.
        dense_dtype: ``fp32`` | ``bf16`` | ``fp16``: autocast dtype of the model's dense
            compute. Embedding lookups (fbgemm ops, outside autocast's op list), the loss
            and all parameters and optimizer state stay fp32.
        device_type: ``cpu`` | ``cuda``, for autocast (fixed at build time: the pipeline
            fx-traces forward, so it cannot be read off the batch).
    """

    def __init__(self, model: nn.Module, dense_dtype: str = "fp32",
                 device_type: str = "cpu") -> None:
        super().__init__()
        self.model = model
        self.loss_fn = nn.BCEWithLogitsLoss()
        self.autocast_dtype = autocast_dtype(dense_dtype)
        self.device_type = device_type

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor,
                                                                 torch.Tensor]]:
        aux_weight = float(getattr(self.model, "aux_loss_weight", 0.0))
        if aux_weight > 0 and self.training:
            # A model with an auxiliary loss (DIEN) returns it beside its logits; it is
            # part of the training loss only (evaluation reports the BCE).
            with torch.autocast(self.device_type, dtype=self.autocast_dtype or torch.bfloat16,
                                enabled=self.autocast_dtype is not None):
                out = self.model.forward_with_aux(batch)
            logits = out[0].float()
            loss = self.loss_fn(logits, batch.labels) + aux_weight * out[1].float()
            return loss, (loss.detach(), logits.detach(), batch.labels)
        logits = autocast_forward(self.model, batch, self.autocast_dtype, self.device_type)
        loss = self.loss_fn(logits, batch.labels)
        return loss, (loss.detach(), logits.detach(), batch.labels)

class CTRKind(LogitsLabelsKind):
    """Binary click prediction: BCE loss, AUC / NE / log-loss metrics, ``oracle_auc``."""

    name = "ctr"

    def __init__(self, cfg: Config, schema: Schema) -> None:
        super().__init__(cfg, schema)
        # A BCE head needs exactly one binary label; regression labels {0, 5} would train
        # to a meaningless AUC with exit code 0.
        labels = [(lab.name, lab.kind) for lab in schema.labels]
        if len(labels) != 1 or labels[0][1] != "binary":
            source = cfg.data.schema or os.path.join(cfg.data.path, "schema.json")
            raise SchemaError(
                f"{source}: model {cfg.model.name!r} is a CTR model (BCE loss) and needs exactly "
                f"one label of kind 'binary' (values 0/1), but the schema's labels are "
                f"{labels or 'none ([])'}; use a dataset with one binary label, or a "
                f"multi-task model for several labels or regression targets")

    def wrap(self, model: nn.Module, device_type: str) -> nn.Module:
        return CTRTrain(model, self.cfg.training.dense_dtype, device_type)

    def metrics(self, ctx: DistContext, batch_size: int, window_examples: int) -> CTRMetrics:
        return CTRMetrics(ctx.world_size, ctx.rank, batch_size, window_examples, ctx.device)

    def summary(self, metrics: Mapping[str, float]) -> str:
        return (f"auc {metrics.get('auc', float('nan')):.4f} "
                f"logloss {metrics.get('logloss', float('nan')):.4f}")

    def final(self, metrics: Mapping[str, float], meta: Mapping[str, Any]
              ) -> Dict[str, Optional[float]]:
        oracle = meta.get("oracle", {}).get("auc")
        return {
            "auc": metrics.get("auc"),
            "oracle_auc": float(oracle) if oracle is not None else None,
            "logloss": metrics.get("logloss"),
            "ne": metrics.get("ne"),
            "calibration": metrics.get("calibration"),
            "eval_rows": metrics.get("eval_rows"),
        }