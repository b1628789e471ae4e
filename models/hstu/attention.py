"""HSTU jagged attention: ``A = SiLU(Q Kᵀ + rab) / n`` under a causal mask, output ``A V``.

The op works on jagged tensors: ``q``, ``k``, ``v`` hold the tokens of all sequences of a batch
back to back (``[ΣLᵢ, H, d]``), and ``offsets`` (``[B + 1]``, ``offsets[0] = 0``) marks where
sequence ``b`` starts and ends. For a query token ``i`` and a key token ``j`` of the same
sequence (positions inside the sequence):

* ``rab[i, j] = rab_pos[min(i - j, n - 1)] + rab_time[bucket(Δt)]`` (the time term only when
  ``rab_time`` is given). The bias is **shared by all heads**: one scalar per (i, j), as in the
  paper's reference model, so the bias costs ``n + num_buckets + 1`` parameters per layer and
  its ``[ΣLᵢ²]`` term is computed once rather than once per head.
* ``Δt = ts[i + 1] - ts[j]``: query ``i`` is the position that predicts item ``i + 1``, so its
  gap is measured from the next event's time. **Convention for the last token** of a sequence
  (no ``i + 1``): its own time, ``Δt = ts[i] - ts[j]``.
* ``bucket(Δt) = min(⌊ln(max(|Δt|, 1)) / 0.301⌋, num_buckets)`` with
  ``num_buckets = rab_time.numel() - 1``.
* ``A[i, j] = SiLU(q_i · k_j + rab[i, j]) / n`` for ``j ≤ i`` (the diagonal included) and 0
  otherwise; ``n`` is the configured maximum sequence length (not each sequence's own length)
  and there is no ``1/√d`` scaling.
* ``out_i = Σ_j A[i, j] v_j``.

Three implementations sit behind :func:`hstu_attention`:

* ``pytorch_padded`` pads the batch to its longest sequence; short and obviously correct, the
  reference the others are tested against; cost ``B · max(L)²``.
* ``pytorch_jagged`` (the CPU default) sorts the sequences by length and walks the query
  tiles of ``block`` rows: tile ``t`` of every sequence that has one is processed in one
  batched matmul against keys ``[0, (t + 1)·block)``. Only tiles on or below the causal
  diagonal are computed and no sequence is padded beyond its last tile, so the cost is
  ``≈ ΣLᵢ² / 2`` plus at most one tile per row. Its backward pass is written out (a custom
  ``autograd.Function``) and recomputes each tile's scores, as flash attention does, so
  memory grows with ``ΣLᵢ`` plus one tile step, not with ``ΣLᵢ²``.
* ``triton`` runs fused forward and backward Triton kernels over the jagged values and the
  offsets (see :mod:`models.hstu.triton_attention`); on CPU tensors it needs the Triton
  interpreter (``TRITON_INTERPRET=1``), which is how it is tested without a GPU.
"""

from __future__ import annotations

import bisect
from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F

IMPLS = ("auto", "pytorch_padded", "pytorch_jagged", "triton")

# ln(2) rounded as in the paper's bucketing: one bucket per doubling of the time gap.
TIME_BUCKET_DIVISOR = 0.301


def time_buckets(dt: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """``min(⌊ln(max(|Δt|, 1)) / 0.301⌋, num_buckets)`` elementwise, as int64."""
    gap = dt.abs().clamp(min=1).to(torch.float32)
    return torch.floor(torch.log(gap) / TIME_BUCKET_DIVISOR).to(torch.int64).clamp(0, num_buckets)


def jagged_positions(offsets: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence id, position inside the sequence) of each of the ``total`` jagged tokens."""
    lengths = offsets.diff()
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), lengths,
                                  output_size=total)
    return seq, torch.arange(total, device=offsets.device) - offsets[seq]


def next_timestamps(timestamps: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``ts[i + 1]`` for each token, or ``ts[i]`` for the last token of its sequence."""
    total = timestamps.numel()
    seq, _ = jagged_positions(offsets, total)
    idx = torch.arange(total, device=timestamps.device)
    has_next = idx + 1 < offsets[1:][seq]
    return torch.where(has_next, timestamps[(idx + 1).clamp(max=max(total - 1, 0))], timestamps)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor,
           max_seq_len: int, rab_pos: torch.Tensor, rab_time: Optional[torch.Tensor],
           timestamps: Optional[torch.Tensor], impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"unknown hstu_attention impl {impl!r}; valid: {', '.join(IMPLS)}")
    if q.dim() != 3 or q.shape != k.shape:
        raise ValueError(f"q and k must both be [ΣL, H, d]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"v must be [ΣL, H, d_v] with ΣL, H of q {tuple(q.shape)}; "
                         f"got {tuple(v.shape)}")
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"offsets must be [B + 1]; got shape {tuple(offsets.shape)}")
    if rab_pos.shape != (max_seq_len,):
        raise ValueError(f"rab_pos must be [max_seq_len={max_seq_len}]; "
                         f"got {tuple(rab_pos.shape)}")
    if (rab_time is None) != (timestamps is None):
        raise ValueError("rab_time and timestamps go together: pass both or neither")
    if timestamps is not None and timestamps.shape != (q.shape[0],):
        raise ValueError(f"timestamps must be [ΣL={q.shape[0]}]; got {tuple(timestamps.shape)}")


