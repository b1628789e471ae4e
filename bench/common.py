"""Shared benchmark plumbing: Criteo-like in-memory batches, timing, result files, tables.

Rules every benchmark follows: warm-up before timing, several repetitions with the median
reported, all contenders measured in one process run (interleaved where possible), results
written as JSON under ``bench/results/`` so later runs can be compared.
"""

from __future__ import annotations

import itertools
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data.batch import Batch
from data.io import write_json_atomic
from data.schema import FeatureSpec, LabelSpec, Schema
from data.synth.common import ZipfSampler
from trainer.metrics import parse_final

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def criteo_like_schema(rows: int, dim: int, num_sparse: int = 26, num_dense: int = 13,
                       big_tables: Optional[int] = None, small_rows: int = 100_000) -> Schema:
    """13 dense + 26 single-id sparse features, one table of ``rows`` x ``dim`` each.

    ``big_tables``: only the first ``big_tables`` tables get ``rows`` rows, the others
    ``min(rows, small_rows)`` — how a size whose 26 full tables do not fit in memory is still
    measured with embeddings dominating (e.g. two 1e7-row tables + 24 of 1e5).
    """
    feats = [FeatureSpec(f"d{j}", "dense") for j in range(num_dense)]
    big = num_sparse if big_tables is None else big_tables
    feats += [FeatureSpec(f"s{i}", "sparse", table=f"t{i}",
                          num_embeddings=rows if i < big else min(rows, small_rows),
                          embedding_dim=dim) for i in range(num_sparse)]
    return Schema(features=feats, labels=[LabelSpec("label")])


def table_bytes(schema: Schema) -> int:
    """fp32 bytes of every sparse table plus its row-wise Adagrad state (one float per row)."""
    return sum(t.num_embeddings * (t.embedding_dim + 1) * 4
               for t in schema.tables("sparse").values())


