"""Embedding lookup + update rate of sharded tables vs this machine's row-gather rate.

``python -m bench.lookups [--quick] [--rows 1000000] [--dim 64] [--ranks 1,2]``

Ours: 26 sharded tables behind ``TrainPipelineSparseDist`` with fused row-wise Adagrad, a
model that is nothing but the lookup (loss = sum of the pooled embeddings), so a step is
input all-to-all + fused lookup + output all-to-all + fused backward update.
Baseline: ``torch.index_select`` of the same number of random Zipf rows from one table of
the same total size — a pure gather, no update, no communication. The ratio says how much
of the raw gather rate the full sharded lookup-and-update path keeps (goal ≥ 70%).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from bench.common import (criteo_like_schema, format_table, make_batches, time_repeated,
                          write_results)
from data.batch import Batch
from data.synth import ZipfSampler

NUM_TABLES = 26


class LookupOnly(nn.Module):
    """``Batch`` → loss = Σ pooled embeddings: the sparse path and nothing else."""

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        from models.blocks import build_ebc

        self.ebc = build_ebc(criteo_like_schema(rows, dim, num_dense=0), "meta")

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
        loss = self.ebc(batch.sparse).values().sum()
        return loss, (loss.detach(), batch.labels, batch.labels)


def _worker(ctx: Any, rows: int, dim: int, batch_size: int, steps: int, warmup: int,
            repeats: int) -> Dict[str, float]:
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from trainer.config import Config
    from trainer.trainer import shard_and_optimize

    schema = criteo_like_schema(rows, dim, num_dense=0)
    cfg = Config()
    cfg.data.batch_size = batch_size
    dmp, optimizer = shard_and_optimize(cfg, ctx, schema, LookupOnly(rows, dim))
    pipeline = TrainPipelineSparseDist(dmp, optimizer, ctx.device)
    it = itertools.cycle(make_batches(schema, batch_size, 8, seed=ctx.rank))
    timing = time_repeated(lambda: pipeline.progress(it), steps, warmup, repeats)
    return {"lookups_per_s": NUM_TABLES * batch_size * ctx.world_size * steps / timing.median_s}


def gather_rate(rows: int, dim: int, lookups: int, steps: int, warmup: int,
                repeats: int) -> float:
    """Rows/s of ``index_select`` over Zipf ids from a ``26·rows × dim`` table."""
    rng = np.random.default_rng(0)
    table = torch.randn(NUM_TABLES * rows, dim)
    ids = torch.from_numpy(ZipfSampler(NUM_TABLES * rows, 1.05, rng)(lookups, rng))
    timing = time_repeated(lambda: torch.index_select(table, 0, ids), steps, warmup, repeats)
    return lookups * steps / timing.median_s


def run(rows: int, dim: int, ranks: Sequence[int], batch_size: int, steps: int, warmup: int,
        repeats: int) -> Dict[str, Any]:
    from sharding.spawn import run_ranks

    out: List[Dict[str, Any]] = []
    for world in ranks:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        # The gather baseline gets the same cores per rank and the same ids per rank.
        base = gather_rate(rows, dim, NUM_TABLES * batch_size, steps, warmup, repeats) * world
        ours = run_ranks(_worker, world, rows, dim, batch_size, steps, warmup, repeats,
                         cpu_threads=None, timeout_s=1800)[0]["lookups_per_s"]
        out.append({"rows": rows, "dim": dim, "ranks": world, "gather_rows_per_s": base,
                    "sharded_lookups_per_s": ours, "ratio": ours / base})
    torch.set_num_threads(os.cpu_count() or 1)
    return {"batch_size": batch_size, "tables": NUM_TABLES, "results": out}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lookups", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny CI smoke run")
    p.add_argument("--rows", type=lambda s: int(float(s)), default=None,
                   help="rows per table (default 1e6)")
    p.add_argument("--dim", type=int, default=None, help="embedding dim (default 64)")
    p.add_argument("--ranks", default=None, help="comma-separated rank counts (default 1,2)")
    p.add_argument("--batch-size", type=int, default=None, help="per rank (default 4096)")
    p.add_argument("--out", default=None, help="JSON results path")
    ns = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows, dim, ranks, bs, steps, warmup, repeats = 1_000_000, 64, [1, 2], 4096, 10, 3, 3
    if ns.quick:
        rows, dim, ranks, bs, steps, warmup, repeats = 1000, 16, [2], 256, 3, 1, 1
    result = run(ns.rows or rows, ns.dim or dim,
                 [int(r) for r in ns.ranks.split(",")] if ns.ranks else ranks,
                 ns.batch_size or bs, steps, warmup, repeats)
    result["quick"] = ns.quick
    print(format_table(result["results"], ["rows", "dim", "ranks", "gather_rows_per_s",
                                           "sharded_lookups_per_s", "ratio"]))
    path = write_results("lookups_quick" if ns.quick else "lookups", result, ns.out)
    print(f"\nresults: {path}")
    ok = all(math.isfinite(r["ratio"]) for r in result["results"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
