"""Triton kernels for :func:`models.hstu.attention.hstu_attention` (``impl="triton"``).

Both kernels read the jagged ``[ΣLᵢ, H, d]`` tensors in place through ``offsets``; nothing is
padded. The relative attention bias (position and time-gap bucket) is computed inside the
kernels from ``rab_pos``, ``rab_time`` and the timestamps, never materialised.

* forward: one program per (query block, sequence, head); it loops over the key blocks on or
  below the causal diagonal, accumulating ``SiLU(q kᵀ + rab) / n · v`` in fp32.
* backward: one program per (key block, sequence, head); it loops over the query blocks on or
  below the diagonal, recomputes the scores, and accumulates ``dK`` and ``dV`` in registers.
  ``dQ`` (shared by all key blocks of a sequence) and the bias gradients (shared by all heads
  and positions) are accumulated with fp32 atomic adds.

``triton.jit`` decides at decoration time, i.e. when this module is imported, whether the
kernels are compiled or interpreted. :func:`models.hstu.attention.hstu_attention` imports it
only on the first ``impl="triton"`` call, so setting ``TRITON_INTERPRET=1`` before that call
(as the tests do) runs the kernels on CPU tensors through the interpreter. The kernels use
only ``tl`` builtins (no ``tl.sigmoid`` or ``tl.zeros``): the library's own ``@jit`` helpers
are decorated when ``triton`` is first imported, possibly before the interpreter was switched on.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Tuple

import torch
import triton
import triton.language as tl

from models.hstu.jagged import next_timestamps

BLOCK_M = 16
BLOCK_N = 16


@triton.jit
def _scores_and_bias(q, k, offs_m, offs_n, seq_len, ts_next_i, TS, seq_start, RP, RT,
                    n_pos, n_buckets, HAS_TIME: tl.constexpr):
    """fp32 ``q kᵀ + rab`` for one (query block, key block), the causal mask, the
    clamped relative positions and the time buckets."""
    s = tl.dot(q, tl.trans(k))
    rel = offs_m[:, None] - offs_n[None, :]
    causal = (rel >= 0) & (offs_m[:, None] < seq_len) & (offs_n[None, :] < seq_len)
    rel = tl.minimum(tl.maximum(rel, 0), n_pos - 1)
    s += tl.load(RP + rel, mask=causal, other=0.0)
    bucket = rel * 0
    if HAS_TIME:
        ts_j = tl.load(TS + seq_start + offs_n, mask=offs_n < seq_len, other=0)
        gap = tl.abs(ts_next_i[:, None] - ts_j[None, :])
        gap = tl.maximum(gap, 1).to(tl.float32)
        bucket = tl.floor(tl.log(gap) / 0.301).to(tl.int32)  # = TIME_BUCKET_DIVISOR
        bucket = tl.minimum(tl.maximum(bucket, 0), n_buckets)
        s += tl.load(RT + bucket, mask=causal, other=0.0)
    return s, causal, rel, bucket

@triton.jit
def _fwd_kernel(Q, K, V, O, OFF, TS, TSN, RP, RT, heads, inv_n, n_pos, n_buckets,
        D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, HAS_TIME: tl.constexpr):
    pid_m, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_start = tl.load(OFF + b)
    seq_len = tl.load(OFF + b + 1) - seq_start
    m0 = pid_m * BM
    if m0 < seq_len:
        offs_m = m0 + tl.arange(0, BM)
        offs_d, offs_dv = tl.arange(0, BD), tl.arange(0, BDV)
        row_m = (seq_start + offs_m) * heads + h
        m_ok = offs_m < seq_len
        q = tl.load(Q + row_m[:, None] * D + offs_d[None, :],
                    mask=m_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        ts_next_i = tl.load(TSN + seq_start + offs_m, mask=m_ok, other=0)
        acc = tl.full((BM, BDV), 0.0, tl.float32)
        for n0 in range(0, m0 + BM, BN):
            offs_n = n0 + tl.arange(0, BN)
            row_n = (seq_start + offs_n) * heads + h
            n_ok = offs_n < seq_len
            k = tl.load(K + row_n[:, None] * D + offs_d[None, :],
                        mask=n_ok[:, None] & (offs_d[None, :] < D), other=0.0)
            v = tl.load(V + row_n[:, None] * DV + offs_dv[None, :],
                        mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
            s, causal, rel, bucket = _scores_and_bias(
                q, k, offs_m, offs_n, seq_len, ts_next_i, TS, seq_start, RP, RT,
                n_pos, n_buckets, HAS_TIME)
            a = tl.where(causal, s / (1.0 + tl.exp(-s)) * inv_n, 0.0)
            acc += tl.dot(a.to(v.dtype), v)
        tl.store(O + row_m[:, None] * DV + offs_dv[None, :], acc.to(O.dtype.element_ty),
                 mask=m_ok[:, None] & (offs_dv[None, :] < DV))

@triton.jit
def _bwd_kernel(Q, K, V, DO, DQ, DK, DV_, DRP, DRT, OFF, TS, TSN, RP, RT, heads, inv_n, n_pos,
        n_buckets, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr,
        BDV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HAS_TIME: tl.constexpr):
    pid_n, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_start = tl.load(OFF + b)
    seq_len = tl.load(OFF + b + 1) - seq_start
    n0 = pid_n * BN
    if n0 < seq_len:
        offs_n = n0 + tl.arange(0, BN)
        offs_d, offs_dv = tl.arange(0, BD), tl.arange(0, BDV)
        row_n = (seq_start + offs_n) * heads + h
        n_ok = offs_n < seq_len
        k = tl.load(K + row_n[:, None] * D + offs_d[None, :],
                    mask=n_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        v = tl.load(V + row_n[:, None] * DV + offs_dv[None, :],
                    mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        dk = tl.full((BN, BD), 0.0, tl.float32)
        dv = tl.full((BN, BDV), 0.0, tl.float32)
        for m0 in range((n0 // BM) * BM, seq_len, BM):
            offs_m = m0 + tl.arange(0, BM)
            row_m = (seq_start + offs_m) * heads + h
            m_ok = offs_m < seq_len
            q = tl.load(Q + row_m[:, None] * D + offs_d[None, :],
                        mask=m_ok[:, None] & (offs_d[None, :] < D), other=0.0)
            do = tl.load(DO + row_m[:, None] * DV + offs_dv[None, :],
                         mask=m_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
            ts_next_i = tl.load(TSN + seq_start + offs_m, mask=m_ok, other=0)
            s, causal, rel, bucket = _scores_and_bias(
                q, k, offs_m, offs_n, seq_len, ts_next_i, TS, seq_start, RP, RT,
                n_pos, n_buckets, HAS_TIME)
            sig = 1.0 / (1.0 + tl.exp(-s))
            a = tl.where(causal, s * sig * inv_n, 0.0)
            dv += tl.dot(tl.trans(a).to(do.dtype), do)
            da = tl.dot(do, tl.trans(v))
            # d SiLU(s)/ds = σ(s)·(1 + s·(1 − σ(s)))
            ds = tl.where(causal, da * sig * (1.0 + s * (1.0 - sig)) * inv_n, 0.0)
            dk += tl.dot(tl.trans(ds).to(q.dtype), q)
            dq = tl.dot(ds.to(k.dtype), k)
            tl.atomic_add(DQ + row_m[:, None] * D + offs_d[None, :], dq,
                          mask=m_ok[:, None] & (offs_d[None, :] < D))
            tl.atomic_add(DRP + rel, ds, mask=causal)
            if HAS_TIME:
                tl.atomic_add(DRT + bucket, ds, mask=causal)
        tl.store(DK + row_n[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty),
                 mask=n_ok[:, None] & (offs_d[None, :] < D))
        tl.store(DV_ + row_n[:, None] * DV + offs_dv[None, :], dv.to(DV_.dtype.element_ty),
                 mask=n_ok[:, None] & (offs_dv[None, :] < DV))



def _block(dim: int) -> int:
    # tl.dot needs every block dimension to be a power of two and at least 16.
    return max(16, 1 << (dim - 1).bit_length())


class _HSTUAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                offsets: torch.Tensor, max_seq_len: int, rab_pos: torch.Tensor,
                rab_time: torch.Tensor, timestamps: torch.Tensor, ts_next: torch.Tensor,
                has_time: bool) -> torch.Tensor:
        total, heads, d = q.shape
        dv = v.shape[-1]
        out = torch.empty(total, heads, dv, dtype=v.dtype, device=v.device)
        longest = int(offsets.diff().max()) if offsets.numel() > 1 else 0
        if total and longest:
            grid = ((longest + BLOCK_M - 1) // BLOCK_M, offsets.numel() - 1, heads)
            _fwd_kernel[grid](q, k, v, out, offsets, timestamps, ts_next, rab_pos, rab_time, heads,
                      1.0 / max_seq_len, max_seq_len, rab_time.numel() - 1, D=d, DV=dv,
                      BD=_block(d), BDV=_block(dv), BM=BLOCK_M, BN=BLOCK_N,
                      HAS_TIME=has_time)
        ctx.save_for_backward(q, k, v, offsets, rab_pos, rab_time, timestamps, ts_next)
        ctx.meta = (max_seq_len, has_time, longest)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        q, k, v, offsets, rab_pos, rab_time, timestamps, ts_next = ctx.saved_tensors
        max_seq_len, has_time, longest = ctx.meta
        total, heads, d = q.shape
        dv_dim = v.shape[-1]
        grad_out = grad_out.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        drp = torch.zeros(rab_pos.shape, dtype=torch.float32, device=q.device)
        drt = torch.zeros(rab_time.shape, dtype=torch.float32, device=q.device)
        if total and longest:
            grid = ((longest + BLOCK_N - 1) // BLOCK_N, offsets.numel() - 1, heads)
            _bwd_kernel[grid](q, k, v, grad_out, dq, dk, dv, drp, drt, offsets, timestamps, ts_next,
                      rab_pos, rab_time, heads, 1.0 / max_seq_len, max_seq_len,
                      rab_time.numel() - 1, D=d, DV=dv_dim, BD=_block(d), BDV=_block(dv_dim),
                      BM=BLOCK_M, BN=BLOCK_N, HAS_TIME=has_time)
        else:
            dk.zero_()
            dv.zero_()
        return (dq.to(q.dtype), dk, dv, None, None, drp.to(rab_pos.dtype),
                drt.to(rab_time.dtype) if has_time else None, None, None, None)


def triton_hstu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          offsets: torch.Tensor, max_seq_len: int, rab_pos: torch.Tensor,
                          rab_time: Optional[torch.Tensor] = None,
                          timestamps: Optional[torch.Tensor] = None,
                          query_timestamps: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``hstu_attention`` through the Triton kernels; arguments as there.

    Raises:
        RuntimeError: CPU tensors without ``TRITON_INTERPRET=1`` (compiled Triton kernels
            need a GPU).
    """
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("hstu_attention impl='triton' got CPU tensors: compiled Triton "
                           "kernels need a GPU; set TRITON_INTERPRET=1 to interpret them on "
                           "CPU (slow, for tests) or use impl='pytorch_jagged'")
    has_time = rab_time is not None
    offsets = offsets.to(torch.int64).contiguous()
    if has_time:
        assert timestamps is not None
        timestamps = timestamps.to(torch.int64).contiguous()
        ts_next = (next_timestamps(timestamps, offsets) if query_timestamps is None
                   else query_timestamps.to(torch.int64)).contiguous()
    else:
        # Dummies: the kernels never read them when HAS_TIME is False.
        rab_time = rab_pos.new_zeros(1)
        timestamps = ts_next = torch.zeros(1, dtype=torch.int64, device=q.device)
    return _HSTUAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), offsets,
                                max_seq_len, rab_pos.contiguous(), rab_time, timestamps,
                                ts_next, has_time)