def hstu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor,
                   max_seq_len: int, rab_pos: torch.Tensor,
                   rab_time: Optional[torch.Tensor] = None,
                   timestamps: Optional[torch.Tensor] = None,
                   impl: str = "auto",
                   query_timestamps: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal HSTU pointwise attention over jagged sequences (see the module docstring).

    Args:
        q, k: ``[ΣLᵢ, H, d]`` queries and keys.
        v: ``[ΣLᵢ, H, d_v]`` values.
        offsets: ``[B + 1]`` int64, sequence ``b`` is rows ``offsets[b]:offsets[b + 1]``;
            empty sequences are allowed.
        max_seq_len: ``n``, the configured maximum length: the divisor of the attention and
            the size of ``rab_pos``. Sequences may not be longer.
        rab_pos: ``[n]`` learned bias per relative position ``i - j`` (clamped to ``n - 1``).
        rab_time: ``[num_buckets + 1]`` learned bias per time-gap bucket, or None.
        timestamps: ``[ΣLᵢ]`` int64 event times (needed iff ``rab_time`` is given).
        impl: ``"pytorch_padded"``, ``"pytorch_jagged"``, ``"triton"``, or ``"auto"``
            (``triton`` for CUDA tensors when Triton imports, else ``pytorch_jagged``).
        query_timestamps: ``[ΣLᵢ]`` the time each query's gaps are measured from, instead of
            ``ts[i + 1]`` (own time for a last token) — e.g. the held-out item's time for the
            last token at evaluation, so it sees the gap it was trained with. Only with
            ``timestamps``.

    Returns:
        ``[ΣLᵢ, H, d_v]``, jagged like ``q``.

    Example:
        >>> offsets = torch.tensor([0, 3, 3, 4])  # lengths 3, 0, 1
        >>> q, k, v = (torch.randn(4, 2, 8) for _ in range(3))
        >>> hstu_attention(q, k, v, offsets, 16, torch.zeros(16)).shape
        torch.Size([4, 2, 8])
    """
    _check(q, k, v, offsets, max_seq_len, rab_pos, rab_time, timestamps, impl)
    if query_timestamps is not None and (timestamps is None
                                         or query_timestamps.shape != timestamps.shape):
        raise ValueError("query_timestamps must come with timestamps and have their shape "
                         f"[ΣL={q.shape[0]}]")
    if impl == "auto":
        impl = "triton" if q.is_cuda and _triton_available() else "pytorch_jagged"
    if impl == "pytorch_padded":
        return _padded(q, k, v, offsets, max_seq_len, rab_pos, rab_time, timestamps,
                       query_timestamps)
    if impl == "pytorch_jagged":
        return _jagged(q, k, v, offsets, max_seq_len, rab_pos, rab_time, timestamps,
                       query_timestamps=query_timestamps)
    from models.hstu.triton_attention import triton_hstu_attention

    return triton_hstu_attention(q, k, v, offsets, max_seq_len, rab_pos, rab_time, timestamps,
                                 query_timestamps)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _bias(q_pos: torch.Tensor, k_pos: torch.Tensor, max_seq_len: int, rab_pos: torch.Tensor,
          rab_time: Optional[torch.Tensor], ts_next_q: Optional[torch.Tensor],
          ts_k: Optional[torch.Tensor]) -> torch.Tensor:
    """``rab`` for query positions ``[..., Tq]`` against key positions ``[..., Tk]``."""
    rel = (q_pos.unsqueeze(-1) - k_pos.unsqueeze(-2)).clamp(0, max_seq_len - 1)
    bias = rab_pos[rel]
    if rab_time is not None:
        assert ts_next_q is not None and ts_k is not None
        dt = ts_next_q.unsqueeze(-1) - ts_k.unsqueeze(-2)
        bias = bias + rab_time[time_buckets(dt, rab_time.numel() - 1)]
    return bias


def _padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor,
            max_seq_len: int, rab_pos: torch.Tensor, rab_time: Optional[torch.Tensor],
            timestamps: Optional[torch.Tensor],
            query_timestamps: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference: pad to ``[B, max(L), H, d]``, mask, attend, unpad."""
    total, heads, _ = q.shape
    batch = offsets.numel() - 1
    longest = int(offsets.diff().max()) if batch else 0
    if total == 0:
        return v * 0  # keeps the (empty) result connected to the graph
    seq, pos = jagged_positions(offsets, total)

    def pad(x: torch.Tensor, fill: int = 0) -> torch.Tensor:
        out = x.new_full((batch, longest, *x.shape[1:]), fill)
        out[seq, pos] = x
        return out

    qp, kp, vp = pad(q), pad(k), pad(v)
    scores = torch.einsum("bihd,bjhd->bhij", qp, kp)
    steps = torch.arange(longest, device=q.device)
    ts_next = ts = None
    if timestamps is not None:
        ts = pad(timestamps)
        ts_next = pad(next_timestamps(timestamps, offsets) if query_timestamps is None
                      else query_timestamps)
    bias = _bias(steps.expand(batch, -1), steps.expand(batch, -1), max_seq_len, rab_pos,
                 rab_time, ts_next, ts)
    causal = steps[None, :] <= steps[:, None]  # [i, j]: j ≤ i
    attn = F.silu(scores + bias.unsqueeze(1)) * (causal.to(q.dtype) / max_seq_len)
    out = torch.einsum("bhij,bjhd->bihd", attn, vp)
    return out[seq, pos]


