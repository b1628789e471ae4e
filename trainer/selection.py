"""Which splits a run evaluates on, and model selection on the valid split.

Splits: datasets have ``train/``, ``valid/`` and ``test/`` (``train/``, ``eval/``, ``test/``
from the criteo converter: ``eval`` validates). Periodic evaluations (every
``training.eval_every`` steps) run on ``valid``; the final line reports ``test``. Older
datasets with ``train/`` and ``eval/`` are read as train + test: periodic evaluations then
run on the test split and there is no model selection (a log line says so).

Early stopping (``training.early_stop_metric``): after every valid evaluation the metric is
compared with the best so far (higher is better, except for ``ne``, ``logloss``, ``mse``
and ``loss`` metrics); with ``checkpoint.keep_best`` an improvement saves the model as
``<checkpoint dir>/best/step_<N>/`` (a checkpoint of its own, outside the rotation of
``keep_last``); after ``training.early_stop_patience`` evaluations without improvement
training stops. The final test evaluation and ``trainer.export`` use the best checkpoint.
The tracker's state travels in every regular checkpoint, so a resumed run continues with
the same best-so-far value and patience count. :class:`ValidEvaluations` is the training
loop's side of all this: when to evaluate, and what follows an evaluation.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Tuple

import torch
import torch.distributed as dist

from trainer.checkpoint import MARKER, Checkpointer, find_latest, list_complete

if TYPE_CHECKING:  # types only: the loop's parts, built by trainer.trainer
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
    from torchrec.optim.keyed import CombinedOptimizer

    from data.reader import ParquetReader
    from sharding.dist import DistContext
    from trainer.config import Config
    from trainer.tasks import TaskKind
    from trainer.tboard import RunRecords

logger = logging.getLogger(__name__)

BEST_DIR = "best"
LOWER_IS_BETTER = ("ne", "logloss", "mse", "loss")


def resolve_splits(dataset_dir: str, valid_split: str = "", eval_split: str = ""
                   ) -> Tuple[Optional[str], str]:
    """(split of the periodic evaluations or ``None`` when the dataset has no valid split,
    split of the final evaluation). Empty names pick ``valid`` / ``test`` (``eval`` in older
    datasets)."""
    def exists(name: str) -> bool:
        return os.path.isdir(os.path.join(dataset_dir, name))

    test = eval_split or ("test" if exists("test") or not exists("eval") else "eval")
    valid = valid_split or ("valid" if exists("valid") else None)
    if valid is None and test == "test" and exists("eval"):
        valid = "eval"  # train/eval/test (the criteo converter's ratios): eval validates
    return valid, test


def higher_is_better(metric: str) -> bool:
    """``auc``, ``hr@10``, ``ndcg@10``, ``mrr``... go up; ``ne``/``logloss``/``mse``
    (also per prediction, e.g. ``ne_click``) go down."""
    head = metric.split("_", 1)[0] if not metric.startswith("sampled_") else metric
    return head not in LOWER_IS_BETTER


class EarlyStopping:
    """Best value of ``metric`` on the valid split, the step it was reached, and the
    evaluations since (``patience`` 0: never stop)."""

    def __init__(self, metric: str, patience: int) -> None:
        self.metric = metric
        self.patience = patience
        self.higher = higher_is_better(metric)
        self.best: Optional[float] = None
        self.best_step = -1
        self.bad = 0

    def update(self, step: int, metrics: Mapping[str, float]) -> Tuple[bool, bool]:
        """(improved, stop) after an evaluation at ``step``; a collective when a process
        group is up: rank 0's value decides (torchrec's metrics report on rank 0 only), so
        every rank saves and stops at the same step."""
        value = metrics.get(self.metric, math.nan)
        missing = self.metric not in metrics
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([float(value), float(missing)], dtype=torch.float64)
            t = t.to(_device())
            dist.broadcast(t, src=0)
            value, missing = float(t[0]), bool(t[1] > 0)
        if missing:
            known = sorted(k for k in metrics if k not in ("examples", "eval_rows"))
            raise ValueError(f"training.early_stop_metric: {self.metric!r} is not a metric of "
                             f"this model's evaluation"
                             + (f"; choose one of {known}" if self.metric not in known
                                and known else ""))
        value = float(value)
        improved = math.isfinite(value) and (
            self.best is None or (value > self.best if self.higher else value < self.best))
        if improved:
            self.best, self.best_step, self.bad = value, step, 0
        else:
            self.bad += 1
        return improved, self.exhausted()

    def exhausted(self) -> bool:
        """Patience ran out (training stopped early)."""
        return self.patience > 0 and self.bad >= self.patience

    def state_dict(self) -> Dict[str, Any]:
        return {"metric": self.metric, "best": self.best, "best_step": self.best_step,
                "bad": self.bad}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("metric") != self.metric:
            logger.warning("the resumed checkpoint tracked early_stop_metric %r, this run %r: "
                           "the best-so-far starts over", state.get("metric"), self.metric)
            return
        self.best = None if state.get("best") is None else float(state["best"])
        self.best_step = int(state.get("best_step", -1))
        self.bad = int(state.get("bad", 0))


class ValidEvaluations:
    """The periodic evaluations of a training run and the model selection that follows them.

    Every ``training.eval_every`` steps the task kind evaluates ``reader`` (the valid split;
    the test split in older datasets), and the metrics go to the run records. With a
    ``stopper`` the last model is evaluated too (it is a candidate), each evaluation updates
    the tracker, an improvement saves ``<checkpoint dir>/best`` (``checkpoint.keep_best``),
    and running out of patience ends training.
    """

    def __init__(self, cfg: Config, ctx: DistContext, task: TaskKind,
                 pipeline: TrainPipelineSparseDist, dmp: DistributedModelParallel,
                 optimizer: CombinedOptimizer, reader: ParquetReader, records: RunRecords,
                 checkpointer: Checkpointer, stopper: Optional[EarlyStopping]) -> None:
        self.cfg, self.ctx, self.task = cfg, ctx, task
        self.pipeline, self.dmp, self.optimizer = pipeline, dmp, optimizer
        self.reader, self.records = reader, records
        self.checkpointer, self.stopper = checkpointer, stopper
        self.every = cfg.training.eval_every

    def due(self, step: int, done: bool) -> bool:
        """Whether to evaluate after ``step`` (``done``: training ends there)."""
        periodic = self.every > 0 and step % self.every == 0
        return (periodic and not done) or (done and self.stopper is not None)

    def run(self, step: int) -> bool:
        """Evaluate after ``step``, record, and update the selection; True when early
        stopping ends training at this step (the same on every rank)."""
        m = self.task.evaluate(self.pipeline, self.dmp, self.reader, self.ctx,
                               self.cfg.training.eval_batches)
        split, is_main = self.reader.split, self.ctx.is_main
        if is_main:
            logger.info("%s step %d %s", split, step, self.task.summary(m))
        self.records.write({"split": split, "step": step, **m})
        if self.stopper is None:
            return False
        improved, stop = self.stopper.update(step, m)
        if improved and self.cfg.checkpoint.keep_best:
            best = best_checkpointer(self.checkpointer).save(step, self.dmp, self.optimizer,
                                                             {}, self.cfg, self.dmp.plan)
            if is_main:
                logger.info("best %s %.6g at step %d: %s", self.stopper.metric,
                            self.stopper.best, step, best)
        if stop and is_main:
            logger.info("early stop at step %d: %s has not improved for %d evaluations (best "
                        "%.6g at step %d)", step, self.stopper.metric, self.stopper.bad,
                        self.stopper.best, self.stopper.best_step)
        return stop


def best_checkpointer(checkpointer: Checkpointer) -> Checkpointer:
    """The checkpointer of ``<dir>/best``: one complete checkpoint, outside the rotation."""
    return Checkpointer(best_root(checkpointer.root), checkpointer.rank,
                        checkpointer.world_size, keep_last=1)


def _device() -> torch.device:
    """Where a collective's tensor lives: the current CUDA device under nccl, else CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def best_root(checkpoint_root: str) -> str:
    return os.path.join(checkpoint_root, BEST_DIR)


def find_best(checkpoint_root: str) -> Optional[str]:
    """The complete best-on-valid checkpoint under ``checkpoint_root``, if any."""
    return find_latest(best_root(checkpoint_root))


def drop_stale_best(checkpoint_root: str, best_step: int) -> None:
    """After a resume: remove a best checkpoint the resumed state does not know (written
    after the checkpoint the run resumed from, on a timeline that was lost)."""
    for step, path in list_complete(best_root(checkpoint_root)):
        if step != best_step:
            logger.info("removing %s: saved after the checkpoint this run resumed from", path)
            shutil.rmtree(path, ignore_errors=True)


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory from what a user may pass: a ``step_*`` checkpoint itself, or
    a checkpoint root / run directory — then its best-on-valid checkpoint if it has one,
    else its newest complete one."""
    if os.path.exists(os.path.join(path, MARKER)):
        return path
    for root in (path, os.path.join(path, "checkpoints")):
        found = find_best(root) or find_latest(root)
        if found:
            return found
    raise FileNotFoundError(f"{path}: not a complete checkpoint (no {MARKER} marker), and no "
                            f"complete checkpoint under it "
                            f"(nor under {os.path.join(path, 'checkpoints')})")
