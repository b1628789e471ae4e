"""Step-time scaling: how the cost of a training step grows with table rows, batch, sequence
length and rank count.

``python -m bench.scaling [--quick] [--only rows,batch,hstu,ranks] [--max-rows 1e8]
[--batches 512,1024,2048,4096,8192] [--steps 5] [--repeats 3] [--profile] [--out FILE]``

Four sweeps, each printed as a table with the ratio to its smallest size:

* ``rows``: sharded DeepFM (dim 16, batch 4096, 13 dense + 26 single-id Zipf features,
  1 rank) with table ``t0`` growing 1e5 → 1e8 rows and the other 25 tables at 1e5 rows.
  One table of 1e8 × 16 fp32 is 6.4 GB (+ 0.4 GB of row-wise Adagrad state); 26 of them
  (166 GB) would not fit in this machine's 24 GiB. A step touches ``26 · B`` rows whatever
  the table size, so the step time should stay flat (``vs_smallest`` ≈ 1). Sizes that do not
  fit in the memory available now are skipped with the reason printed.
* ``batch``: the same model at 1e5 rows per table, batch 512 → 8192; ``per_example_vs_smallest``
  is (step time / batch) relative to batch 512: below 1 where fixed per-step costs amortise.
* ``hstu``: one ``HSTULayer`` (D 256, 4 heads, ``pytorch_jagged`` attention) forward +
  backward on 8 sequences of length L = 128 → 1024, and the ``hstu_attention`` op alone
  (``bench.hstu_attention.worker``). The attention should cost ∝ ΣLᵢ²: ``attn_per_L2_vs_smallest``
  = (time / ΣL²) relative to the smallest L tends to a constant once the quadratic part
  dominates; the layer adds ΣL-linear projections, so its ratio falls further.
* ``ranks``: the DeepFM step (1e5 rows, batch 4096 per rank) on 1 and 2 gloo ranks
  (``launch.spawn.run_ranks``; the ranks split this machine's cores), examples/s of all
  ranks and the ratio to 1 rank.

The DeepFM steps go through ``bench.common.time_pipeline`` — the same model, sharding
(``trainer.shard_and_optimize``) and pipeline as ``bench.throughput``. The 1-rank sweeps run
in this process on a 1-rank gloo group; ``--quick`` (tiny sizes, CI smoke) overlaps the
2-rank run with them, since there only finiteness is checked, never speed.
``--profile`` adds the top ops of one HSTU layer step at the largest L. A run of a subset
(``--only``) keeps the other sweeps of the results file it overwrites.
Results: ``bench/results/scaling.json`` (``scaling_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from data.cli import ArgumentParser
from bench.common import (RESULTS_DIR, available_memory_bytes, criteo_like_schema,
                          format_table, profile_ops, table_bytes, time_pipeline, write_results)

SWEEPS = ("rows", "batch", "hstu", "ranks")
DIM = 16
SMALL_ROWS = 100_000
# Zipf sampler transients while the batches are built (pdf, cdf, permutation: 8 B per row
# each) plus room for the model, activations and the rest of the process.
SAMPLER_BYTES_PER_ROW = 24
HEADROOM_BYTES = 2 * 2**30


@dataclass
class Sizes:
    """Every size a run measures, and its timing repetitions."""

    rows: List[int]
    batches: List[int]
    seq_lens: List[int]
    seq_batch: int
    hstu_dim: int
    hstu_heads: int
    batch_size: int
    base_rows: int  # rows per table of the batch and ranks sweeps
    steps: int
    warmup: int
    repeats: int
    notes: List[str] = field(default_factory=list)


FULL = Sizes(rows=[10**5, 10**6, 10**7, 10**8], batches=[512, 1024, 2048, 4096, 8192],
             seq_lens=[128, 256, 512, 1024], seq_batch=8, hstu_dim=256, hstu_heads=4,
             batch_size=4096, base_rows=SMALL_ROWS, steps=5, warmup=2, repeats=3)
QUICK = Sizes(rows=[1000, 10_000], batches=[64, 128], seq_lens=[8, 16], seq_batch=2,
              hstu_dim=32, hstu_heads=2, batch_size=128, base_rows=1000, steps=2, warmup=1,
              repeats=1)


def deepfm_step(ctx: Any, rows: int, batch_size: int, steps: int, warmup: int,
                repeats: int) -> Dict[str, Any]:
    """Time the sharded DeepFM step with table ``t0`` of ``rows`` rows, the rest ≤ 1e5."""
    import torch

    from bench.throughput import build_contender

    torch.manual_seed(0)
    schema = criteo_like_schema(rows, DIM, big_tables=1, small_rows=SMALL_ROWS)
    model = build_contender("shardrec_deepfm", schema, DIM, ctx.device.type)
    res = time_pipeline(ctx, schema, model, batch_size, steps, warmup, repeats)
    res["threads_per_rank"] = torch.get_num_threads()
    gc.collect()  # free this size's tables before the next size builds its own
    return res


def _rank_worker(ctx: Any, rows: int, batch_size: int, steps: int, warmup: int,
                 repeats: int) -> Dict[str, Any]:
    return deepfm_step(ctx, rows, batch_size, steps, warmup, repeats)


def rows_that_fit(requested: Sequence[int], batch_size: int) -> Tuple[List[int], List[str]]:
    """The requested sizes whose tables, optimizer state and sampler fit in available memory,
    and a note for each one skipped."""
    free = available_memory_bytes()
    keep, notes = [], []
    for rows in requested:
        schema = criteo_like_schema(rows, DIM, big_tables=1, small_rows=SMALL_ROWS)
        need = table_bytes(schema) + SAMPLER_BYTES_PER_ROW * rows + HEADROOM_BYTES
        if free and need > free:
            notes.append(f"rows sweep: 1 table of {rows:.0e} rows skipped — it needs "
                         f"{need / 2**30:.1f} GiB (table + row-wise Adagrad state + id sampler "
                         f"+ {HEADROOM_BYTES / 2**30:.0f} GiB headroom) and only "
                         f"{free / 2**30:.1f} GiB is available now")
            continue
        keep.append(rows)
    return keep, notes


def hstu_case(seq_len: int, sizes: Sizes) -> Dict[str, Any]:
    """One HSTU layer and its attention op on ``seq_batch`` sequences of ``seq_len``."""
    from bench.hstu_attention import worker

    lengths = [seq_len] * sizes.seq_batch
    spec = {"workload": f"L{seq_len}", "impl": "pytorch_jagged", "lengths": lengths,
            "dim": sizes.hstu_dim, "heads": sizes.hstu_heads, "max_len": max(sizes.seq_lens),
            "warmup": sizes.warmup, "repeats": sizes.repeats}
    res = worker(spec)
    return {"L": seq_len, "B": sizes.seq_batch, "sum_L2": sum(n * n for n in lengths),
            "layer_s": res["layer_s"], "attention_s": res["attention_s"],
            "attn_GFLOP/s": res["attention_flops"] / 1e9}


def hstu_profile(seq_len: int, sizes: Sizes) -> Dict[str, Any]:
    """Where one HSTU layer step's CPU time goes at ``seq_len`` (``profile_ops``, 1 step)."""
    import torch

    from models.hstu.layer import HSTULayer

    torch.manual_seed(0)
    lengths = [seq_len] * sizes.seq_batch
    layer = HSTULayer(sizes.hstu_dim, sizes.hstu_heads, max(sizes.seq_lens),
                      num_time_buckets=128, impl="pytorch_jagged")
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    x = torch.randn(int(offsets[-1]), sizes.hstu_dim, requires_grad=True)
    ts = torch.cat([torch.randint(1, 100_000, (n,)).cumsum(0) for n in lengths])
    step = lambda: layer(x, offsets, ts).sum().backward()  # noqa: E731
    step()  # warm-up
    return {"L": seq_len, "B": sizes.seq_batch, **profile_ops(step, 1)}


