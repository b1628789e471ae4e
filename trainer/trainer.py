"""The training loop: build the pieces, then drive ``TrainPipelineSparseDist``.

Every rank runs this same code (SPMD). The model is built unsharded on the meta device,
the fused sparse optimizer is attached to its tables, ``sharding.shard_model`` plans and wraps
it in ``DistributedModelParallel``, and the pipeline overlaps batch copy and the sparse
input all-to-all with forward/backward. Evaluation runs on the same pipeline in eval mode
once the training batches in flight have drained.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.keyed import CombinedOptimizer

from data.batch import Batch
from data.lengths import train_reader_options
from data.reader import ParquetReader
from data.schema import Schema, load_meta, load_schema
from models import get_model_spec
from sharding.dist import DistContext, destroy_distributed, init_distributed
from sharding.constraints import resolve_table_settings
from sharding.parallel import shard_model_from_config
from sharding.table_optimizers import apply_table_optimizers
from trainer.checkpoint import (
    Checkpointer,
    check_resume,
    data_fingerprint,
    model_changes,
    set_rng_state,
)
from trainer.config import Config, save_config, sparse_optimizer_defaults
from trainer.metrics import format_final
from trainer.optim import build_optimizer
from trainer.preempt import FaultInjection, SegmentStops, StepGuard, StopSignals
from trainer.progress import TrainLogger
from trainer.runlock import lock_run_dir
from trainer.selection import (EarlyStopping, ValidEvaluations, drop_stale_best, find_best,
                               resolve_splits)
from trainer.tasks import TaskKind, get_task_kind
from trainer.tboard import RunRecords
from trainer.validation import check_against_data, check_model

logger = logging.getLogger(__name__)



def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_task(cfg: Config, schema: Schema) -> TaskKind:
    """The task kind of ``model.name`` (its loss, metrics, evaluation, final line), with the
    model's spec and arguments resolved once."""
    return get_task_kind(get_model_spec(cfg.model.name).task, cfg, schema)


def checked_task(cfg: Config, schema: Schema) -> TaskKind:
    """:func:`model_task`, after checking the config against the model's tables (raises
    ``ConfigError``): the dataset's plus any the model adds (the retrieval kind's item
    feature tables), so ``[sharding.tables.item_category]`` is a valid entry."""
    task = model_task(cfg, schema)
    check_against_data(cfg, task.table_schema(), cfg.data.schema or cfg.data.path)
    return task


def build_model(cfg: Config, schema: Schema, device_type: str = "cpu",
                task: Optional[TaskKind] = None) -> nn.Module:
    """The unsharded model in its task wrapper, embedding collections on the meta device
    (built by ``task`` when the caller has one, so the model is built once)."""
    return (task or model_task(cfg, schema)).build(device_type)


def shard_and_optimize(cfg: Config, ctx: DistContext, schema: Schema, model: nn.Module
                       ) -> Tuple[DistributedModelParallel, CombinedOptimizer]:
    """Attach each table's fused optimizer (``[training] sparse_*``, or
    ``[sharding.tables.NAME]`` where a table sets its own), plan and wrap ``model`` in DMP,
    and build the combined sparse + dense optimizer. Benchmarks use this too, so every
    contender is sharded and optimised exactly as the trainer does it."""
    tables = resolve_table_settings(schema, cfg.sharding, sparse_optimizer_defaults(cfg.training))
    apply_table_optimizers(model, tables)
    dmp, _ = shard_model_from_config(model, ctx, cfg.sharding, tables, cfg.data.batch_size)
    return dmp, build_optimizer(cfg, dmp, tables)


