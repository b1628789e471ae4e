"""One HSTU layer, forward + backward: jagged vs padded vs a per-sequence loop (vs Triton).

``python -m bench.hstu_attention [--quick] [--json PATH]``

Workloads (D=256, 4 heads, so 64 features per head; ``n`` = 4,096):

* ``uniform``: 64 sequences of 256;
* ``longtail-8`` and ``longtail-64``: lengths drawn from a log-normal (σ = 1.2, median
  chosen so the mean is 256), clipped to [1, 4096], and the longest sequence of the batch
  set to 4096: the batch a padded kernel must be sized for. Padded at B=64 × 4096 needs
  ≈ 56 GB and is not run; at B=64 the jagged op is compared with the per-sequence loop.

Contenders (same layer weights and inputs):

* ``pytorch_jagged`` / ``pytorch_padded``: ``HSTULayer`` with that attention impl;
* ``loop``: the layer run on each sequence alone at its true length (one dense masked
  ``L × L`` attention per sequence, no padding), one backward for the batch;
* ``triton``: only on a CUDA device (under ``TRITON_INTERPRET`` it is far too slow to time).

Each contender runs in a fresh subprocess (in ``--quick``, in-process, where the peak-memory
column means little), so its peak memory is the rise of the process's peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) over its value just before the first
forward pass, i.e. the activations, gradients and workspaces of one step (inputs and weights
excluded); on CUDA it is ``torch.cuda.max_memory_allocated`` instead. Times are the median of
the timed repetitions after one warm-up (the padded long-tail run, ≈ 30 s, is timed once
without warm-up). The attention op is also timed alone (forward + backward on the same
jagged Q, K, V); its FLOP/s counts the useful causal work only,
``12 · d · H · Σ Lᵢ(Lᵢ+1)/2``
(QKᵀ and AV forward, their four gradient matmuls backward), and is printed beside this
machine's square-matmul FLOP/s measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from data.cli import ArgumentParser
from bench.common import format_table, matmul_flops, write_results

DIM, HEADS, MAX_LEN = 256, 4, 4096
QUICK = {"dim": 32, "heads": 2, "max_len": 64, "uniform": (2, 16), "mean": 16,
         "tail_batches": (2, 4)}


def longtail_lengths(batch: int, mean: float, cap: int, seed: int) -> List[int]:
    """Log-normal lengths (σ = 1.2) with the given mean, clipped to [1, cap], max set to cap."""
    sigma = 1.2
    mu = math.log(mean) - sigma**2 / 2  # E[L] = exp(μ + σ²/2)
    lengths = np.clip(np.rint(np.random.default_rng(seed).lognormal(mu, sigma, batch)), 1, cap)
    lengths[int(np.argmax(lengths))] = cap
    return [int(x) for x in lengths]


def attention_flops(lengths: Sequence[int], heads: int, head_dim: int) -> float:
    """Useful fwd+bwd FLOPs of the causal attention (see the module docstring)."""
    pairs = sum(n * (n + 1) // 2 for n in lengths)
    return 12.0 * head_dim * heads * pairs


def _peak_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # KiB on Linux


def worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Time one contender on one batch in this (fresh) process; return times and peak."""
    from models.hstu.attention import hstu_attention
    from models.hstu.layer import HSTULayer

    torch.manual_seed(0)
    device = torch.device("cuda" if spec["impl"] == "triton" else "cpu")
    lengths, dim, heads, max_len = spec["lengths"], spec["dim"], spec["heads"], spec["max_len"]
    impl = "pytorch_padded" if spec["impl"] == "loop" else spec["impl"]
    layer = HSTULayer(dim, heads, max_len, num_time_buckets=128, impl=impl).to(device)
    offsets = torch.tensor([0, *lengths], device=device).cumsum(0)
    total = int(offsets[-1])
    x = torch.randn(total, dim, device=device, requires_grad=True)
    ts = torch.cat([torch.randint(1, 100_000, (n,)).cumsum(0) for n in lengths]).to(device)
    bounds = list(zip(offsets[:-1].tolist(), offsets[1:].tolist()))

    def layer_step() -> None:
        if spec["impl"] == "loop":
            out = torch.cat([layer(x[lo:hi], torch.tensor([0, hi - lo], device=device),
                                   ts[lo:hi]) for lo, hi in bounds])
        else:
            out = layer(x, offsets, ts)
        out.sum().backward()

    head_dim = dim // heads
    q, k, v = (torch.randn(total, heads, head_dim, device=device, requires_grad=True)
               for _ in range(3))

    def attention_step() -> None:
        if spec["impl"] == "loop":
            out = torch.cat([hstu_attention(q[lo:hi], k[lo:hi], v[lo:hi],
                                            torch.tensor([0, hi - lo], device=device), max_len,
                                            layer.rab_pos, layer.rab_time, ts[lo:hi],
                                            impl=impl) for lo, hi in bounds])
        else:
            out = hstu_attention(q, k, v, offsets, max_len, layer.rab_pos, layer.rab_time, ts,
                                 impl=impl)
        out.sum().backward()

    def timed(step: Any) -> float:
        samples = []
        for _ in range(spec["repeats"]):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - t0)
        return float(np.median(samples))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = _peak_bytes(device)
    for _ in range(spec["warmup"]):
        layer_step()
    layer_s = timed(layer_step)
    peak = _peak_bytes(device) - before
    for _ in range(spec["warmup"]):
        attention_step()
    attn_s = timed(attention_step)
    out = {"layer_s": layer_s, "attention_s": attn_s, "peak_bytes": peak,
           "attention_flops": attention_flops(lengths, heads, head_dim) / attn_s}
    if spec.get("profile"):
        # Where the attention op's time goes (the evidence for its FLOP/s against matmul).
        from bench.common import profile_ops

        prof = profile_ops(attention_step, 1, top=8)
        out["profile"] = {"top_ops": prof["top_ops"],
                          "self_ms_per_step": prof["self_ms_per_step"]}
    return out


