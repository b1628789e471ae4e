"""One HSTU layer, forward + backward: jagged (Python tiles, compiled C++) vs padded vs a
per-sequence loop (vs Triton); semi-local vs full at long lengths; length-balanced batches.

``python -m bench.hstu_attention [--quick] [--json PATH]``

Workloads (D=256, 4 heads, so 64 features per head; ``n`` = 4,096):

* ``uniform``: 64 sequences of 256;
* ``longtail-8`` and ``longtail-64``: lengths drawn from a log-normal (σ = 1.2, median
  chosen so the mean is 256), clipped to [1, 4096], and the longest sequence of the batch
  set to 4096: the batch a padded kernel must be sized for. Padded at B=64 × 4096 needs
  ≈ 56 GB and is not run; at B=64 the jagged op is compared with the per-sequence loop.

Contenders (same layer weights and inputs):

* ``pytorch_jagged`` / ``compiled_jagged`` / ``pytorch_padded``: ``HSTULayer`` with that
  attention impl (``compiled_jagged``: the C++ kernel of :mod:`models.hstu.compiled`);
* ``loop``: the layer run on each sequence alone at its true length (one dense masked
  ``L × L`` attention per sequence, no padding), one backward for the batch;
* ``triton``: only on a CUDA device (under ``TRITON_INTERPRET`` it is far too slow to time).

Goals printed per long-tailed workload: ``compiled_jagged``'s attention FLOP/s ≥ 40% of the
square matmul's, and its layer ≥ 1.5× ``pytorch_jagged``'s speed.

``long-16384`` (B=4, lengths 16,384 / 4,096 / 1,024 / 256, ``n`` = 16,384): ``semi_local``
(W=256, G=4) against full causal ``pytorch_jagged`` and ``compiled_jagged``: the time and
peak-memory ratios.

Length-balanced batches (``data.balance_batches``, ``data.length_sampling``): a long-tailed
dataset (log-normal lengths, mean 256, capped at 4,096) read by 4 simulated ranks, 8 rows a
batch; each step's layer time is measured per rank and the spread is ``max / mean`` over the
ranks (the synchronous step waits for the slowest; ``spread_cpu`` the same in the thread's
CPU time, which a shared machine's other jobs do not inflate), averaged over the steps
(the layer runs with the CPU default attention, ``auto``): plain batches,
balanced (``balance_batches=8``, attention cost) and balanced + ``hstu`` length sampling
(α = 1.6, which also trains on less of the longest histories).

``--compiled-check [--threads N]``: only the goals of ``compiled_jagged`` on the two
long-tailed batches, in one process and quickly (≈ 1 min): the attention op and the layer,
forward + backward, ``pytorch_jagged`` and ``compiled_jagged`` taken in turns, and the square
matmul, all timed in both wall time and this process's CPU time. On a machine shared with
other jobs the CPU-time ratios at one thread are the trustworthy ones (wall time there
mostly measures the other jobs; intra-op threads waiting for a descheduled sibling inflate
multi-threaded wall times by far more than the work).

Each contender runs in a fresh subprocess (in ``--quick``, in-process, where the peak-memory
column means little), so its peak memory is the rise of the process's peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) over its value just before the first
forward pass, i.e. the activations, gradients and workspaces of one step (inputs and weights
excluded); on CUDA it is ``torch.cuda.max_memory_allocated`` instead. Times are the median of
the timed repetitions after one warm-up (the padded long-tail run, ≈ 30 s, is timed once
without warm-up); ``layer_cpu_s`` / ``attention_cpu_s`` are the same steps in this
process's CPU time (the ``long-16384`` ratios are printed in both). The attention op is also timed alone (forward + backward on the same
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
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from data.cli import ArgumentParser
from bench.common import format_table, matmul_flops, write_results

DIM, HEADS, MAX_LEN = 256, 4, 4096
QUICK = {"dim": 32, "heads": 2, "max_len": 64, "uniform": (2, 16), "mean": 16,
         "tail_batches": (2, 4)}
# The long workload: lengths, n, window W, global tokens G (full run / --quick).
LONG = {"lengths": [16384, 4096, 1024, 256], "max_len": 16384, "window": 256, "global": 4}
LONG_QUICK = {"lengths": [256, 64, 16], "max_len": 256, "window": 16, "global": 2}


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
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = torch.device("cuda" if spec["impl"] == "triton" else "cpu")
    lengths, dim, heads, max_len = spec["lengths"], spec["dim"], spec["heads"], spec["max_len"]
    impl = "pytorch_padded" if spec["impl"] == "loop" else spec["impl"]
    window, glob = spec.get("window", 256), spec.get("global_tokens", 4)
    layer = HSTULayer(dim, heads, max_len, num_time_buckets=128, impl=impl, window=window,
                      global_tokens=glob).to(device)
    local = (window, glob) if impl == "semi_local" else (0, 0)
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
                                 impl=impl, window=local[0], global_tokens=local[1])
        out.sum().backward()

    cpu: Dict[str, float] = {}

    def timed(step: Any, key: str) -> float:
        samples, cpu_samples = [], []
        for _ in range(spec["repeats"]):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - t0)
            cpu_samples.append(time.process_time() - c0)
        # This process's CPU time: on a shared machine, what the other jobs do not inflate.
        cpu[key] = float(np.median(cpu_samples))
        return float(np.median(samples))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = _peak_bytes(device)
    for _ in range(spec["warmup"]):
        layer_step()
    layer_s = timed(layer_step, "layer_cpu_s")
    peak = _peak_bytes(device) - before
    for _ in range(spec["warmup"]):
        attention_step()
    attn_s = timed(attention_step, "attention_cpu_s")
    out = {"layer_s": layer_s, "attention_s": attn_s, **cpu, "peak_bytes": peak,
           "attention_flops": attention_flops(lengths, heads, head_dim) / attn_s}
    if spec.get("profile"):
        # Where the attention op's time goes (the evidence for its FLOP/s against matmul).
        from bench.common import profile_ops

        prof = profile_ops(attention_step, 1, top=8)
        out["profile"] = {"impl": spec["impl"], "top_ops": prof["top_ops"],
                          "self_ms_per_step": prof["self_ms_per_step"]}
    return out


def compiled_goals(rows: List[Dict[str, Any]], workloads: Sequence[str]
                   ) -> List[Dict[str, Any]]:
    """compiled_jagged's attention FLOP/s share and layer speedup over pytorch_jagged."""
    out = []
    for name in workloads:
        mine = next(r for r in rows if r["workload"] == name and r["impl"] == "compiled_jagged")
        base = next(r for r in rows if r["workload"] == name and r["impl"] == "pytorch_jagged")
        speedup = base["layer_s"] / mine["layer_s"]
        out.append({"workload": name, "attn/matmul": mine["attn/matmul"],
                    "layer_speedup": speedup,
                    "goals_met": bool(mine["attn/matmul"] >= 0.40 and speedup >= 1.5)})
    return out


