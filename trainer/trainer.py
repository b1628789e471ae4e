"""The training loop: build the pieces, then drive ``TrainPipelineSparseDist``.

Every rank runs this same code (SPMD). The model is built unsharded on the meta device,
the fused sparse optimizer is attached to its tables, ``sharding.shard_model`` plans and wraps
it in ``DistributedModelParallel``, and the pipeline overlaps batch copy and the sparse
input all-to-all with forward/backward. Evaluation runs on the same pipeline in eval mode
once the training batches in flight have drained.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from data.batch import Batch
from data.reader import ParquetReader
from data.schema import Schema, load_meta, load_schema
from models import get_model_spec
from models.blocks import CTRTask
from sharding.dist import DistContext, destroy_distributed, init_distributed
from sharding.constraints import (
    TableSettings,
    apply_table_optimizers,
    data_parallel_table_optimizers,
    resolve_table_settings,
)
from sharding.parallel import shard_model_from_config
from trainer.config import Config, save_config
from trainer.metrics import CTRMetrics, MetricsFile, format_final

logger = logging.getLogger(__name__)

DENSE_OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(cfg: Config, schema: Schema, device_type: str = "cpu") -> nn.Module:
    """The unsharded task model, its embedding collections on the meta device."""
    spec = get_model_spec(cfg.model.name)
    args = spec.make_args(cfg.model.flavour, cfg.model.args)
    return CTRTask(spec.build(schema, args, "meta"), cfg.training.dense_dtype, device_type)


def shard_and_optimize(cfg: Config, ctx: DistContext, schema: Schema, model: nn.Module
                       ) -> Tuple[DistributedModelParallel, CombinedOptimizer]:
    """Attach each table's fused optimizer (``[training] sparse_*``, or
    ``[sharding.tables.NAME]`` where a table sets its own), plan and wrap ``model`` in DMP,
    and build the combined sparse + dense optimizer. Benchmarks use this too, so every
    contender is sharded and optimised exactly as the trainer does it."""
    tables = resolve_table_settings(schema, cfg.sharding, cfg.training)
    apply_table_optimizers(model, tables)
    dmp, _ = shard_model_from_config(model, ctx, cfg.sharding, tables, cfg.data.batch_size)
    return dmp, build_optimizer(cfg, dmp, tables)


def build_optimizer(cfg: Config, dmp: DistributedModelParallel,
                    tables: Dict[str, TableSettings]) -> CombinedOptimizer:
    """Fused embedding optimizer (already in DMP) + each data-parallel table's own optimizer
    + the dense optimizer over the rest."""
    t = cfg.training
    opt_cls = DENSE_OPTIMIZERS[t.dense_optimizer]
    dp_tables, dp_params = data_parallel_table_optimizers(dmp, tables)
    dense_params = {k: v for k, v in in_backward_optimizer_filter(dmp.named_parameters())
                    if k not in dp_params}
    dense = KeyedOptimizerWrapper(
        dense_params,
        lambda params: opt_cls(params, lr=t.dense_lr, weight_decay=t.dense_weight_decay),
    )
    return CombinedOptimizer([dmp.fused_optimizer, dense, *dp_tables])


def build_readers(cfg: Config, ctx: DistContext, schema: Schema) -> tuple:
    d = cfg.data
    common = dict(rank=ctx.rank, world_size=ctx.world_size, prefetch=d.prefetch, schema=schema,
                  validate=d.validate)
    train = ParquetReader(d.path, d.train_split, d.batch_size, shuffle=d.shuffle,
                          seed=cfg.training.seed, remainder=d.remainder,
                          shuffle_buffer_rows=d.shuffle_buffer_rows,
                          **common)  # type: ignore[arg-type]
    evaluation = ParquetReader(d.path, d.eval_split, d.eval_batch_size or d.batch_size,
                               shuffle=False, **common)  # type: ignore[arg-type]
    return train, evaluation


def epoch_batches(reader: ParquetReader, start_epoch: int = 0) -> Iterator[Batch]:
    """Batches of successive epochs (each reshuffled), without end."""
    for epoch in itertools.count(start_epoch):
        reader.set_epoch(epoch)
        yield from reader


def total_steps(cfg: Config, train_reader: ParquetReader) -> int:
    if cfg.training.steps > 0:
        return cfg.training.steps
    return max(1, int(math.ceil(cfg.training.epochs * len(train_reader))))


def evaluate(pipeline: TrainPipelineSparseDist, dmp: nn.Module, reader: ParquetReader,
             ctx: DistContext, max_batches: int) -> Dict[str, float]:
    """Whole-split (or ``max_batches``) AUC / NE / log-loss, aggregated across ranks.

    Must be called with the pipeline drained: it reuses the pipeline in eval mode, so no
    backward or optimizer step runs.
    """
    n = len(reader) if max_batches <= 0 else min(max_batches, len(reader))
    metrics = CTRMetrics(ctx.world_size, ctx.rank, reader.batch_size,
                         n * reader.batch_size * ctx.world_size, ctx.device)
    dmp.eval()
    it = itertools.islice(iter(reader), n)
    with torch.no_grad():
        while True:
            try:
                _, logits, labels = pipeline.progress(it)
            except StopIteration:
                break
            metrics.update(logits, labels)
    dmp.train()
    return metrics.compute()


@dataclass
class TrainState:
    step: int = 0
    examples: int = 0  # all ranks
    train_seconds: float = 0.0


def train(cfg: Config) -> Dict[str, Any]:
    """Run training per ``cfg``; returns the final metrics (printed as the ``final`` line)."""
    t = cfg.training
    ctx = init_distributed(cfg.dist.backend, cfg.dist.device, cfg.dist.cpu_threads or None,
                           cfg.dist.timeout_s)
    try:
        if ctx.is_main:
            save_config(cfg, t.run_dir)
            _log_to_file(os.path.join(t.run_dir, "train.log"))
        seed_everything(t.seed)
        schema = load_schema(cfg.data.schema or cfg.data.path)
        meta = load_meta(cfg.data.path)
        train_reader, eval_reader = build_readers(cfg, ctx, schema)
        dmp, optimizer = shard_and_optimize(cfg, ctx, schema,
                                            build_model(cfg, schema, ctx.device.type))
        pipeline = TrainPipelineSparseDist(dmp, optimizer, ctx.device)
        steps = total_steps(cfg, train_reader)
        metrics_file = MetricsFile(t.run_dir, ctx.is_main)
        if ctx.is_main:
            logger.info("training %s on %s: %d steps x %d examples x %d ranks (%d train "
                        "batches per rank per epoch)", cfg.model.name, cfg.data.path, steps,
                        cfg.data.batch_size, ctx.world_size, len(train_reader))
        state = run_training(cfg, ctx, pipeline, dmp, train_reader, eval_reader, steps,
                             metrics_file)
        final_eval = evaluate(pipeline, dmp, eval_reader, ctx, t.eval_batches)
        oracle = meta.get("oracle", {}).get("auc")
        final = {
            "auc": final_eval.get("auc"),
            "oracle_auc": float(oracle) if oracle is not None else None,
            "logloss": final_eval["logloss"],
            "ne": final_eval.get("ne"),
            "examples_per_s": round(state.examples / max(state.train_seconds, 1e-9), 1),
            "steps": state.step,
        }
        metrics_file.write({"split": "final", **final})
        if ctx.is_main:
            print(format_final(final), flush=True)
        return final
    finally:
        destroy_distributed()


def run_training(cfg: Config, ctx: DistContext, pipeline: TrainPipelineSparseDist,
                 dmp: nn.Module, train_reader: ParquetReader, eval_reader: ParquetReader,
                 steps: int, metrics_file: MetricsFile) -> TrainState:
    """Train for ``steps`` steps in segments that end at each periodic evaluation."""
    t = cfg.training
    state = TrainState()
    window = cfg.metrics.window_batches * cfg.data.batch_size * ctx.world_size
    train_metrics = CTRMetrics(ctx.world_size, ctx.rank, cfg.data.batch_size, window,
                               ctx.device)
    batches = epoch_batches(train_reader)
    eval_every = t.eval_every if t.eval_every > 0 else steps
    loss_sum, loss_n = torch.zeros((), device=ctx.device), 0
    dmp.train()
    while state.step < steps:
        segment = min(eval_every, steps - state.step)
        it = itertools.islice(batches, segment)
        seg_start = time.perf_counter()
        seg_examples = 0
        log_start, log_examples = time.perf_counter(), 0
        while True:
            try:
                loss, logits, labels = pipeline.progress(it)
            except StopIteration:
                break
            state.step += 1
            seg_examples += labels.shape[0] * ctx.world_size
            log_examples += labels.shape[0] * ctx.world_size
            train_metrics.update(logits, labels)
            loss_sum += loss.detach()  # no per-step host sync on CUDA
            loss_n += 1
            if state.step % t.log_every == 0 or state.step == steps:
                m = train_metrics.compute()  # collective: every rank reaches this step
                rate = log_examples / max(time.perf_counter() - log_start, 1e-9)
                mean_loss = float(loss_sum) / max(loss_n, 1)
                if ctx.is_main:
                    logger.info("step %d/%d loss %.4f auc %.4f ex/s %.0f", state.step, steps,
                                mean_loss, m.get("auc", float("nan")), rate)
                metrics_file.write({"split": "train", "step": state.step, "loss": mean_loss,
                                    "auc": m.get("auc"), "ne": m.get("ne"),
                                    "examples_per_s": rate})
                loss_sum.zero_()
                loss_n = 0
                log_start, log_examples = time.perf_counter(), 0
        state.train_seconds += time.perf_counter() - seg_start
        state.examples += seg_examples
        if state.step < steps:  # the final evaluation is the caller's
            m = evaluate(pipeline, dmp, eval_reader, ctx, t.eval_batches)
            if ctx.is_main:
                logger.info("eval step %d auc %.4f logloss %.4f", state.step,
                            m.get("auc", float("nan")), m["logloss"])
            metrics_file.write({"split": "eval", "step": state.step, **m})
    return state


def _log_to_file(path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
