"""Shared benchmark plumbing: Criteo-like in-memory batches, timing, result files, tables.

Rules every benchmark follows: warm-up before timing, several repetitions with the median
reported, all contenders measured in one process run (interleaved where possible), results
written as JSON under ``bench/results/`` so later runs can be compared.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data.batch import Batch
from data.schema import FeatureSpec, LabelSpec, Schema
from data.synth import ZipfSampler

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def criteo_like_schema(rows: int, dim: int, num_sparse: int = 26, num_dense: int = 13) -> Schema:
    """13 dense + 26 single-id sparse features, one table of ``rows`` x ``dim`` each."""
    feats = [FeatureSpec(f"d{j}", "dense") for j in range(num_dense)]
    feats += [FeatureSpec(f"s{i}", "sparse", table=f"t{i}", num_embeddings=rows,
                          embedding_dim=dim) for i in range(num_sparse)]
    return Schema(features=feats, labels=[LabelSpec("label")])


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
                lengths=torch.ones(batch_size * len(feats), dtype=torch.int32)),
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


def matmul_flops(n: int = 1024, dtype: torch.dtype = torch.float32, repeats: int = 5) -> float:
    """This machine's dense matmul FLOP/s (square ``n`` x ``n``, median of ``repeats``)."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    t = time_repeated(lambda: torch.mm(a, b), steps=4, warmup=2, repeats=repeats)
    return 4 * 2 * n**3 / t.median_s


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
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "torchrec": getattr(torchrec, "__version__", "?"),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d")}


def write_results(name: str, payload: Dict[str, Any], out: Optional[str] = None) -> str:
    """``bench/results/<name>.json`` (or ``out``), written atomically."""
    path = out or os.path.join(RESULTS_DIR, f"{name}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump({"benchmark": name, "machine": machine_info(), **payload}, fh, indent=2)
    os.replace(tmp, path)
    return path


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