def _add_ratios(out: Dict[str, List[Dict[str, Any]]]) -> None:
    """Each sweep's ratio to its smallest size (1 = flat / perfectly proportional)."""
    if out.get("rows"):
        first = out["rows"][0]["step_s"]
        for r in out["rows"]:
            r["vs_smallest"] = r["step_s"] / first
    if out.get("batch"):
        first = out["batch"][0]["step_s"] / out["batch"][0]["batch_size"]
        for r in out["batch"]:
            r["step_vs_smallest"] = r["step_s"] / out["batch"][0]["step_s"]
            r["per_example_vs_smallest"] = r["step_s"] / r["batch_size"] / first
    if out.get("hstu"):
        h0 = out["hstu"][0]
        for r in out["hstu"]:
            r["layer_per_L2_vs_smallest"] = (r["layer_s"] / r["sum_L2"]) / (h0["layer_s"] / h0["sum_L2"])
            r["attn_per_L2_vs_smallest"] = ((r["attention_s"] / r["sum_L2"])
                                            / (h0["attention_s"] / h0["sum_L2"]))
    if out.get("ranks"):
        one = next((r["examples_per_s"] for r in out["ranks"] if r["ranks"] == 1), None)
        for r in out["ranks"]:
            if one:
                r["vs_1_rank"] = r["examples_per_s"] / one


