"""Task kinds: what the training loop needs to know about a kind of learning problem.

A registered model names its task kind (``ModelSpec.task``). The kind decides

* the task wrapper put around the model (it owns the loss and returns the pipeline's
  ``(loss, output)`` pair, ``output[0]`` being the detached loss),
* the running training metrics and how they read the pipeline's ``output``,
* evaluation over the eval split (it may use the sharded model itself, e.g. to rank every
  item of a sharded table),
* the keys of the ``final`` line.

The loop in :mod:`trainer.trainer` is the same for every kind; a new kind is a :class:`Task`
subclass named in :data:`TASKS`.
"""

from __future__ import annotations

import abc
import importlib
import itertools
from typing import Any, Callable, Dict, Mapping, Optional, Protocol, Tuple, Type

import torch
from torch import nn
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from data.batch import Batch
from data.reader import ParquetReader
from data.schema import Schema
from models.blocks import CTRTask
from sharding.dist import DistContext
from trainer.config import Config
from trainer.metrics import CTRMetrics


class RunningMetrics(Protocol):
    """Metrics fed one pipeline ``output`` per step; ``compute()`` is a collective."""

    def update(self, output: Tuple[Any, ...]) -> None: ...

    def compute(self) -> Dict[str, float]: ...


class Task(abc.ABC):
    """Base class of a task kind. Subclasses set ``name`` and implement the abstract methods."""

    name: str = ""

    def __init__(self, cfg: Config, schema: Schema) -> None:
        self.cfg = cfg
        self.schema = schema

    @abc.abstractmethod
    def wrap(self, model: nn.Module, device_type: str) -> nn.Module:
        """The task wrapper (loss owner) around the unsharded over-arch ``model``."""

    def batch_transform(self, split: str) -> Optional[Callable[[Batch], Batch]]:
        """A data-path step the reader applies to every batch of ``split`` in its background
        thread, before the model's sharded lookups see it (e.g. sampled negatives added to
        the sequence KJT); ``None`` for none. Must be a pure function of the batch so a
        resumed run rebuilds the same batches."""
        return None

    @abc.abstractmethod
    def examples(self, output: Tuple[Any, ...]) -> int:
        """Examples (rows) of this rank's batch behind ``output``."""

    @abc.abstractmethod
    def train_metrics(self, ctx: DistContext, window_examples: int) -> RunningMetrics:
        """Running metrics over a window of ``window_examples`` (all ranks)."""

    @abc.abstractmethod
    def evaluate(self, pipeline: TrainPipelineSparseDist, dmp: nn.Module,
                 reader: ParquetReader, ctx: DistContext, max_batches: int) -> Dict[str, float]:
        """Metrics over the eval split (or its first ``max_batches`` batches), all ranks.

        Called with the pipeline drained; runs it in eval mode (no backward, no step)."""

    @abc.abstractmethod
    def summary(self, metrics: Mapping[str, float]) -> str:
        """A few metrics for a log line, e.g. ``auc 0.8012 logloss 0.4410``."""

    @abc.abstractmethod
    def final(self, metrics: Mapping[str, float], meta: Mapping[str, Any]
              ) -> Dict[str, Optional[float]]:
        """The task's part of the ``final`` line (the loop adds throughput and steps)."""


class LogitsLabelsMetrics:
    """Adapts metrics with ``update(logits, labels)`` / ``compute()`` (``CTRMetrics``, the
    multi-task metrics) to a wrapper whose pipeline output is ``(loss, logits, labels)``."""

    def __init__(self, metrics: Any) -> None:
        self.metrics = metrics

    def update(self, output: Tuple[Any, ...]) -> None:
        _, logits, labels = output
        self.metrics.update(logits, labels)

    def compute(self) -> Dict[str, float]:
        return self.metrics.compute()


class LogitsLabelsTask(Task):
    """A task kind whose wrapper outputs ``(loss, logits [B, ...], labels [B, ...])`` and
    whose metrics come from :meth:`metrics` (``update(logits, labels)`` / ``compute()``)."""

    @abc.abstractmethod
    def metrics(self, ctx: DistContext, batch_size: int, window_examples: int) -> Any:
        """Metrics over ``window_examples`` (all ranks), fed ``batch_size`` rows per rank."""

    def examples(self, output: Tuple[Any, ...]) -> int:
        return int(output[1].shape[0])

    def train_metrics(self, ctx: DistContext, window_examples: int) -> RunningMetrics:
        return LogitsLabelsMetrics(self.metrics(ctx, self.cfg.data.batch_size,
                                                window_examples))

    def evaluate(self, pipeline: TrainPipelineSparseDist, dmp: nn.Module,
                 reader: ParquetReader, ctx: DistContext, max_batches: int) -> Dict[str, float]:
        n = eval_batches(reader, max_batches)
        running = LogitsLabelsMetrics(self.metrics(ctx, reader.batch_size,
                                                   n * reader.batch_size * ctx.world_size))
        run_eval(pipeline, dmp, reader, n, running)
        return running.compute()


class CTRTaskKind(LogitsLabelsTask):
    """Binary click prediction: BCE loss, AUC / NE / log-loss metrics, ``oracle_auc``."""

    name = "ctr"

    def wrap(self, model: nn.Module, device_type: str) -> nn.Module:
        return CTRTask(model, self.cfg.training.dense_dtype, device_type)

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
        }


def eval_batches(reader: ParquetReader, max_batches: int) -> int:
    """Batches one evaluation reads: the whole split, or at most ``max_batches`` (> 0)."""
    return len(reader) if max_batches <= 0 else min(max_batches, len(reader))


def run_eval(pipeline: TrainPipelineSparseDist, dmp: nn.Module, reader: ParquetReader,
             n: int, metrics: RunningMetrics) -> None:
    """Feed the first ``n`` batches of ``reader`` through the pipeline in eval mode into
    ``metrics``. Every rank reads the same ``n`` (the reader splits rows evenly), so the
    pipeline's collectives stay matched."""
    dmp.eval()
    it = itertools.islice(iter(reader), n)
    try:
        with torch.no_grad():
            while True:
                try:
                    output = pipeline.progress(it)
                except StopIteration:
                    break
                metrics.update(output)
    finally:
        dmp.train()


# kind → "module:Class"; imported on use, so a CTR run does not load the ranking code.
TASKS: Dict[str, str] = {
    "ctr": "trainer.tasks:CTRTaskKind",
    "multitask": "trainer.multitask:MultiTaskKind",
    "retrieval": "trainer.retrieval:RetrievalTaskKind",
    "sequential": "trainer.sequential:SequentialTaskKind",
}


def get_task(kind: str, cfg: Config, schema: Schema) -> Task:
    """The task kind ``kind`` (a model spec's ``task``) for this run."""
    if kind not in TASKS:
        raise KeyError(f"unknown task kind {kind!r}; known kinds: {', '.join(sorted(TASKS))}")
    module, cls_name = TASKS[kind].split(":")
    cls: Type[Task] = getattr(importlib.import_module(module), cls_name)
    return cls(cfg, schema)