def build_readers(cfg: Config, ctx: DistContext, schema: Schema, task: TaskKind
                  ) -> Tuple[ParquetReader, ParquetReader, ParquetReader]:
    """This rank's train, valid and test readers, each with the task kind's data-path step
    (valid is the test reader when the dataset has no valid split, see
    :mod:`trainer.selection`). Evaluation readers pad the last batches so that every row
    counts exactly once (the padding is masked out of the metrics)."""
    d = cfg.data
    common = dict(rank=ctx.rank, world_size=ctx.world_size, prefetch=d.prefetch, schema=schema,
                  validate=d.validate)
    # A task kind may rewrite batches in the reader thread before the model's sharded lookups
    # see them (the sequential kind adds sampled negatives and splits off eval targets).
    train = ParquetReader(d.path, d.train_split, d.batch_size, shuffle=d.shuffle,
                          seed=cfg.training.seed, remainder=d.remainder,
                          shuffle_buffer_rows=d.shuffle_buffer_rows,
                          transform=task.batch_transform("train"),
                          **train_reader_options(d), **common)  # type: ignore[arg-type]
    valid_split, test_split = resolve_splits(d.path, d.valid_split, d.eval_split)

    def evaluation(split: str) -> ParquetReader:
        return ParquetReader(d.path, split, d.eval_batch_size or d.batch_size, shuffle=False,
                             remainder="pad", transform=task.batch_transform("eval"),
                             **common)  # type: ignore[arg-type]

    test = evaluation(test_split)
    if d.validate:  # labels of every split before any training (an eval label fails now)
        train.validate_labels()
        test.validate_labels()
    if valid_split is None:
        if ctx.is_main:
            logger.info("%s has no valid split (an older train/eval dataset): periodic "
                        "evaluations use %s/, no early stopping or best-checkpoint selection",
                        d.path, test_split)
        return train, test, test
    valid = evaluation(valid_split)
    if d.validate:
        valid.validate_labels()
    return train, valid, test


class BatchStream:
    """Training batches across epochs, counting what it hands out, and stoppable.

    The pipeline pulls batches ahead of the step it trains; a segment of training ends by
    setting ``stop_at`` (a count of batches handed out): the stream then raises
    ``StopIteration``, the pipeline drains its in-flight batches, and exactly ``stop_at``
    steps are done. That is where evaluations and checkpoints happen, so the saved reader
    position is exact.
    """

    def __init__(self, reader: ParquetReader, handed: int = 0,
                 record_path: Optional[str] = None) -> None:
        self.reader = reader
        self.handed = handed
        self.stop_at = handed
        self.epoch = reader.epoch
        self.pos = reader.state_dict()["batch"]  # batches of ``epoch`` already consumed
        self._it: Optional[Iterator[Batch]] = None
        self._record = open(record_path, "a") if record_path else None

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> Batch:
        if self.handed >= self.stop_at:
            raise StopIteration
        while True:
            if self._it is None:
                self.reader.set_epoch(self.epoch)
                self._it = iter(self.reader)
            try:
                batch = next(self._it)
                break
            except StopIteration:
                self._it = None
                self.epoch += 1
                self.pos = 0
        self.handed += 1
        self.pos += 1
        if self._record is not None and batch.sample_ids is not None:
            self._record.write(f"{self.handed} " + ",".join(map(str, batch.sample_ids.tolist()))
                               + "\n")
            self._record.flush()
        return batch

    def segment(self) -> Iterator[Batch]:
        """A fresh iterator up to ``stop_at``: torchrec's pipeline remembers an exhausted
        iterator object, so every segment needs a new one."""
        while True:
            try:
                yield next(self)
            except StopIteration:
                return

    def reader_state(self) -> Dict[str, Any]:
        """The reader position after the batches handed out so far (exact once drained)."""
        state = self.reader.state_dict()
        state.update(epoch=self.epoch, batch=self.pos)
        return state


def total_steps(cfg: Config, train_reader: ParquetReader) -> int:
    if cfg.training.steps > 0:
        return cfg.training.steps
    return max(1, int(math.ceil(cfg.training.epochs * len(train_reader))))


@dataclass
class TrainState:
    step: int = 0
    examples: int = 0  # all ranks
    train_seconds: float = 0.0