def run(sizes: Sizes, sweeps: Sequence[str], overlap_ranks: bool,
        profile: bool = False) -> Dict[str, Any]:
    """Measure the chosen sweeps; the 1-rank ones in this process on a 1-rank gloo group."""
    from sharding.dist import destroy_distributed, init_distributed
    from launch.spawn import run_ranks

    def two_ranks() -> Dict[str, Any]:
        return run_ranks(_rank_worker, 2, sizes.base_rows, sizes.batch_size, sizes.steps,
                         sizes.warmup, sizes.repeats, cpu_threads=None, timeout_s=1800)[0]

    out: Dict[str, Any] = {"rows": [], "batch": [], "hstu": [], "ranks": []}
    pool: Optional[ThreadPoolExecutor] = None
    pending: Optional["Future[Dict[str, Any]]"] = None
    if "ranks" in sweeps and overlap_ranks:
        pool = ThreadPoolExecutor(1)
        pending = pool.submit(two_ranks)
    # One thread when the 2-rank run overlaps: two busy-waiting OpenMP pools on 2 cores
    # stretch a tiny step from milliseconds to seconds. Otherwise the trainer's default
    # (usable cores / ranks).
    ctx = init_distributed("gloo", "cpu", cpu_threads=1 if overlap_ranks else None)
    try:
        if "rows" in sweeps:
            rows, notes = rows_that_fit(sizes.rows, sizes.batch_size)
            sizes.notes += notes
            for n in notes:
                print(n, flush=True)
            for r in rows:
                res = deepfm_step(ctx, r, sizes.batch_size, sizes.steps, sizes.warmup,
                                  sizes.repeats)
                out["rows"].append({"rows": r, "tables": f"1 x {r:.0e} + 25 x {min(r, SMALL_ROWS):.0e}",
                                    "batch_size": sizes.batch_size, **res})
        if "batch" in sweeps:
            for bs in sizes.batches:
                res = deepfm_step(ctx, sizes.base_rows, bs,
                                  sizes.steps, sizes.warmup, sizes.repeats)
                out["batch"].append({"batch_size": bs, **res})
        if "hstu" in sweeps:
            for n in sizes.seq_lens:
                out["hstu"].append(hstu_case(n, sizes))
            if profile:
                out["hstu_profile"] = hstu_profile(max(sizes.seq_lens), sizes)
        if "ranks" in sweeps:
            # Measured right before the 2-rank run (not reused from the sweeps above) so
            # machine-load drift hits both sides of the ratio alike.
            one = deepfm_step(ctx, sizes.base_rows, sizes.batch_size, sizes.steps,
                              sizes.warmup, sizes.repeats)
            out["ranks"].append({"ranks": 1, "batch_per_rank": sizes.batch_size, **one})
    finally:
        destroy_distributed()
    if "ranks" in sweeps:
        two = pending.result() if pending is not None else two_ranks()
        out["ranks"].append({"ranks": 2, "batch_per_rank": sizes.batch_size, **two})
    if pool is not None:
        pool.shutdown()
    _add_ratios(out)
    return out


