"""``compiled_jagged``: the causal HSTU jagged attention as a compiled C++ CPU kernel.

Same op as :func:`models.hstu.attention.hstu_attention` (``[ΣLᵢ, H, d]`` jagged ``q, k``,
``[ΣLᵢ, H, d_v]`` ``v``, ``offsets [B + 1]`` → ``[ΣLᵢ, H, d_v]``), computed by
``csrc/jagged_attention.cpp``: the operands are packed once into head-major, SIMD-padded
buffers; every tile product is one register-blocked micro-kernel; the forward runs per query
tile (bias once per (i, j) for all heads, then per head ``S = Q Kᵀ``, one vectorised pass for
the bias, SiLU, ``1/n`` and the mask, ``O += A V``), the backward per key block (its ``dK``,
``dV`` accumulated in the item, ``dQ`` added under a per-tile lock, bias gradients per
worker in double). No Python or ATen op runs per tile; work items are pulled dynamically by
the intra-op threads, largest first.

The extension is built with the machine's C++ compiler by ``torch.utils.cpp_extension`` the
first time it is needed (``make setup`` builds it ahead: ``python -m models.hstu.compiled
--build``) and cached under ``$TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``). Where it cannot be built (no compiler, no ninja) the op logs
one line and falls back to ``pytorch_jagged``, which computes the same values.

fp32 and fp64 run natively; bf16/fp16 inputs are computed in the bias parameters' dtype
(fp32) and cast back.

Example:
    >>> offsets = torch.tensor([0, 3, 3, 4])  # lengths 3, 0, 1
    >>> q, k, v = (torch.randn(4, 2, 8) for _ in range(3))
    >>> compiled_jagged_attention(q, k, v, offsets, 16, torch.zeros(16)).shape
    torch.Size([4, 2, 8])
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import sys
from typing import Any, List, Optional, Tuple

import torch

from models.hstu.jagged import next_timestamps, time_buckets

__all__ = ["compiled_jagged_attention", "kernel_for", "load_kernel"]

logger = logging.getLogger(__name__)

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc",
                       "jagged_attention.cpp")
_NAME = "shardrec_hstu_jagged_attention"
_kernel: Any = None
_tried = False


def _cpu_flags() -> str:
    """The CPU's feature flags (``/proc/cpuinfo``), empty where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _cflags() -> List[str]:
    """-O3, fast math (infinities stay honoured), OpenMP (``at::parallel_for`` runs on
    torch's intra-op threads only when the extension is built with it) and, on x86-64,
    ``-march=native``: the micro-kernels use 512-bit vectors where the CPU has AVX-512."""
    flags = ["-O3", "-ffast-math", "-fno-finite-math-only", "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-march=native")
    return flags


def _name() -> str:
    """The extension's cache name, tagged with this CPU's features (``-march=native`` code
    from another CPU, in a shared ``$TORCH_EXTENSIONS_DIR``, is never loaded here) and the
    paths the build command names (the source, torch's headers as this interpreter found
    them): two checkouts, or one virtualenv reached by two paths (a symlink), sharing the
    cache each keep their own build (one name for both makes ninja rebuild, ~1 min, under a
    lock the other processes wait on, whenever the other one loaded it last)."""
    import hashlib

    paths = f"{_SOURCE} {os.path.dirname(torch.__file__)}"
    tag = hashlib.sha1(f"{platform.machine()} {_cpu_flags()} {paths}".encode()
                       ).hexdigest()[:10]
    return f"{_NAME}_{tag}"


@functools.lru_cache(maxsize=16)
def bucket_thresholds(num_buckets: int) -> torch.Tensor:
    """``[num_buckets]`` int64: entry ``b − 1`` is the smallest gap whose
    :func:`~models.hstu.jagged.time_buckets` bucket is ``≥ b`` (found by a vectorised binary
    search over that very function, so the kernel's integer comparisons reproduce it
    exactly); ``2⁶²`` where no gap below it reaches ``b``."""
    target = torch.arange(1, num_buckets + 1)
    lo, hi = torch.ones(num_buckets, dtype=torch.int64), torch.full((num_buckets,), 1 << 62)
    while bool((lo < hi).any()):
        mid = (lo + hi) // 2
        ok = time_buckets(mid, num_buckets) >= target
        hi, lo = torch.where(ok, mid, hi), torch.where(ok, lo, mid + 1)
    return lo