def train(cfg: Config) -> Dict[str, Any]:
    """Run training per ``cfg``; returns the final metrics (printed as the ``final`` line).

    Process group: ``train()`` joins the default group if the caller already initialised
    one, and creates it from the launcher's environment otherwise. It destroys the group at
    its end only if it created it: a process launched for one run (``python -m trainer``,
    under ``torchrun`` or not) ends with no group left, while a caller that owns the group
    (a test or a driver running several trainings on the same ranks, e.g.
    ``launch.spawn.run_ranks``) keeps it for its next ``train()`` and tears it down itself.
    """
    t = cfg.training
    check_model(cfg)  # [model] against the registry, before any work (no-op once checked)
    owns_group = not dist.is_initialized()
    ctx = init_distributed(cfg.dist.backend, cfg.dist.device, cfg.dist.cpu_threads or None,
                           cfg.dist.timeout_s)
    metrics_file: Optional[RunRecords] = None
    signals = StopSignals().install()
    lock = None
    try:
        lock = lock_run_dir(t.run_dir, ctx.rank)  # before anything is written into it
        if ctx.is_main:
            save_config(cfg, t.run_dir)
            _log_to_file(os.path.join(t.run_dir, "train.log"))
        seed_everything(t.seed)
        schema = load_schema(cfg.data.schema or cfg.data.path)
        task = checked_task(cfg, schema)
        meta = load_meta(cfg.data.path)
        train_reader, valid_reader, test_reader = build_readers(cfg, ctx, schema, task)
        dmp, optimizer = shard_and_optimize(cfg, ctx, task.table_schema(),
                                            build_model(cfg, schema, ctx.device.type, task))
        checkpointer = Checkpointer(cfg.checkpoint.dir or os.path.join(t.run_dir, "checkpoints"),
                                    ctx.rank, ctx.world_size, cfg.checkpoint.keep_last,
                                    cfg.checkpoint.every_steps, cfg.checkpoint.save_at_end)
        c = cfg.checkpoint
        if c.every_steps > 0 or c.every_minutes > 0 or c.save_at_end or c.keep_best:
            checkpointer.ensure_writable()
        checkpointer.data = data_fingerprint(cfg)
        steps = total_steps(cfg, train_reader)
        stopper = build_early_stopping(cfg, ctx, valid_reader is not test_reader,
                                       len(train_reader))
        start_step = resume(cfg, ctx, checkpointer, dmp, optimizer, train_reader, steps, stopper)
        pipeline = TrainPipelineSparseDist(dmp, optimizer, ctx.device)
        if stopper is not None and stopper.exhausted():
            steps = min(steps, start_step)  # a resumed run that had already stopped early
        # A resumed run redoes the steps after its checkpoint: their records (and TensorBoard
        # events) from the interrupted run are dropped so each step is recorded once.
        metrics_file = RunRecords(t.run_dir, ctx.is_main, cfg.log.tensorboard,
                                  resumed_at=start_step)
        if ctx.is_main:
            logger.info("training %s on %s: %d steps x %d examples x %d ranks (%d train "
                        "batches per rank per epoch)%s", cfg.model.name, cfg.data.path, steps,
                        cfg.data.batch_size, ctx.world_size, len(train_reader),
                        f", resuming at step {start_step}" if start_step else "")
        state = run_training(cfg, ctx, task, pipeline, dmp, optimizer, train_reader,
                             valid_reader, steps, metrics_file, checkpointer, start_step,
                             StepGuard(signals, ctx.rank, ctx.world_size, ctx.device), stopper)
        selected = load_best(cfg, ctx, checkpointer, dmp, optimizer, stopper)
        final_eval = task.evaluate(pipeline, dmp, test_reader, ctx, t.eval_batches)
        final = {
            **task.final(final_eval, meta),
            "examples_per_s": round(state.examples / max(state.train_seconds, 1e-9), 1),
            "steps": state.step,
            **selected,
        }
        metrics_file.write({"split": "final", **final})
        metrics_file.close()
        overhead = metrics_file.overhead(state.train_seconds)
        if ctx.is_main and overhead is not None:
            logger.info("tensorboard: %.3fs of %.1fs training (%.2f%%)",
                        metrics_file.tb.seconds, state.train_seconds, 100 * overhead)
        if ctx.is_main:
            print(format_final(final), flush=True)
        return final
    finally:
        if metrics_file is not None:
            metrics_file.close()  # flushes TensorBoard's queue, also when training failed
        signals.restore()
        if lock is not None:
            lock.release()
        if owns_group:
            destroy_distributed()


