"""Embedding lookup + update rate of sharded tables vs this machine's row-gather rate.

``python -m bench.lookups [--quick] [--rows 1000000] [--dim 64] [--ranks 1,2] [--profile]``

Ours: 26 sharded tables behind ``TrainPipelineSparseDist`` with fused row-wise Adagrad, a
model that is nothing but the lookup (loss = sum of the pooled embeddings), so a step is
input all-to-all + fused lookup + output all-to-all + fused backward update.
Baseline: ``torch.index_select`` of the same number of random Zipf rows from one table of
the same total size — a pure gather, no update, no communication — timed in each rank,
interleaved with the sharded step. The ratio says how much
of the raw gather rate the full sharded lookup-and-update path keeps (goal ≥ 70%).
``--profile`` records where one step's CPU time goes (``bench.common.profile_ops``) into the
JSON: the input-dist all-to-all on gloo, the TBE lookup, the backward with the fused
optimizer, the KJT permutes.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from data.cli import ArgumentParser
from bench.common import (criteo_like_schema, format_table, pipeline_step, profile_ops,
                          time_repeated, write_results)
from data.batch import Batch
from data.synth.common import ZipfSampler

NUM_TABLES = 26


class LookupOnly(nn.Module):
    """``Batch`` → loss = Σ pooled embeddings: the sparse path and nothing else."""

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        from models.blocks import build_ebc

        self.ebc = build_ebc(criteo_like_schema(rows, dim, num_dense=0), "meta")
        # One dense scalar: the trainer's dense optimizer refuses an empty parameter list,
        # and a [1] multiply costs nothing next to the lookup.
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
        loss = (self.ebc(batch.sparse).values().sum() * self.scale).squeeze(0)
        return loss, (loss.detach(), batch.labels, batch.labels)


def gather_step(rows: int, dim: int, lookups: int, seed: int = 0) -> Callable[[], None]:
    """One ``index_select`` of ``lookups`` Zipf ids from a ``26·rows × dim`` table."""
    rng = np.random.default_rng(seed)
    table = torch.randn(NUM_TABLES * rows, dim)
    ids = torch.from_numpy(ZipfSampler(NUM_TABLES * rows, 1.05, rng)(lookups, rng))
    return lambda: torch.index_select(table, 0, ids)


def _worker(ctx: Any, rows: int, dim: int, batch_size: int, steps: int, warmup: int,
            repeats: int, profile_steps: int) -> Dict[str, Any]:
    """Time the sharded step and the gather baseline in this rank, interleaved repetition by
    repetition: on a shared machine, timing them minutes apart in different processes let
    load swings decide the ratio. Every rank gathers its own ids at the same time, so the
    baseline also runs with the cores per rank the sharded step has."""
    schema = criteo_like_schema(rows, dim, num_dense=0)
    ours = pipeline_step(ctx, schema, LookupOnly(rows, dim), batch_size)
    lookups = NUM_TABLES * batch_size
    base = gather_step(rows, dim, lookups, seed=ctx.rank)
    for _ in range(warmup):
        ours()
        base()
    ours_s, base_s = [], []
    for _ in range(repeats):
        ours_s.append(time_repeated(ours, steps, 0, 1).median_s)
        base_s.append(time_repeated(base, steps, 0, 1).median_s)
    res: Dict[str, Any] = {
        "lookups_per_s": lookups * ctx.world_size * steps / statistics.median(ours_s),
        "gather_rows_per_s": lookups * ctx.world_size * steps / statistics.median(base_s)}
    if profile_steps:
        res["profile"] = profile_ops(ours, profile_steps)
    return res


def run(rows: int, dim: int, ranks: Sequence[int], batch_size: int, steps: int, warmup: int,
        repeats: int, profile_steps: int = 0) -> Dict[str, Any]:
    from launch.spawn import run_ranks

    out: List[Dict[str, Any]] = []
    profiles: List[Dict[str, Any]] = []
    for world in ranks:
        res = run_ranks(_worker, world, rows, dim, batch_size, steps, warmup, repeats,
                        profile_steps, cpu_threads=None, timeout_s=1800)[0]
        out.append({"rows": rows, "dim": dim, "ranks": world,
                    "gather_rows_per_s": res["gather_rows_per_s"],
                    "sharded_lookups_per_s": res["lookups_per_s"],
                    "ratio": res["lookups_per_s"] / res["gather_rows_per_s"]})
        if "profile" in res:
            profiles.append({"rows": rows, "dim": dim, "ranks": world, **res["profile"]})
    return {"batch_size": batch_size, "tables": NUM_TABLES, "results": out,
            "profiles": profiles}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = ArgumentParser(prog="python -m bench.lookups", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny CI smoke run")
    p.add_argument("--rows", type=lambda s: int(float(s)), default=None,
                   help="rows per table (default 1e6)")
    p.add_argument("--dim", type=int, default=None, help="embedding dim (default 64)")
    p.add_argument("--ranks", default=None, help="comma-separated rank counts (default 1,2)")
    p.add_argument("--batch-size", type=int, default=None, help="per rank (default 4096)")
    p.add_argument("--profile", action="store_true",
                   help="also profile 3 steps (rank 0): top-10 ops by self CPU time, time by "
                        "part of the step (input dist, TBE lookup, backward + fused "
                        "optimizer, KJT permutes) and pipeline phases, into the JSON")
    p.add_argument("--out", default=None, help="JSON results path")
    ns = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows, dim, ranks, bs, steps, warmup, repeats = 1_000_000, 64, [1, 2], 4096, 10, 3, 3
    if ns.quick:
        rows, dim, ranks, bs, steps, warmup, repeats = 1000, 16, [2], 256, 3, 1, 1
    result = run(ns.rows or rows, ns.dim or dim,
                 [int(r) for r in ns.ranks.split(",")] if ns.ranks else ranks,
                 ns.batch_size or bs, steps, warmup, repeats, 3 if ns.profile else 0)
    result["quick"] = ns.quick
    print(format_table(result["results"], ["rows", "dim", "ranks", "gather_rows_per_s",
                                           "sharded_lookups_per_s", "ratio"]))
    for prof in result["profiles"]:
        print(f"\nprofile: {prof['ranks']} rank(s), rank 0, {prof['self_ms_per_step']:.1f} ms "
              "CPU per step")
        print(format_table(prof["categories"], ["category", "self_ms_per_step", "share"]))
        print(format_table(prof["phases"], ["phase", "ms_per_step"]))
        print(format_table(prof["top_ops"], ["op", "self_ms_per_step", "share",
                                             "calls_per_step"]))
    path = write_results("lookups_quick" if ns.quick else "lookups", result, ns.out)
    print(f"\nresults: {path}")
    ok = all(math.isfinite(r["ratio"]) for r in result["results"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