def print_long_sections(rows: List[Dict[str, Any]], workload: str, long: Dict[str, Any],
                        quick: bool) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """Print (and return) the long-sequence sections: semi-local vs full attention on
    ``workload`` and the length-balanced batches' cross-rank step-time spread."""
    semi = semi_local_ratios(rows, workload)
    print(f"{workload}: semi_local (W={long['window']}, G={long['global']}) vs full "
          "causal attention (<1 = semi-local cheaper)")
    print(format_table(semi, ["vs", "time_ratio", "attn_time_ratio", "cpu_time_ratio",
                              "attn_cpu_time_ratio", "memory_ratio"]))
    spread = balance_spread(quick)
    print("length-balanced batches: step-time spread across ranks (max/mean, mean over steps)")
    print(format_table(spread, ["batches", "ranks", "steps", "spread", "spread_cpu",
                                "cost_spread", "step_s", "tokens_per_s"]))
    return semi, spread


def semi_local_ratios(rows: List[Dict[str, Any]], workload: str) -> List[Dict[str, Any]]:
    semi = next(r for r in rows if r["workload"] == workload and r["impl"] == "semi_local")
    out = []
    for full in ("pytorch_jagged", "compiled_jagged"):
        them = next((r for r in rows if r["workload"] == workload and r["impl"] == full), None)
        if them is None:  # bench.hstu_long --full may leave one out
            continue
        out.append({"vs": full, "time_ratio": semi["layer_s"] / them["layer_s"],
                    "attn_time_ratio": semi["attention_s"] / them["attention_s"],
                    "cpu_time_ratio": semi["layer_cpu_s"] / them["layer_cpu_s"],
                    "attn_cpu_time_ratio": semi["attention_cpu_s"] / them["attention_cpu_s"],
                    "memory_ratio": semi["peak_bytes"] / max(them["peak_bytes"], 1.0)})
    return out