def build_early_stopping(cfg: Config, ctx: DistContext, has_valid: bool,
                         batches_per_epoch: int) -> Optional[EarlyStopping]:
    """The valid-split tracker of ``training.early_stop_metric`` (None when off, or when the
    dataset has no valid split). Evaluates once per epoch when ``eval_every`` is 0."""
    t = cfg.training
    if not t.early_stop_metric:
        return None
    if not has_valid:
        if ctx.is_main:
            logger.warning("training.early_stop_metric=%s ignored: %s has no valid split "
                           "(reconvert it to get train/valid/test)", t.early_stop_metric,
                           cfg.data.path)
        return None
    if t.eval_every <= 0:
        t.eval_every = max(1, batches_per_epoch)
        if ctx.is_main:
            logger.info("early stopping on %s: evaluating the valid split every epoch (%d "
                        "steps; set training.eval_every to change)", t.early_stop_metric,
                        t.eval_every)
    return EarlyStopping(t.early_stop_metric, t.early_stop_patience)


def load_best(cfg: Config, ctx: DistContext, checkpointer: Checkpointer,
              dmp: DistributedModelParallel, optimizer: CombinedOptimizer,
              stopper: Optional[EarlyStopping]) -> Dict[str, Any]:
    """Load the best-on-valid checkpoint for the final evaluation (with keep_best); returns
    what the final line says about the selection."""
    if stopper is None or stopper.best is None:
        return {}
    out: Dict[str, Any] = {"best_step": stopper.best_step,
                           f"valid_{stopper.metric}": stopper.best}
    best = find_best(checkpointer.root) if cfg.checkpoint.keep_best else None
    if best is not None:
        checkpointer.load(best, dmp, optimizer, dmp.plan, reset_optimizer=True)
        if ctx.is_main:
            logger.info("final evaluation with the best-on-valid checkpoint %s (%s %.6g)",
                        best, stopper.metric, stopper.best)
    return out


def resume(cfg: Config, ctx: DistContext, checkpointer: Checkpointer,
           dmp: DistributedModelParallel, optimizer: CombinedOptimizer,
           train_reader: ParquetReader, steps: int,
           stopper: Optional[EarlyStopping] = None) -> int:
    """Load ``checkpoint.resume_from`` or the newest complete checkpoint that verifies;
    returns its step (0 when starting fresh). Restores weights, optimizer state, RNG, reader
    position and the early-stopping tracker. Refuses a run dir already past ``steps`` or
    trained on other data."""
    c = cfg.checkpoint
    path = c.resume_from or (checkpointer.latest_verified() if c.resume else None)
    if not path:
        return 0
    for warning in check_resume(path, checkpointer.data or {}, steps, bool(c.resume_from)):
        if ctx.is_main:
            logger.warning("%s", warning)
    changed = model_changes(path, cfg)
    if changed and ctx.is_main:
        logger.warning("resuming from %s, which was trained with other [model] settings (%s); "
                       "to train this model from scratch use a new --training.run_dir or "
                       "--checkpoint.resume=false", path, "; ".join(changed))
    extra = checkpointer.load(path, dmp, optimizer, dmp.plan, c.reset_optimizer)
    step = int(extra["step"])
    if extra.get("resharded"):
        # Another world size deals rows differently: continue at the same epoch fraction.
        epoch, batch = divmod(step, max(1, len(train_reader)))
        train_reader.load_state_dict({"epoch": epoch, "batch": batch})
    else:
        set_rng_state(extra["rng"])
        train_reader.load_state_dict(extra["reader"])
    if stopper is not None and "early_stop" in extra:
        stopper.load_state_dict(extra["early_stop"])
        if ctx.is_main:
            drop_stale_best(checkpointer.root, stopper.best_step)
    if ctx.is_main:
        logger.info("resumed from %s (step %d)", path, step)
    return step


