"""Task kinds: what the training loop needs to know about a kind of learning problem.

A registered model names its task kind (``ModelSpec.task``). The kind decides

* the task wrapper put around the model (it owns the loss and returns the pipeline's
  ``(loss, output)`` pair, ``output[0]`` being the detached loss),
* the running training metrics and how they read the pipeline's ``output``,
* evaluation over the eval split (it may use the sharded model itself, e.g. to rank every
  item of a sharded table),
* the keys of the ``final`` line.

The loop in :mod:`trainer.trainer` is the same for every kind; a new kind is a :class:`TaskKind`
subclass named in :data:`TASK_KINDS`.
"""

from __future__ import annotations

import abc
import importlib
import itertools
from typing import Any, Callable, Dict, Mapping, Optional, Protocol, Tuple, Type

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from data.batch import Batch
from data.reader import ParquetReader
from data.schema import Schema
from models import get_model_spec
from models.spec import ModelSpec
from sharding.dist import DistContext
from trainer.config import Config
from trainer.progress import eval_progress


class RunningMetrics(Protocol):
    """Metrics fed one pipeline ``output`` per step; ``compute()`` is a collective."""

    def update(self, output: Tuple[Any, ...], mask: Optional[torch.Tensor] = None) -> None:
        """``mask`` (bool ``[B]``, evaluation only): the batch's real rows; the rest pad the
        last batches (``remainder="pad"``) and must not count."""

    def compute(self) -> Dict[str, float]: ...


class TaskKind(abc.ABC):
    """Base class of a task kind. Subclasses set ``name`` and implement the abstract methods.

    The model is resolved here once — its spec (``self.spec``) and its arguments (flavour +
    ``[model.args]``, ``self.args``) — and :func:`trainer.trainer.build_model` builds it from
    these; a kind never looks the model up or builds it again."""

    name: str = ""

    def __init__(self, cfg: Config, schema: Schema) -> None:
        self.cfg = cfg
        self.schema = schema
        self.spec: ModelSpec = get_model_spec(cfg.model.name)
        self.args: Any = self.spec.make_args(cfg.model.flavour, cfg.model.args)

    def build(self, device_type: str) -> nn.Module:
        """The unsharded model (embedding collections on the meta device) in this kind's
        task wrapper."""
        return self.wrap(self.spec.build(self.schema, self.args, "meta"), device_type)

    def table_schema(self) -> Schema:
        """The schema whose tables the built model has, for the per-table settings and the
        sharding plan: the dataset's (a kind whose model adds tables extends it)."""
        return self.schema

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

    def update(self, output: Tuple[Any, ...], mask: Optional[torch.Tensor] = None) -> None:
        _, logits, labels = output
        self.metrics.update(logits, labels, mask)

    def compute(self) -> Dict[str, float]:
        return self.metrics.compute()


class LogitsLabelsKind(TaskKind):
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
        rows = run_eval(pipeline, dmp, reader, n, running)
        return {**running.compute(), "eval_rows": float(rows)}


def eval_batches(reader: ParquetReader, max_batches: int) -> int:
    """Batches one evaluation reads: the whole split, or at most ``max_batches`` (> 0)."""
    return len(reader) if max_batches <= 0 else min(max_batches, len(reader))


def run_eval(pipeline: TrainPipelineSparseDist, dmp: nn.Module, reader: ParquetReader,
             n: int, metrics: RunningMetrics) -> int:
    """Feed the first ``n`` batches of ``reader`` through the pipeline in eval mode into
    ``metrics``; returns the rows evaluated (all ranks), each counted once.

    Every rank reads the same ``n`` batches (a ``remainder="pad"`` reader yields
    ``max_r ⌈rows_r / B⌉``), so the pipeline's collectives stay matched. Rank ``r``'s
    batch ``k`` holds its rows ``k·B ..``; positions past ``rows_r`` are wrap-around padding,
    and ``metrics`` gets the mask of the real ones."""
    dmp.eval()
    # Logs progress on rank 0 when the split takes long (trainer.progress.EVAL_PROGRESS_S).
    it = eval_progress(itertools.islice(iter(reader), n), n)
    b = reader.batch_size
    rank_rows = int(reader.plan().window_starts[-1])
    if reader.remainder == "drop":
        rank_rows = min(rank_rows, len(reader) * b)  # drop mode never yields the tail
    k, counted = 0, 0
    try:
        with torch.no_grad():
            while True:
                try:
                    output = pipeline.progress(it)
                except StopIteration:
                    break
                real = max(0, min(b, rank_rows - k * b))
                mask = torch.arange(b, device=output[0].device) < real
                metrics.update(output, mask)
                counted += real
                k += 1
    finally:
        dmp.train()
    total = torch.tensor([counted], dtype=torch.int64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        # gloo reduces CPU tensors; on nccl the count rides on the model's device.
        total = total.to(output_device(dmp))
        dist.all_reduce(total)
    return int(total.item())


def output_device(dmp: nn.Module) -> torch.device:
    """The device a collective of this run must use (the dense parameters' device)."""
    for p in dmp.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


# kind → "module:Class"; imported on use, so a CTR run does not load the ranking code.
TASK_KINDS: Dict[str, str] = {
    "ctr": "trainer.tasks.ctr:CTRKind",
    "multitask": "trainer.tasks.multitask:MultiTaskKind",
    "retrieval": "trainer.tasks.retrieval:RetrievalKind",
    "sequential": "trainer.tasks.sequential:SequentialKind",
}


def get_task_kind(kind: str, cfg: Config, schema: Schema) -> TaskKind:
    """The task kind ``kind`` (a model spec's ``task``) for this run."""
    if kind not in TASK_KINDS:
        raise KeyError(f"unknown task kind {kind!r}; known kinds: {', '.join(sorted(TASK_KINDS))}")
    module, cls_name = TASK_KINDS[kind].split(":")
    cls: Type[TaskKind] = getattr(importlib.import_module(module), cls_name)
    return cls(cfg, schema)
