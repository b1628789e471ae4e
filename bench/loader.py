"""Loader throughput: parquet → ``Batch`` samples/s per core vs DeepFM's training consumption.

``python -m bench.loader [--quick] [--batch-size 4096] [--rows N] [--json PATH]``

Two synthetic datasets are written to a temporary directory:

* ``criteo-like``: 13 float32 dense columns, 26 single-id ``list<int64>`` sparse columns and a
  binary label (the Criteo Kaggle/Terabyte layout after ``data.convert criteo``);
* ``sequence``: a user id, an item sequence with timestamps (lengths uniform in
  ``[1, 399]``, mean 200) and a binary label.

The loader (``ParquetReader``: decode, validate, shuffle, build KJTs) is timed as the best
of three shuffled epochs after a warm-up epoch, on one core: torch and Arrow are limited to one thread
and prefetch is off. Both sides are timed in CPU seconds of this process
(``time.process_time``), so the numbers are samples/s per core even on a busy machine. The training side times
DeepFM's step (forward, backward, fused sparse + dense optimizer; single-rank
``DistributedModelParallel`` on gloo, one thread) on pre-built batches of the criteo-like
schema at the same batch size. ``ratio = loader / training``: above 1 the loader keeps up
with a training process on the same number of cores.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from data.cli import ArgumentParser
from data.reader import ParquetReader
from bench.common import write_results
from data.io import write_json_atomic
from data.schema import FeatureSpec, LabelSpec, Schema


def _single_ids(rng: np.random.Generator, rows: int, n: int) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(np.arange(rows + 1, dtype=np.int32)),
                                    pa.array(rng.integers(0, n, rows)))


def write_criteo_like(out: str, rows: int, row_group_rows: int, num_embeddings: int,
                      seed: int = 0) -> Schema:
    schema = Schema(
        features=[FeatureSpec(f"I{i}", "dense") for i in range(1, 14)]
        + [FeatureSpec(f"C{i}", "sparse", num_embeddings=num_embeddings, embedding_dim=16)
           for i in range(1, 27)],
        labels=[LabelSpec("label")],
    )
    rng = np.random.default_rng(seed)
    cols: Dict[str, pa.Array] = {}
    for i in range(1, 14):
        cols[f"I{i}"] = pa.array(np.log1p(rng.exponential(5.0, rows)).astype(np.float32))
    for i in range(1, 27):
        cols[f"C{i}"] = _single_ids(rng, rows, num_embeddings)
    cols["label"] = pa.array((rng.random(rows) < 0.25).astype(np.float32))
    _write(out, schema, pa.table(cols), row_group_rows)
    return schema


def write_sequence(out: str, rows: int, row_group_rows: int, num_items: int, max_len: int,
                   seed: int = 0) -> Schema:
    schema = Schema(
        features=[FeatureSpec("user_id", "sparse", table="user", num_embeddings=rows + 1,
                              embedding_dim=16),
                  FeatureSpec("item_seq", "sequence", table="item", num_embeddings=num_items,
                              embedding_dim=16, max_len=max_len, timestamps="item_ts")],
        labels=[LabelSpec("label")],
    )
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 2 * 200, rows)
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
    total = int(offsets[-1])
    # Non-decreasing timestamps within every row: cumulative gaps restarted per row.
    gaps = rng.integers(0, 1000, total)
    ts = np.cumsum(gaps) - np.repeat(np.cumsum(gaps)[offsets[:-1]] - gaps[offsets[:-1]], lengths)
    table = pa.table({
        "user_id": _single_ids(rng, rows, rows + 1),
        "item_seq": pa.ListArray.from_arrays(pa.array(offsets),
                                             pa.array(rng.integers(1, num_items, total))),
        "item_ts": pa.ListArray.from_arrays(pa.array(offsets), pa.array(ts.astype(np.int64))),
        "label": pa.array((rng.random(rows) < 0.5).astype(np.float32)),
    })
    _write(out, schema, table, row_group_rows)
    return schema


def _write(out: str, schema: Schema, table: pa.Table, row_group_rows: int) -> None:
    os.makedirs(os.path.join(out, "train"), exist_ok=True)
    # Written like data.convert writes (lz4 pages, fixed row groups).
    pq.write_table(table, os.path.join(out, "train", "part-00000.parquet"),
                   row_group_size=row_group_rows, compression="lz4")
    schema.save(out)
    write_json_atomic(os.path.join(out, "meta.json"), {"generator": "bench.loader",
                                                       "rows": {"train": table.num_rows}})


def time_loader(path: str, batch_size: int, epochs: int = 3) -> Dict[str, float]:
    """Samples/s of the fastest of ``epochs`` shuffled epochs (after a warm-up epoch), one
    thread, no prefetch; the best epoch is the least disturbed by other load on the core."""
    reader = ParquetReader(path, "train", batch_size, shuffle=True, seed=0, prefetch=0)
    for _ in reader:  # warm-up: page cache, allocator
        pass
    rates = []
    for epoch in range(1, epochs + 1):
        reader.set_epoch(epoch)
        t0 = time.process_time()
        samples = sum(batch.batch_size for batch in reader)
        rates.append(samples / (time.process_time() - t0))
    return {"samples_per_s": max(rates), "epochs": epochs}


def time_deepfm(path: str, schema: Schema, batch_size: int, steps: int) -> Dict[str, float]:
    """Samples/s of DeepFM training steps on pre-built batches (single rank, one thread)."""
    from trainer.config import Config
    from sharding.dist import destroy_distributed, init_distributed
    from trainer.trainer import build_model, shard_and_optimize

    cfg = Config()
    cfg.data.path = path
    cfg.data.batch_size = batch_size
    ctx = init_distributed("gloo", "cpu", cpu_threads=1)
    try:
        dmp, optimizer = shard_and_optimize(cfg, ctx, schema, build_model(cfg, schema))
        reader = ParquetReader(path, "train", batch_size, prefetch=0)
        batches = [b for _, b in zip(range(min(steps, len(reader))), reader)]
        dmp.train()

        def step(batch: Any) -> None:
            optimizer.zero_grad()
            loss, _ = dmp(batch)
            loss.backward()
            optimizer.step()

        step(batches[0])  # warm-up (lazy init of fused kernels)
        t0 = time.process_time()
        for k in range(steps):
            step(batches[k % len(batches)])
        seconds = time.process_time() - t0
    finally:
        destroy_distributed()
    return {"samples": steps * batch_size, "seconds": seconds,
            "samples_per_s": steps * batch_size / seconds}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = ArgumentParser(prog="python -m bench.loader", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes for a CI smoke test")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--rows", type=int, default=0, help="criteo-like rows (default 1M, quick 16k)")
    p.add_argument("--seq-rows", type=int, default=0,
                   help="sequence rows (default 50k, quick 1k)")
    p.add_argument("--train-steps", type=int, default=0, help="DeepFM steps (default 20, quick 2)")
    p.add_argument("--num-embeddings", type=int, default=100_000)
    p.add_argument("--json", help="also write the results here")
    ns = p.parse_args(argv)
    rows = ns.rows or (16_384 if ns.quick else 1_000_000)
    seq_rows = ns.seq_rows or (1_024 if ns.quick else 50_000)
    steps = ns.train_steps or (2 if ns.quick else 20)
    batch = min(ns.batch_size, rows, seq_rows) if ns.quick else ns.batch_size
    # Per core: one torch thread, one Arrow thread, no prefetch thread.
    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    results: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        ctr_path, seq_path = os.path.join(tmp, "criteo_like"), os.path.join(tmp, "sequence")
        ctr_schema = write_criteo_like(ctr_path, rows, 65_536 if not ns.quick else 4096,
                                       ns.num_embeddings)
        write_sequence(seq_path, seq_rows, 4096 if not ns.quick else 256, ns.num_embeddings, 200)
        train = time_deepfm(ctr_path, ctr_schema, batch, steps)
        for name, path in (("criteo-like", ctr_path), ("sequence", seq_path)):
            load = time_loader(path, batch, epochs=1 if ns.quick else 3)
            results.append({"schema": name, "batch_size": batch,
                            "loader_samples_per_s_per_core": round(load["samples_per_s"], 1),
                            "deepfm_train_samples_per_s_per_core": round(train["samples_per_s"], 1),
                            "ratio": round(load["samples_per_s"] / train["samples_per_s"], 2)})
    print(f"{'schema':<12} {'batch':>6} {'loader samples/s/core':>22} "
          f"{'DeepFM train samples/s/core':>28} {'ratio':>7}")
    for r in results:
        print(f"{r['schema']:<12} {r['batch_size']:>6} {r['loader_samples_per_s_per_core']:>22,.0f} "
              f"{r['deepfm_train_samples_per_s_per_core']:>28,.0f} {r['ratio']:>7.2f}")
    print(json.dumps({"bench": "loader", "results": results}))
    if ns.json:
        # With the machine record (CPU, versions, date, load) that bench.report shows.
        write_results("loader_quick" if ns.quick else "loader",
                      {"results": results, "quick": ns.quick}, ns.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