def _print(result: Dict[str, Any]) -> None:
    if result["rows"]:
        print("(a) rows per table (1 big table + 25 of 1e5, batch "
              f"{result['rows'][0]['batch_size']}, 1 rank): step time vs the smallest")
        print(format_table(result["rows"], ["rows", "tables", "step_s", "examples_per_s",
                                            "vs_smallest"]))
    if result["batch"]:
        print("\n(b) batch size: step time and time per example vs the smallest batch")
        print(format_table(result["batch"], ["batch_size", "step_s", "examples_per_s",
                                             "step_vs_smallest", "per_example_vs_smallest"]))
    if result["hstu"]:
        print("\n(c) HSTU layer (pytorch_jagged), L per sequence: time / ΣL² vs the smallest L")
        print(format_table(result["hstu"], ["L", "B", "sum_L2", "layer_s", "attention_s",
                                            "attn_GFLOP/s", "layer_per_L2_vs_smallest",
                                            "attn_per_L2_vs_smallest"]))
    if result.get("hstu_profile"):
        p = result["hstu_profile"]
        print(f"\nprofile: one HSTU layer step, B={p['B']}, L={p['L']}")
        print(format_table(p["top_ops"], ["op", "self_ms_per_step", "share", "calls_per_step"]))
    if result["ranks"]:
        print("\n(d) gloo ranks (DeepFM, same batch per rank): examples/s of all ranks vs 1 rank")
        print(format_table(result["ranks"], ["ranks", "threads_per_rank", "batch_per_rank",
                                             "step_s", "examples_per_s", "vs_1_rank"]))


def finite(result: Dict[str, Any]) -> bool:
    """Every timing of every sweep is a finite positive number."""
    keys = ("step_s", "examples_per_s", "layer_s", "attention_s")
    return all(math.isfinite(r[k]) and r[k] > 0 for s in SWEEPS for r in result[s]
               for k in keys if k in r)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = ArgumentParser(prog="python -m bench.scaling", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a CI smoke run")
    p.add_argument("--only", default=",".join(SWEEPS),
                   help=f"comma-separated subset of {', '.join(SWEEPS)}")
    p.add_argument("--max-rows", type=lambda s: int(float(s)), default=None,
                   help="largest table size of the rows sweep (default 1e8)")
    p.add_argument("--batches", default=None,
                   help="comma-separated batch sizes of the batch sweep (default 512..8192)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per repetition")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions (median)")
    p.add_argument("--profile", action="store_true",
                   help="also profile one HSTU layer step at the largest L (top-10 ops)")
    p.add_argument("--out", default=None, help="JSON results path")
    ns = p.parse_args(argv)
    sweeps = [s for s in ns.only.split(",") if s]
    unknown = sorted(set(sweeps) - set(SWEEPS))
    if unknown:
        p.error(f"unknown sweep(s) {unknown}; choose from {', '.join(SWEEPS)}")
    logging.basicConfig(level=logging.WARNING)
    sizes = QUICK if ns.quick else FULL
    if ns.max_rows:
        sizes.rows = [r for r in sizes.rows if r <= ns.max_rows]
    if ns.batches:
        sizes.batches = [int(b) for b in ns.batches.split(",")]
    sizes.steps = ns.steps or sizes.steps
    sizes.repeats = ns.repeats or sizes.repeats
    result = run(sizes, sweeps, overlap_ranks=ns.quick, profile=ns.profile)
    _print(result)
    name = "scaling_quick" if ns.quick else "scaling"
    path = ns.out or os.path.join(RESULTS_DIR, f"{name}.json")
    if set(sweeps) != set(SWEEPS) and os.path.exists(path):
        # A partial re-run keeps the other sweeps of the earlier results file.
        with open(path) as fh:
            previous = json.load(fh)
        for s in SWEEPS:
            if s not in sweeps and previous.get(s):
                result[s] = previous[s]
                sizes.notes.append(f"{s} sweep: from the run of {previous['machine']['date']} "
                                   f"{previous['machine'].get('time_utc', '')} UTC")
        if "hstu_profile" not in result and "hstu_profile" in previous:
            result["hstu_profile"] = previous["hstu_profile"]
        sizes.notes += [n for n in previous.get("notes", []) if n.split(" sweep")[0] not in sweeps
                        and "from the run of" not in n]
    payload = {"quick": ns.quick, "dim": DIM, "steps": sizes.steps, "repeats": sizes.repeats,
               "notes": sizes.notes, **result}
    path = write_results(name, payload, path)
    print(f"\nresults: {path}")
    return 0 if finite(result) else 1


if __name__ == "__main__":
    sys.exit(main())