def load_kernel(verbose: bool = False) -> Any:
    """The compiled extension module (built on first use, then cached), or None — with one
    log line saying why — where it cannot be built."""
    global _kernel, _tried
    if _tried:
        return _kernel
    _tried = True
    try:
        from torch.utils.cpp_extension import load

        _kernel = load(name=_name(), sources=[_SOURCE], extra_cflags=_cflags(),
                       extra_ldflags=["-fopenmp"], verbose=verbose)
    except Exception as e:  # noqa: BLE001 — any build failure means: use the fallback
        reason = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())[-400:]
        logger.warning("compiled_jagged: cannot build the C++ attention kernel (%s: %s); "
                       "falling back to pytorch_jagged", type(e).__name__, reason)
        _kernel = None
    return _kernel


class _CompiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                rab_pos: torch.Tensor, rab_time: Optional[torch.Tensor],
                offsets: torch.Tensor, ts: torch.Tensor, ts_next: torch.Tensor,
                max_seq_len: int, block: int, kernel: Any) -> torch.Tensor:
        rt = rab_time if rab_time is not None else rab_pos.new_zeros(0)
        thr = bucket_thresholds(rt.numel() - 1) if rab_time is not None else ts
        out = kernel.forward(q, k, v, offsets, rab_pos, rt, ts, ts_next, thr, max_seq_len,
                             block)
        ctx.save_for_backward(q, k, v, rab_pos, rt, offsets, ts, ts_next, thr)
        ctx.has_time, ctx.n, ctx.block, ctx.kernel = rab_time is not None, max_seq_len, \
            block, kernel
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        q, k, v, rab_pos, rt, offsets, ts, ts_next, thr = ctx.saved_tensors
        dq, dk, dv, d_pos, d_time = ctx.kernel.backward(q, k, v, grad.to(v.dtype).contiguous(),
                                                        offsets, rab_pos, rt, ts, ts_next, thr,
                                                        ctx.n, ctx.block)
        return (dq, dk, dv, d_pos, d_time if ctx.has_time else None,
                None, None, None, None, None, None)


def kernel_for(q: torch.Tensor) -> Optional[Any]:
    """The compiled kernel for ``q``'s device: None off the CPU or where it cannot be built
    (logged once by :func:`load_kernel`)."""
    return load_kernel() if q.device.type == "cpu" else None


def compiled_jagged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              offsets: torch.Tensor, max_seq_len: int, rab_pos: torch.Tensor,
                              rab_time: Optional[torch.Tensor] = None,
                              timestamps: Optional[torch.Tensor] = None,
                              query_timestamps: Optional[torch.Tensor] = None,
                              block: int = 64) -> torch.Tensor:
    """The compiled kernel (arguments as :func:`models.hstu.attention.hstu_attention`).
    CPU tensors only, on a machine where the kernel builds (:func:`kernel_for`); ``impl=
    "compiled_jagged"`` of :func:`models.hstu.attention.hstu_attention` checks that and falls
    back to ``pytorch_jagged`` otherwise."""
    kernel = kernel_for(q)
    if kernel is None:
        raise RuntimeError("compiled_jagged needs CPU tensors and a kernel that builds here "
                           "(see the log); use impl='pytorch_jagged'")
    if q.shape[0] == 0:
        return v * 0  # keeps the (empty) result connected to the graph
    empty = torch.zeros(0, dtype=torch.int64)
    ts = ts_next = empty
    if timestamps is not None:
        ts = timestamps.to(torch.int64).contiguous()
        ts_next = (next_timestamps(timestamps, offsets) if query_timestamps is None
                   else query_timestamps).to(torch.int64).contiguous()
    # The kernel computes in the bias parameters' dtype (fp32/fp64).
    dtype = rab_pos.dtype
    out = _CompiledAttention.apply(q.to(dtype), k.to(dtype), v.to(dtype), rab_pos,
                                   None if rab_time is None else rab_time.to(dtype),
                                   offsets.to(torch.int64).contiguous(), ts, ts_next,
                                   max_seq_len, block, kernel)
    return out.to(v.dtype)


def main(argv: Optional[list] = None) -> int:
    """``python -m models.hstu.compiled --build``: build (or find) the cached kernel."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["--build"]:
        print("usage: python -m models.hstu.compiled --build", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ok = load_kernel(verbose=False) is not None
    print("compiled_jagged kernel: " + ("ready" if ok else "NOT built (see the warning above; "
                                        "pytorch_jagged is used instead)"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