def balance_spread(quick: bool, ranks: int = 4) -> List[Dict[str, Any]]:
    """Step-time spread across simulated ranks for plain vs length-balanced batches (see the
    module docstring); every rank's step runs here in turn, one thread."""
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.lengths import LengthSampling
    from data.reader import ParquetReader
    from data.schema import FeatureSpec, LabelSpec, Schema
    from models.hstu.layer import HSTULayer

    dim, heads, cap, mean, rows, batch = (32, 2, 256, 16, 256, 4) if quick else \
        (DIM, HEADS, MAX_LEN, 256, 1024, 8)
    lengths = longtail_lengths(rows, mean, cap, seed=3)
    lengths[int(np.argmax(lengths))] = int(np.sort(lengths)[-2])  # no forced whale here
    out = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one simulated rank at a time, as on one core each
    try:
        with tempfile.TemporaryDirectory() as tmp:
            (root := os.path.join(tmp, "ds"), os.makedirs(os.path.join(tmp, "ds", "train")))
            Schema(features=[FeatureSpec("item", "sequence", num_embeddings=1000,
                                         embedding_dim=4, max_len=cap, timestamps="ts")],
                   labels=[LabelSpec("label")]).save(root)
            pq.write_table(pa.table({
                "item": pa.array([[1] * n for n in lengths], pa.list_(pa.int64())),
                "ts": pa.array([list(range(0, 60 * n, 60)) for n in lengths],
                               pa.list_(pa.int64())),
                "label": pa.array(np.zeros(rows, np.float32))}),
                os.path.join(root, "train", "part-00000.parquet"), row_group_size=16)
            torch.manual_seed(0)
            layer = HSTULayer(dim, heads, cap, num_time_buckets=128, impl="auto")
            # Warm-up outside the timing: the first call loads (or builds) the kernel.
            layer(torch.randn(4, dim, requires_grad=True), torch.tensor([0, 4]),
                  torch.arange(4)).sum().backward()
            settings = [("plain", {}),
                        ("balanced", {"balance_batches": 8, "balance_cost": "attention"}),
                        ("balanced+hstu_sampling",
                         {"balance_batches": 8, "balance_cost": "attention",
                          "length_sampling": LengthSampling("hstu", alpha=1.6)})]
            for name, kw in settings:
                readers = [ParquetReader(root, "train", batch, rank=r, world_size=ranks,
                                         shuffle=True, seed=0, prefetch=0, **kw)
                           for r in range(ranks)]
                spreads, cpu_spreads, cost_spreads, steps, tokens = [], [], [], [], 0
                for batches in zip(*readers):
                    times, cpu_times, costs = [], [], []
                    for b in batches:
                        lens = b.sequence["item"].lengths().long()
                        # The attention term dominates a long batch: Σ L² (+ Σ L, linear).
                        costs.append(float((lens * lens).sum() + lens.sum() * dim))
                        offsets = torch.cat([lens.new_zeros(1), lens.cumsum(0)])
                        x = torch.randn(int(offsets[-1]), dim, requires_grad=True)
                        t0, c0 = time.perf_counter(), time.thread_time()
                        layer(x, offsets, b.timestamps["item"].values()).sum().backward()
                        times.append(time.perf_counter() - t0)
                        cpu_times.append(time.thread_time() - c0)
                        tokens += int(offsets[-1])
                    spreads.append(max(times) / (sum(times) / len(times)))
                    cpu_spreads.append(max(cpu_times) / (sum(cpu_times) / len(cpu_times)))
                    cost_spreads.append(max(costs) / (sum(costs) / len(costs)))
                    steps.append(max(times))
                out.append({"batches": name, "ranks": ranks, "steps": len(steps),
                            "spread": float(np.mean(spreads)),
                            "spread_cpu": float(np.mean(cpu_spreads)),
                            "cost_spread": float(np.mean(cost_spreads)),
                            "step_s": float(np.mean(steps)),
                            "tokens_per_s": tokens / ranks / float(np.sum(steps))})
    finally:
        torch.set_num_threads(threads)
    return out