def _jagged(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor,
            max_seq_len: int, rab_pos: torch.Tensor, rab_time: Optional[torch.Tensor],
            timestamps: Optional[torch.Tensor], block: int = 64,
            query_timestamps: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal tiles only: query tile ``t`` of all sequences at once, keys ``[0, (t+1)·block)``.

    Sequences are sorted by length (longest first) so those that still have a tile ``t`` are
    a prefix of the order; each step is one batched matmul ``[H, S, block, d] @ [H, S, d,
    (t + 1)·block]``. Rows past a sequence's end point at an all-zero pad row (index ΣL), and
    their outputs are dropped when the tiles are put back in token order.
    """
    if q.shape[0] == 0:
        return v * 0  # keeps the (empty) result connected to the graph
    ts = ts_next = None
    if timestamps is not None:
        ts = torch.cat([timestamps, timestamps.new_zeros(1)])
        tq = next_timestamps(timestamps, offsets) if query_timestamps is None \
            else query_timestamps
        ts_next = torch.cat([tq, timestamps.new_zeros(1)])
    return _JaggedAttention.apply(q, k, v, rab_pos, rab_time, offsets, ts, ts_next,
                                  max_seq_len, block)


class _CausalTiles:
    """The tile schedule of one jagged batch: for each query tile ``t``, the gather indices of
    the ``S_t`` sequences that have such a tile (rows past a sequence's end point at the
    all-zero pad row, index ``ΣL``), their query/key positions and the bias index tensors."""

    def __init__(self, offsets: torch.Tensor, total: int, block: int) -> None:
        lengths = offsets.diff()
        order = torch.argsort(lengths, descending=True, stable=True)
        lens, starts = lengths[order], offsets[:-1][order]
        tiles_desc: List[int] = ((lens + block - 1) // block).tolist()
        neg_tiles = [-t for t in tiles_desc]
        steps = torch.arange(tiles_desc[0] * block, device=offsets.device)
        self.tiles = []
        for t in range(tiles_desc[0]):
            active = bisect.bisect_left(neg_tiles, -t)  # sequences with more than t tiles
            q_pos, k_pos = steps[t * block:(t + 1) * block], steps[:(t + 1) * block]
            seq_len, seq_start = lens[:active, None], starts[:active, None]
            q_idx = torch.where(q_pos < seq_len, seq_start + q_pos, total)   # [S, T]
            k_idx = torch.where(k_pos < seq_len, seq_start + k_pos, total)   # [S, J]
            self.tiles.append((q_pos, k_pos, q_idx, k_idx))


class _JaggedAttention(torch.autograd.Function):
    """Forward and backward over the causal tiles, recomputing each tile's scores in the
    backward pass (as flash attention does) so no ``[H, ΣLᵢ²]`` tensor is ever kept."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                rab_pos: torch.Tensor, rab_time: Optional[torch.Tensor],
                offsets: torch.Tensor, ts: Optional[torch.Tensor],
                ts_next: Optional[torch.Tensor], max_seq_len: int,
                block: int) -> torch.Tensor:
        total = q.shape[0]
        plan = _CausalTiles(offsets, total, block)
        qh, kh, vh = _head_major(q), _head_major(k), _head_major(v)
        out = v.new_zeros(v.shape[1], total + 1, v.shape[2])
        for q_pos, k_pos, q_idx, k_idx in plan.tiles:
            scores, _, _ = _tile_scores(qh, kh, q_pos, k_pos, q_idx, k_idx, max_seq_len,
                                        rab_pos, rab_time, ts, ts_next)
            attn = F.silu(scores).mul_(_causal(q_pos, k_pos, max_seq_len, q.dtype))
            # Pad rows (index ΣL) may be written several times; they are dropped below.
            out[:, q_idx.flatten()] = (attn @ vh[:, k_idx]).flatten(1, 2)
        ctx.save_for_backward(qh, kh, vh, rab_pos, rab_time, ts, ts_next)
        ctx.plan, ctx.max_seq_len = plan, max_seq_len
        return out[:, :total].transpose(0, 1).contiguous()

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        qh, kh, vh, rab_pos, rab_time, ts, ts_next = ctx.saved_tensors
        n = ctx.max_seq_len
        gh = _head_major(grad_out)  # the pad row's gradient is 0: pad queries add nothing
        dq, dk, dv = torch.zeros_like(qh), torch.zeros_like(kh), torch.zeros_like(vh)
        d_pos = torch.zeros_like(rab_pos)
        d_time = None if rab_time is None else torch.zeros_like(rab_time)
        for q_pos, k_pos, q_idx, k_idx in ctx.plan.tiles:
            scores, rel, bucket = _tile_scores(qh, kh, q_pos, k_pos, q_idx, k_idx, n, rab_pos,
                                               rab_time, ts, ts_next)
            causal = _causal(q_pos, k_pos, n, qh.dtype)
            sig = torch.sigmoid(scores)
            g = gh[:, q_idx]                                            # [H, S, T, d_v]
            v_tile = vh[:, k_idx]
            attn = scores * sig * causal
            dv.index_add_(1, k_idx.flatten(), (attn.transpose(-1, -2) @ g).flatten(1, 2))
            # d SiLU(s)/ds = σ(s)·(1 + s·(1 − σ(s)))
            d_scores = (g @ v_tile.transpose(-1, -2)).mul_(
                sig * (1 + scores * (1 - sig)) * causal)                # [H, S, T, J]
            dq.index_add_(1, q_idx.flatten(), (d_scores @ kh[:, k_idx]).flatten(1, 2))
            dk.index_add_(1, k_idx.flatten(),
                          (d_scores.transpose(-1, -2) @ qh[:, q_idx]).flatten(1, 2))
            d_bias = d_scores.sum(0)                                    # [S, T, J]
            d_pos.index_add_(0, rel.flatten(), d_bias.sum(0).flatten())
            if d_time is not None:
                d_time.index_add_(0, bucket.flatten(), d_bias.flatten())
        total = grad_out.shape[0]

        def jagged(x: torch.Tensor) -> torch.Tensor:
            return x[:, :total].transpose(0, 1)

        return (jagged(dq), jagged(dk), jagged(dv), d_pos, d_time, None, None, None, None,
                None)