def available_memory_bytes() -> int:
    """``MemAvailable`` of /proc/meminfo (what can be allocated now without swapping)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def make_batches(schema: Schema, batch_size: int, count: int, seed: int = 0,
                 zipf: float = 1.05) -> List[Batch]:
    """``count`` random batches (Zipf ids, one id per feature, random labels)."""
    rng = np.random.default_rng(seed)
    samplers = {t.name: ZipfSampler(t.num_embeddings, zipf, rng)
                for t in schema.tables("sparse").values()}
    feats = schema.sparse_features
    out = []
    for _ in range(count):
        values = np.concatenate([samplers[f.table](batch_size, rng) for f in feats])  # type: ignore[index]
        out.append(Batch(
            dense=torch.from_numpy(rng.normal(size=(batch_size, schema.dense_dim)).astype(np.float32)),
            sparse=KeyedJaggedTensor(
                keys=[f.name for f in feats], values=torch.from_numpy(values),
                # int64 like ``data.reader``'s offsets: int32 lengths made every TBE call
                # convert the [26·B + 1] offsets first (a copy the real path does not pay).
                lengths=torch.ones(batch_size * len(feats), dtype=torch.int64)),
            labels=torch.from_numpy((rng.random(batch_size) < 0.25).astype(np.float32)),
        ))
    return out


@dataclass
class Timing:
    median_s: float
    samples: List[float]


def time_repeated(step: Callable[[], None], steps: int, warmup: int, repeats: int) -> Timing:
    """Median over ``repeats`` of the time for ``steps`` calls of ``step`` (after warm-up)."""
    for _ in range(warmup):
        step()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        samples.append(time.perf_counter() - t0)
    return Timing(statistics.median(samples), samples)


def pipeline_step(ctx: Any, schema: Schema, model: torch.nn.Module,
                  batch_size: int) -> Callable[[], None]:
    """Shard ``model`` (meta-device tables) as the trainer does; return one training step.

    ``trainer.shard_and_optimize`` plans, wraps in DMP and builds the fused sparse + dense
    optimizer; ``TrainPipelineSparseDist`` drives it over 8 pre-built batches of ``schema``
    (``batch_size`` per rank, so no data loading is timed).
    """
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from trainer.config import Config
    from trainer.trainer import shard_and_optimize

    cfg = Config()
    cfg.data.batch_size = batch_size
    dmp, optimizer = shard_and_optimize(cfg, ctx, schema, model)
    pipeline = TrainPipelineSparseDist(dmp, optimizer, ctx.device)
    it = itertools.cycle(make_batches(schema, batch_size, 8, seed=ctx.rank))
    return lambda: pipeline.progress(it)


def time_pipeline(ctx: Any, schema: Schema, model: torch.nn.Module, batch_size: int, steps: int,
                  warmup: int, repeats: int, profile_steps: int = 0) -> Dict[str, Any]:
    """Median ``step_s`` and ``examples_per_s`` (all ranks) of ``pipeline_step``; with
    ``profile_steps`` > 0 also a ``profile`` of that many more steps (``profile_ops``; every
    rank profiles, as the collectives need all ranks; rank 0's is returned)."""
    step = pipeline_step(ctx, schema, model, batch_size)
    timing = time_repeated(step, steps, warmup, repeats)
    out: Dict[str, Any] = {"step_s": timing.median_s / steps,
                           "examples_per_s": batch_size * ctx.world_size * steps / timing.median_s}
    if profile_steps:
        out["profile"] = profile_ops(step, profile_steps)
    return out


def matmul_flops(n: int = 1024, dtype: torch.dtype = torch.float32, repeats: int = 5) -> float:
    """This machine's dense matmul FLOP/s (square ``n`` x ``n``, median of ``repeats``)."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    t = time_repeated(lambda: torch.mm(a, b), steps=4, warmup=2, repeats=repeats)
    return 4 * 2 * n**3 / t.median_s


def profile_ops(step: Callable[[], None], steps: int, top: int = 10) -> Dict[str, Any]:
    """Where the CPU time of ``steps`` calls of ``step`` goes, per step (torch.profiler).

    Returns ``top_ops`` (the ``top`` ops by self CPU time: name, ms per step, share of all
    self time, calls per step), ``categories`` (self time summed into the parts of a sharded
    step: input-dist all-to-all, TBE lookup, TBE backward + fused optimizer, KJT permutes,
    dense matmuls, other) and ``phases`` (the pipeline's own ``## name ##`` record_function
    ranges, inclusive time: forward / backward / optimizer / sparse data dist ...).
    Self times of all threads are summed (the autograd thread runs the backward), so shares
    are of CPU time, which on a loaded machine differs from wall time.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0 or e.key.startswith("##")]
    ops = [e for e in events if not e.key.startswith("##")]
    total_us = sum(e.self_cpu_time_total for e in ops) or 1.0
    ops.sort(key=lambda e: -e.self_cpu_time_total)
    top_ops = [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                "share": e.self_cpu_time_total / total_us, "calls_per_step": e.count / steps}
               for e in ops[:top]]
    cats: Dict[str, float] = {}
    for e in ops:
        cats[op_category(e.key)] = cats.get(op_category(e.key), 0.0) + e.self_cpu_time_total
    phases: Dict[str, float] = {}
    for e in events:
        if e.key.startswith("##"):
            # "## forward 3 ##" -> "forward": batch indices would split one phase into many.
            name = re.sub(r"\s+\d+\s*$", "", e.key.strip("# ").strip())
            phases[name] = phases.get(name, 0.0) + e.cpu_time_total
    return {
        "steps": steps, "self_ms_per_step": total_us / 1e3 / steps, "top_ops": top_ops,
        "categories": [{"category": c, "self_ms_per_step": us / 1e3 / steps,
                        "share": us / total_us} for c, us in sorted(cats.items(),
                                                                     key=lambda kv: -kv[1])],
        "phases": [{"phase": p, "ms_per_step": us / 1e3 / steps}
                   for p, us in sorted(phases.items(), key=lambda kv: -kv[1])],
    }