def compiled_check(threads: int, repeats: int = 5) -> List[Dict[str, Any]]:
    """``--compiled-check``: compiled_jagged vs pytorch_jagged on the long-tailed batches,
    wall and CPU time (see the module docstring); one row per workload."""
    from models.hstu.attention import hstu_attention
    from models.hstu.layer import HSTULayer

    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)

    def clocks(step: Any, reps: int) -> Tuple[float, float]:
        step()
        wall, cpu = [], []
        for _ in range(reps):
            w0, c0 = time.perf_counter(), time.process_time()
            step()
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
        return float(np.median(wall)), float(np.median(cpu))

    rows = []
    for name, lengths in (("longtail-8", longtail_lengths(8, 256, MAX_LEN, seed=1)),
                          ("longtail-64", longtail_lengths(64, 256, MAX_LEN, seed=2))):
        torch.manual_seed(0)
        offsets = torch.tensor([0, *lengths]).cumsum(0)
        total = int(offsets[-1])
        ts = torch.cat([torch.randint(1, 100_000, (n,)).cumsum(0) for n in lengths])
        layer = HSTULayer(DIM, HEADS, MAX_LEN, num_time_buckets=128)
        x = torch.randn(total, DIM, requires_grad=True)
        q, k, v = (torch.randn(total, HEADS, DIM // HEADS, requires_grad=True)
                   for _ in range(3))
        flops = attention_flops(lengths, HEADS, DIM // HEADS)
        got: Dict[str, Dict[str, List[float]]] = {"pytorch_jagged": {}, "compiled_jagged": {}}
        mm_wall, mm_cpu = [], []
        for _ in range(repeats):  # in turns, so a burst of load hits both alike
            w, c = clocks(lambda: [torch.mm(a, b) for _ in range(4)], 1)
            mm_wall.append(4 * 2 * 1024**3 / w)
            mm_cpu.append(4 * 2 * 1024**3 / c)
            for impl, res in got.items():
                layer.impl = impl

                def attention() -> None:
                    hstu_attention(q, k, v, offsets, MAX_LEN, layer.rab_pos, layer.rab_time,
                                   ts, impl=layer.impl).sum().backward()

                for key, step in (("attn", attention),
                                  ("layer", lambda: layer(x, offsets, ts).sum().backward())):
                    w, c = clocks(step, 1)
                    res.setdefault(key + "_wall", []).append(w)
                    res.setdefault(key + "_cpu", []).append(c)
        med = {impl: {key: float(np.median(val)) for key, val in res.items()}
               for impl, res in got.items()}
        base, mine = med["pytorch_jagged"], med["compiled_jagged"]
        mw, mc = float(np.median(mm_wall)), float(np.median(mm_cpu))
        rows.append({"workload": name, "threads": threads,
                     "matmul_GFLOP/s_wall": mw / 1e9, "matmul_GFLOP/s_cpu": mc / 1e9,
                     "attn/matmul_wall": flops / mine["attn_wall"] / mw,
                     "attn/matmul_cpu": flops / mine["attn_cpu"] / mc,
                     "jagged_attn/matmul_cpu": flops / base["attn_cpu"] / mc,
                     "layer_speedup_wall": base["layer_wall"] / mine["layer_wall"],
                     "layer_speedup_cpu": base["layer_cpu"] / mine["layer_cpu"],
                     "attn_speedup_cpu": base["attn_cpu"] / mine["attn_cpu"]})
    return rows


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
    p.add_argument("--compiled-check", action="store_true",
                   help="only compiled_jagged's goals on the long-tailed batches, wall and CPU "
                        "time (quick; for a shared machine)")
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op threads for --compiled-check (default: torch's)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.worker:
        print(json.dumps(worker(json.loads(ns.worker))))
        return 0
    if ns.compiled_check:
        check = compiled_check(ns.threads or torch.get_num_threads())
        print("compiled_jagged goals (attn/matmul >= 0.40, layer >= 1.5x pytorch_jagged); "
              "wall and process CPU time")
        print(format_table(check, ["workload", "threads", "matmul_GFLOP/s_wall",
                                   "matmul_GFLOP/s_cpu", "attn/matmul_wall", "attn/matmul_cpu",
                                   "jagged_attn/matmul_cpu", "layer_speedup_wall",
                                   "layer_speedup_cpu", "attn_speedup_cpu"]))
        if ns.json:
            write_results("hstu_compiled_check", {"compiled_check": check}, ns.json)
        return 0

    if ns.quick:
        dim, heads, max_len, mean = QUICK["dim"], QUICK["heads"], QUICK["max_len"], QUICK["mean"]
        ub, ul = QUICK["uniform"]
        small, big = QUICK["tail_batches"]
    else:
        dim, heads, max_len, mean, ub, ul, small, big = DIM, HEADS, MAX_LEN, 256, 64, 256, 8, 64
    gpu = torch.cuda.is_available()
    extra = ["triton"] if gpu else []
    long = LONG_QUICK if ns.quick else LONG
    workloads = [
        ("uniform", [ul] * ub, ["pytorch_jagged", "compiled_jagged", "pytorch_padded", "loop"]
         + extra),
        (f"longtail-{small}", longtail_lengths(small, mean, max_len, seed=1),
         ["pytorch_jagged", "compiled_jagged", "pytorch_padded", "loop"] + extra),
        (f"longtail-{big}", longtail_lengths(big, mean, max_len, seed=2),
         ["pytorch_jagged", "compiled_jagged", "loop"] + extra),
        (f"long-{long['max_len']}", long["lengths"],
         ["pytorch_jagged", "compiled_jagged", "semi_local"]),
    ]
    flops = matmul_flops(256 if ns.quick else 1024)
    rows: List[Dict[str, Any]] = []
    for name, lengths, contenders in workloads:
        padded_cells = len(lengths) * max(lengths) ** 2
        jagged_cells = sum(n * n for n in lengths)
        for impl in contenders:
            slow = impl == "pytorch_padded" and name.startswith("longtail") and not ns.quick
            is_long = name.startswith("long-")
            spec = {"workload": name, "impl": impl, "lengths": lengths, "dim": dim,
                    "heads": heads, "max_len": long["max_len"] if is_long else max_len,
                    "warmup": 0 if slow else 1, "repeats": 1 if slow or ns.quick else 3,
                    "window": long["window"], "global_tokens": long["global"],
                    "profile": impl in ("pytorch_jagged", "compiled_jagged")
                    and name == workloads[2][0]}
            # --quick stays in-process: a fresh interpreter per contender costs seconds on a
            # loaded CI machine, and the smoke test checks only that the numbers are finite.
            res = worker(spec) if ns.quick else run_contender(spec)
            rows.append({"workload": name, "B": len(lengths), "max_L": max(lengths),
                         "sum_L2/B_maxL2": jagged_cells / padded_cells, "impl": impl,
                         "profile": None, **res,
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
    profiles = [p for p in (r.pop("profile") for r in rows) if p]
    for prof in profiles:
        print(f"{prof['impl']} attention op, {workloads[2][0]}: "
              f"{prof['self_ms_per_step']:.0f} ms of CPU per forward + backward")
        print(format_table(prof["top_ops"], ["op", "self_ms_per_step", "share",
                                             "calls_per_step"]))
    goals = compiled_goals(rows, [w[0] for w in workloads if w[0].startswith("longtail")])
    print("compiled_jagged goals (attn/matmul >= 0.40, layer >= 1.5x pytorch_jagged):")
    print(format_table(goals, ["workload", "attn/matmul", "layer_speedup", "goals_met"]))
    semi, spread = print_long_sections(rows, workloads[3][0], long, ns.quick)
    payload = {"quick": ns.quick, "matmul_flops": flops, "results": rows, "ratios": ratios,
               "profiles": profiles, "compiled_goals": goals, "semi_local": semi,
               "balance_spread": spread}
    write_results("hstu_attention_quick" if ns.quick else "hstu_attention", payload, ns.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
