"""Validate the HSTU Triton kernel on a GPU in one command: parity, then speed.

``python -m bench.triton_gpu_check [--json PATH]`` on a machine with a CUDA device;
``python -m bench.triton_gpu_check --cpu-smoke`` checks this script's own logic without one
(the fp32 parity cases run through the Triton interpreter at tiny sizes — it has no bf16 —
and the speed section times only the CPU contenders).

Parity (exit code 1 if any case fails): ``impl="triton"`` against ``pytorch_padded``
computed in fp64 from the same inputs, output and the gradients of ``q, k, v, rab_pos,
rab_time`` for a random linear loss, on every shape class the CPU tests use: empty and
length-1 sequences, lengths inside one block and across several, one at the configured
maximum (relative positions clamped), with and without the time bias, explicit query
timestamps, an all-empty batch, and bf16 inputs. Tolerance: ``|got − want| ≤ 2e-3 ·
max|want| + 1e-5`` for fp32 (fp32 accumulation and atomic adds of the bias gradients over
``ΣLᵢ²`` pairs), ``3e-2 ·`` for bf16.

Speed (forward + backward of the attention op, median of 5 after 2 warm-ups, long-tailed
batches of B = 8 and 64 as in ``bench.hstu_attention``: log-normal lengths, mean 256, the
longest 4,096, H = 4, d = 64): Triton on the GPU against the compiled CPU kernel's algorithm
— the same causal tiles, one matmul per tile for the scores and one for ``A V`` with the
bias/SiLU/mask pass between them — run as ``pytorch_jagged`` on the GPU, and against
``compiled_jagged`` itself on this machine's CPU. The useful FLOP/s of each
(``12 · d · H · Σ Lᵢ(Lᵢ+1)/2``) is printed beside the GPU's fp32 matmul FLOP/s.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from bench.common import format_table
from data.cli import ArgumentParser
from bench.hstu_attention import attention_flops, longtail_lengths

MAX_LEN = 48
BUCKETS = 8
# (name, lengths, with_time, query_timestamps)
CASES = [
    ("mixed", [5, 0, 1, 48, 0, 25, 33, 1, 48], False, False),
    ("mixed_time", [5, 0, 1, 48, 0, 25, 33, 1, 48], True, False),
    ("multi_block", [150, 3, 64, 65, 0, 17], True, False),
    ("query_ts", [5, 0, 1, 20, 26], True, True),
    ("all_empty", [0, 0], True, False),
]
SMOKE_CASES = [("mixed_time", [5, 0, 1, 20], True, False), ("query_ts", [3, 0, 18], True, True),
               ("all_empty", [0, 0], True, False)]


def make_inputs(lengths: Sequence[int], heads: int, dim: int, with_time: bool, query_ts: bool,
                seed: int, n: int = MAX_LEN) -> Dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    gaps = torch.exp(torch.rand(total, generator=g) * 11).to(torch.int64)
    ts = torch.cat([x.cumsum(0) for x in gaps.split(list(lengths))]) if total else gaps
    return {
        "q": torch.randn(total, heads, dim, generator=g),
        "k": torch.randn(total, heads, dim, generator=g),
        "v": torch.randn(total, heads, dim + 1, generator=g),
        "rab_pos": torch.randn(n, generator=g),
        "rab_time": torch.randn(BUCKETS + 1, generator=g) if with_time else None,
        "timestamps": ts if with_time else None,
        "query_timestamps": ts + torch.randint(0, 10 ** 5, (total,), generator=g)
        if with_time and query_ts else None,
        "offsets": torch.tensor([0, *lengths]).cumsum(0),
        "n": n,
    }


def run_attention(inp: Dict[str, Any], impl: str, device: str, dtype: torch.dtype
                  ) -> List[torch.Tensor]:
    """Output and the gradients of q, k, v, rab_pos (and rab_time), as fp64 on the CPU."""
    from models.hstu.attention import hstu_attention

    bias_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = {key: inp[key].to(device, dtype if key in "qkv" else bias_dtype)
              .requires_grad_() for key in ("q", "k", "v", "rab_pos", "rab_time")
              if inp[key] is not None}
    ts = None if inp["timestamps"] is None else inp["timestamps"].to(device)
    tq = None if inp["query_timestamps"] is None else inp["query_timestamps"].to(device)
    out = hstu_attention(leaves["q"], leaves["k"], leaves["v"], inp["offsets"].to(device),
                         inp["n"], leaves["rab_pos"], leaves.get("rab_time"), ts, impl=impl,
                         query_timestamps=tq)
    weight = torch.cos(torch.arange(out.numel(), device=device, dtype=torch.float64)
                       ).reshape(out.shape)
    (out.double() * weight).sum().backward()
    # An all-empty batch leaves the bias parameters unused: their gradient is zero.
    return [out.detach().double().cpu()] + [
        (x.grad if x.grad is not None else torch.zeros_like(x)).double().cpu()
        for x in leaves.values()]


def parity(device: str, cases: Sequence[Any], heads: int, dim: int, bf16: bool = True
           ) -> List[Dict[str, Any]]:
    rows = []
    dtypes = ((torch.float32, 2e-3), (torch.bfloat16, 3e-2)) if bf16 else ((torch.float32, 2e-3),)
    for dtype, tol in dtypes:
        for name, lengths, with_time, query_ts in cases:
            inp = make_inputs(lengths, heads, dim, with_time, query_ts, seed=len(rows))
            want = run_attention(inp, "pytorch_padded", "cpu", torch.float64)
            # bf16 inputs: the reference sees the same rounded values.
            if dtype == torch.bfloat16:
                for key in ("q", "k", "v"):
                    inp[key] = inp[key].to(torch.bfloat16).double()
                want = run_attention(inp, "pytorch_padded", "cpu", torch.float64)
            got = run_attention(inp, "triton", device, dtype)
            worst = 0.0
            for a, b in zip(got, want):
                scale = float(b.abs().max()) if b.numel() else 0.0
                err = float((a - b).abs().max()) if b.numel() else 0.0
                worst = max(worst, err / (tol * scale + 1e-5))
            rows.append({"case": name, "dtype": str(dtype).split(".")[-1],
                         "lengths": len(lengths), "worst_err/tol": worst, "ok": worst <= 1.0})
    return rows


def timed(step: Callable[[], None], sync: Callable[[], None], warmup: int, repeats: int
          ) -> float:
    for _ in range(warmup):
        step()
    sync()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync()
        samples.append(time.perf_counter() - t0)
    return float(np.median(samples))


def speed(gpu: bool, smoke: bool) -> List[Dict[str, Any]]:
    from models.hstu.attention import hstu_attention

    heads, dim, n, mean = (2, 8, 64, 16) if smoke else (4, 64, 4096, 256)
    warmup, repeats = (0, 1) if smoke else (2, 5)
    contenders = [("triton", "cuda"), ("pytorch_jagged", "cuda")] if gpu else []
    contenders.append(("compiled_jagged", "cpu"))
    rows = []
    for batch in ((2, 4) if smoke else (8, 64)):
        lengths = longtail_lengths(batch, mean, n, seed=batch)
        inp = make_inputs(lengths, heads, dim, True, False, seed=batch, n=n)
        for impl, device in contenders:
            leaves = [inp[key].to(device).requires_grad_() for key in ("q", "k", "v")]
            rab_pos, rab_time = inp["rab_pos"].to(device), inp["rab_time"].to(device)
            offsets, ts = inp["offsets"].to(device), inp["timestamps"].to(device)

            def step() -> None:
                out = hstu_attention(*leaves, offsets, n, rab_pos, rab_time, ts, impl=impl)
                out.sum().backward()

            sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
            seconds = timed(step, sync, warmup, repeats)
            rows.append({"workload": f"longtail-{batch}", "impl": impl, "device": device,
                         "seconds": seconds,
                         "GFLOP/s": attention_flops(lengths, heads, dim) / seconds / 1e9})
    return rows


def gpu_matmul_flops(n: int = 4096) -> float:
    a, b = torch.randn(n, n, device="cuda"), torch.randn(n, n, device="cuda")
    seconds = timed(lambda: torch.mm(a, b), torch.cuda.synchronize, 3, 10)
    return 2.0 * n ** 3 / seconds


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = ArgumentParser(prog="python -m bench.triton_gpu_check",
                       description=__doc__.split("\n")[0])
    p.add_argument("--cpu-smoke", action="store_true",
                   help="no GPU: interpreter parity at tiny sizes, CPU contenders only")
    p.add_argument("--json", help="also write the results here")
    ns = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    if not gpu and not ns.cpu_smoke:
        print("error: no CUDA device; run this on a GPU machine, or --cpu-smoke to check the "
              "script itself", file=sys.stderr)
        return 2
    if ns.cpu_smoke:
        # Must be set before models.hstu.triton_attention is imported (see its docstring).
        os.environ["TRITON_INTERPRET"] = "1"
        gpu = False
    try:
        import triton  # noqa: F401
    except ImportError:
        print("error: triton is not installed (pip install triton)", file=sys.stderr)
        return 2
    device = "cuda" if gpu else "cpu"
    # The interpreter runs the kernels through numpy, which has no bf16: fp32 only there.
    checks = parity(device, SMOKE_CASES if ns.cpu_smoke else CASES, heads=2, dim=4,
                    bf16=gpu)
    print(f"parity: triton on {device} vs pytorch_padded in fp64")
    print(format_table(checks, ["case", "dtype", "lengths", "worst_err/tol", "ok"]))
    timings = speed(gpu, ns.cpu_smoke)
    flops = gpu_matmul_flops() if gpu else None
    if flops:
        print(f"GPU fp32 matmul: {flops / 1e9:,.0f} GFLOP/s")
    print("speed: attention forward + backward")
    print(format_table(timings, ["workload", "impl", "device", "seconds", "GFLOP/s"]))
    for w in sorted({r["workload"] for r in timings}):
        by = {r["impl"]: r for r in timings if r["workload"] == w}
        if "triton" in by:
            print(f"{w}: triton is {by['pytorch_jagged']['seconds'] / by['triton']['seconds']:.2f}x "
                  f"pytorch_jagged (same GPU) and "
                  f"{by['compiled_jagged']['seconds'] / by['triton']['seconds']:.1f}x "
                  f"compiled_jagged (CPU)")
    ok = all(c["ok"] for c in checks)
    payload = {"device": torch.cuda.get_device_name() if gpu else "cpu (smoke)",
               "parity": checks, "speed": timings, "gpu_matmul_flops": flops, "ok": ok}
    if ns.json:
        tmp = ns.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, ns.json)
    print("PARITY OK" if ok else "PARITY FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