def run_contender(spec: Dict[str, Any]) -> Dict[str, Any]:
    """``worker(spec)`` in a fresh interpreter, so peak RSS belongs to this contender alone."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "bench.hstu_attention", "--worker",
                           json.dumps(spec)], cwd=repo, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": repo})
    if proc.returncode != 0:
        raise RuntimeError(f"contender {spec['impl']} on {spec['workload']} failed:\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = ArgumentParser(prog="python -m bench.hstu_attention",
                       description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes for a CI smoke test")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.worker:
        print(json.dumps(worker(json.loads(ns.worker))))
        return 0

    if ns.quick:
        dim, heads, max_len, mean = QUICK["dim"], QUICK["heads"], QUICK["max_len"], QUICK["mean"]
        ub, ul = QUICK["uniform"]
        small, big = QUICK["tail_batches"]
    else:
        dim, heads, max_len, mean, ub, ul, small, big = DIM, HEADS, MAX_LEN, 256, 64, 256, 8, 64
    gpu = torch.cuda.is_available()
    extra = ["triton"] if gpu else []
    workloads = [
        ("uniform", [ul] * ub, ["pytorch_jagged", "pytorch_padded", "loop"] + extra),
        (f"longtail-{small}", longtail_lengths(small, mean, max_len, seed=1),
         ["pytorch_jagged", "pytorch_padded", "loop"] + extra),
        (f"longtail-{big}", longtail_lengths(big, mean, max_len, seed=2),
         ["pytorch_jagged", "loop"] + extra),
    ]
    flops = matmul_flops(256 if ns.quick else 1024)
    rows: List[Dict[str, Any]] = []
    for name, lengths, contenders in workloads:
        padded_cells = len(lengths) * max(lengths) ** 2
        jagged_cells = sum(n * n for n in lengths)
        for impl in contenders:
            slow = impl == "pytorch_padded" and name.startswith("longtail") and not ns.quick
            spec = {"workload": name, "impl": impl, "lengths": lengths, "dim": dim,
                    "heads": heads, "max_len": max_len, "warmup": 0 if slow else 1,
                    "repeats": 1 if slow or ns.quick else 3,
                    "profile": impl == "pytorch_jagged" and name == workloads[-1][0]}
            # --quick stays in-process: a fresh interpreter per contender costs seconds on a
            # loaded CI machine, and the smoke test checks only that the numbers are finite.
            res = worker(spec) if ns.quick else run_contender(spec)
            rows.append({"workload": name, "B": len(lengths), "max_L": max(lengths),
                         "sum_L2/B_maxL2": jagged_cells / padded_cells, "impl": impl, **res,
                         "peak_MB": res["peak_bytes"] / 2**20,
                         "attn_GFLOP/s": res["attention_flops"] / 1e9,
                         "attn/matmul": res["attention_flops"] / flops})
    ratios: List[Dict[str, Any]] = []
    for name, _, contenders in workloads:
        mine = next(r for r in rows if r["workload"] == name and r["impl"] == "pytorch_jagged")
        for other in contenders[1:]:
            them = next(r for r in rows if r["workload"] == name and r["impl"] == other)
            ratios.append({"workload": name, "vs": other,
                           "speedup": them["layer_s"] / mine["layer_s"],
                           "attn_speedup": them["attention_s"] / mine["attention_s"],
                           "memory_ratio": them["peak_bytes"] / max(mine["peak_bytes"], 1.0)})
    print(f"matmul FLOP/s (this machine, this run): {flops / 1e9:,.1f} GFLOP/s"
          + ("" if gpu else "; triton skipped: no CUDA device (interpreter far too slow)"))
    print(format_table(rows, ["workload", "B", "max_L", "sum_L2/B_maxL2", "impl", "layer_s",
                              "attention_s", "peak_MB", "attn_GFLOP/s", "attn/matmul"]))
    print("ratios: pytorch_jagged vs the others (>1 = jagged faster / smaller)")
    print(format_table(ratios, ["workload", "vs", "speedup", "attn_speedup", "memory_ratio"]))
    prof = next((r.pop("profile") for r in rows if "profile" in r), None)
    if prof:
        print(f"pytorch_jagged attention op, {workloads[-1][0]}: "
              f"{prof['self_ms_per_step']:.0f} ms of CPU per forward + backward")
        print(format_table(prof["top_ops"], ["op", "self_ms_per_step", "share",
                                             "calls_per_step"]))
    payload = {"quick": ns.quick, "matmul_flops": flops, "results": rows, "ratios": ratios,
               "jagged_profile": prof}
    write_results("hstu_attention_quick" if ns.quick else "hstu_attention", payload, ns.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