# Op-name patterns of the parts of a sharded step, first match wins (see ``profile_ops``).
_CATEGORIES = [
    ("input/output dist (gloo collectives)", r"all_to_all|alltoall|all2all|gloo|c10d::|"
                                             r"allreduce|all_reduce|reduce_?scatter|"
                                             r"all_?gather|wait|_dist\]|awaitable"),
    # The lookup autograd function's own name carries the optimizer ("..._adagrad_function"),
    # so forward patterns go first.
    ("TBE lookup (forward)", r"codegen_lookup|codegen_forward|bounds_check|\[lookup\]"),
    ("TBE backward + fused optimizer", r"backward.*(embedding|codegen)|(embedding|codegen).*"
                                       r"backward|adagrad|sgd|adam"),
    ("TBE lookup (forward)", r"split_embedding|embedding_codegen|tbe"),
    ("KJT permute / bucketize", r"permute|bucketize|jagged|asynchronous_complete_cumsum|"
                                r"segment_sum|keyed_jagged"),
    ("dense matmul", r"aten::(addmm|mm|bmm|matmul|linear)$"),
]


def op_category(name: str) -> str:
    """The part of a sharded training step an op belongs to (``other`` if none)."""
    low = name.lower()
    for cat, pattern in _CATEGORIES:
        if re.search(pattern, low):
            return cat
    return "other"


def machine_info() -> Dict[str, Any]:
    import torchrec

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        from importlib.metadata import version

        fbgemm = next((version(d) for d in ("fbgemm-gpu-cpu", "fbgemm-gpu") if _installed(d)),
                      "?")
    except ImportError:
        fbgemm = "?"
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": _total_memory_gib(),
            "torch": torch.__version__, "torchrec": getattr(torchrec, "__version__", "?"),
            "fbgemm_gpu": fbgemm,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d"), "time_utc": time.strftime("%H:%M", time.gmtime()),
            # 1/5/15-minute load when the results were written: how busy the shared machine
            # was while they were measured (the 15-minute figure spans most runs).
            "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg")
            else None}


def _installed(dist: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(dist)
        return True
    except PackageNotFoundError:
        return False


def _total_memory_gib() -> float:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return float("nan")


def write_results(name: str, payload: Dict[str, Any], out: Optional[str] = None) -> str:
    """``bench/results/<name>.json`` (or ``out``), written atomically."""
    path = out or os.path.join(RESULTS_DIR, f"{name}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json_atomic(path, {"benchmark": name, "machine": machine_info(), **payload})
    return path


# Runs the command, then reports the largest peak RSS among its (waited-for) descendants.
_RSS_WRAPPER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[1:])\n"
    "print(f'peak_rss_kb={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}',"
    " file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def trainer_command(config: str, ranks: int, overrides: Sequence[str]) -> List[str]:
    """``python -m trainer`` (1 rank) or ``torchrun --standalone`` (more) on ``config``."""
    args = ["-m", "trainer", "--config", config, *overrides]
    if ranks == 1:
        return [sys.executable, *args]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return [torchrun, "--standalone", f"--nproc_per_node={ranks}", *args]


@dataclass
class TrainerRun:
    """What one real trainer run reported: its ``final`` line's values, the examples/s of
    each logging window, and the largest peak RSS of its processes (KiB; 0 if unknown)."""

    final: Dict[str, str]
    window_examples_per_s: List[float]
    peak_rss_kb: int


def run_trainer(config: str, ranks: int, overrides: Sequence[str], what: str,
                timeout_s: float = 1800) -> TrainerRun:
    """Run the trainer as users do (see :func:`trainer_command`); ``what`` names the run in
    errors, which carry the tail of its stderr."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-c", _RSS_WRAPPER, *trainer_command(config, ranks, overrides)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=repo,
                          env={**os.environ, "PYTHONPATH": repo})
    if proc.returncode != 0:
        raise RuntimeError(f"{what} on {ranks} rank(s) failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    final = parse_final(proc.stdout)
    if final is None:
        raise RuntimeError(f"{what} on {ranks} rank(s): no final line in\n{proc.stdout[-2000:]}")
    rss = re.findall(r"peak_rss_kb=(\d+)", proc.stderr)
    return TrainerRun(final,
                      [float(x) for x in re.findall(r"ex/s (\d+)", proc.stdout + proc.stderr)],
                      int(rss[-1]) if rss else 0)


def format_table(rows: Sequence[Dict[str, Any]], columns: Sequence[str]) -> str:
    """A fixed-width text table of ``rows`` (dicts) over ``columns``."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c)
              for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)