def next_multiple(step: int, every: int, steps: int) -> int:
    """The first multiple of ``every`` after ``step`` (``steps`` when ``every`` is 0: off)."""
    return (step // every + 1) * every if every > 0 else steps


class RunSaver:
    """Writes the run's regular checkpoints: weights, optimizer state, the reader position
    (exact: the loop saves only between segments) and the early-stopping tracker."""

    def __init__(self, cfg: Config, ctx: DistContext, dmp: DistributedModelParallel,
                 optimizer: CombinedOptimizer, checkpointer: Checkpointer, stream: BatchStream,
                 stopper: Optional[EarlyStopping], faults: FaultInjection) -> None:
        self.cfg, self.ctx, self.dmp, self.optimizer = cfg, ctx, dmp, optimizer
        self.checkpointer, self.stream, self.stopper = checkpointer, stream, stopper
        self.faults = faults

    def save(self, step: int) -> str:
        extra: Dict[str, Any] = {"reader": self.stream.reader_state()}
        if self.stopper is not None:
            extra["early_stop"] = self.stopper.state_dict()
        path = self.checkpointer.save(step, self.dmp, self.optimizer, extra, self.cfg,
                                      self.dmp.plan,
                                      before_commit=lambda: self.faults.at("save", step))
        if self.ctx.is_main:
            logger.info("checkpoint %s", path)
        return path


def run_training(cfg: Config, ctx: DistContext, task: TaskKind, pipeline: TrainPipelineSparseDist,
                 dmp: DistributedModelParallel, optimizer: CombinedOptimizer,
                 train_reader: ParquetReader, eval_reader: ParquetReader, steps: int,
                 metrics_file: RunRecords, checkpointer: Checkpointer,
                 start_step: int = 0, guard: Optional[StepGuard] = None,
                 stopper: Optional[EarlyStopping] = None) -> TrainState:
    """Train from ``start_step`` to ``steps`` in segments that end at each periodic
    evaluation and checkpoint (see :class:`BatchStream`). ``guard`` stops the run on a
    non-finite loss (before any further save) and on SIGTERM/SIGUSR1 (after a save); the
    run also stops early when ``stopper`` runs out of patience."""
    t, c = cfg.training, cfg.checkpoint
    state = TrainState(step=start_step)
    window = cfg.metrics.window_batches * cfg.data.batch_size * ctx.world_size
    log = TrainLogger(task, task.train_metrics(ctx, window), metrics_file, optimizer, steps,
                      t.log_every, len(train_reader), start_step, ctx.is_main, ctx.device)
    record = (os.path.join(t.run_dir, f"sample_ids.rank{ctx.rank}.txt")
              if cfg.metrics.record_sample_ids else None)
    stream = BatchStream(train_reader, handed=start_step, record_path=record)
    faults = FaultInjection(t.fail_at, t.fail_rank, ctx.rank, resumed=start_step > 0)
    stops = SegmentStops(guard, c.every_minutes, ctx.device)
    saver = RunSaver(cfg, ctx, dmp, optimizer, checkpointer, stream, stopper, faults)
    evals = ValidEvaluations(cfg, ctx, task, pipeline, dmp, optimizer, eval_reader,
                             metrics_file, checkpointer, stopper)

    dmp.train()
    while state.step < steps:
        stream.stop_at = min(steps, next_multiple(state.step, t.eval_every, steps),
                             next_multiple(state.step, c.every_steps, steps))
        seg_start, seg_examples = time.perf_counter(), 0
        log.restart_window()
        stops.start_segment()
        batches = stream.segment()
        while True:
            try:
                output = pipeline.progress(batches)
            except StopIteration:
                break
            state.step += 1
            faults.at("step", state.step)
            faults.at("sigterm", state.step)
            if stops.after_step(output[0], state.step, checkpointer.last_good):
                stream.stop_at = stream.handed  # end the segment: drain, save, then stop
            examples = task.examples(output) * ctx.world_size
            seg_examples += examples
            if log.step(state.step, output, examples) and stops.at_log_line():
                stream.stop_at = stream.handed  # end the segment: drain, then save
        state.train_seconds += time.perf_counter() - seg_start
        state.examples += seg_examples
        done = state.step >= steps
        if stops.preempted and not done:
            saver.save(state.step)
            raise stops.preemption(state.step, checkpointer.last_good)
        # Evaluate before saving, so a checkpoint holds the tracker state after this step's
        # evaluation (a resumed run does not repeat it).
        if evals.due(state.step, done) and evals.run(state.step):
            done, steps = True, state.step  # early stop
        if stops.timed_save or checkpointer.should_save(state.step, done):
            saver.save(state.step)
            stops.saved()
    return state


def _log_to_file(path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