def _head_major(x: torch.Tensor) -> torch.Tensor:
    """``[ΣL, H, d]`` → ``[H, ΣL + 1, d]``, zero pad row last; gathers give ``[H, S, T, d]``."""
    return torch.cat([x, x.new_zeros(1, *x.shape[1:])]).transpose(0, 1).contiguous()


def _causal(q_pos: torch.Tensor, k_pos: torch.Tensor, max_seq_len: int,
            dtype: torch.dtype) -> torch.Tensor:
    """``[T, J]``: ``1/n`` where ``j ≤ i``, else 0."""
    return (k_pos[None, :] <= q_pos[:, None]).to(dtype) / max_seq_len


def _tile_scores(qh: torch.Tensor, kh: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                 q_idx: torch.Tensor, k_idx: torch.Tensor, max_seq_len: int,
                 rab_pos: torch.Tensor, rab_time: Optional[torch.Tensor],
                 ts: Optional[torch.Tensor], ts_next: Optional[torch.Tensor]
                 ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``Q Kᵀ + rab`` of one tile ``[H, S, T, J]``, the ``[T, J]`` relative positions and the
    ``[S, T, J]`` time buckets (None without a time bias)."""
    scores = qh[:, q_idx] @ kh[:, k_idx].transpose(-1, -2)
    rel = (q_pos[:, None] - k_pos[None, :]).clamp(0, max_seq_len - 1)
    scores += rab_pos[rel]
    bucket = None
    if rab_time is not None:
        assert ts is not None and ts_next is not None
        bucket = time_buckets(ts_next[q_idx][:, :, None] - ts[k_idx][:, None, :],
                              rab_time.numel() - 1)
        scores += rab_time[bucket]
    return scores, rel, bucket
