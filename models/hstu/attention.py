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
* ``pytorch_jagged`` (the CPU default) groups the sequences by their number of ``block``-row
  tiles and gathers each group once into padded buffers (at most one tile of padding per
  sequence); query tile ``t`` of a group attends to keys ``[0, (t + 1)·block)`` as strided
  views of those buffers, in chunks of sequences whose scores fit in cache. Only tiles on or
  below the causal diagonal are computed, so the cost is ``≈ ΣLᵢ² / 2`` plus at most one
  tile per row. The causal mask is folded into the position bias (a very negative bias
  above the diagonal, where ``SiLU`` and its derivative are exactly 0) and ``1/n`` into
  ``V``, so a tile costs its matmuls plus two elementwise passes forward and three backward.
  The backward pass is written out (a custom ``autograd.Function``) and recomputes each
  tile's scores, as flash attention does, so memory grows with ``ΣLᵢ`` (plus one byte per
  causal pair for the cached time buckets), not with ``H·ΣLᵢ²``.
* ``triton`` runs fused forward and backward Triton kernels over the jagged values and the
  offsets (see :mod:`models.hstu.triton_attention`); on CPU tensors it needs the Triton
  interpreter (``TRITON_INTERPRET=1``), which is how it is tested without a GPU.

``compiled_jagged`` runs the same tiles in a compiled C++ CPU kernel (one fused pass over
each tile's scores for bias, SiLU, ``1/n`` and the mask, no Python per tile; see
:mod:`models.hstu.compiled`), falling back to ``pytorch_jagged`` where it cannot be built.
``auto`` picks it for CPU tensors (:func:`auto_impl`) and ``triton`` for CUDA tensors.

``semi_local`` is a different attention pattern, not another way to compute this one: query
``i`` sees only keys with ``i − j < window`` or ``j < global_tokens`` (see
:mod:`models.hstu.semi_local`), at cost ``O(ΣLᵢ·(W + G))``. ``pytorch_padded`` with a
``window`` applies the same mask to the dense scores and is its test reference.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F

from models.hstu.jagged import (TIME_BUCKET_DIVISOR, jagged_positions, next_timestamps,
                               time_buckets)

IMPLS = ("auto", "pytorch_padded", "pytorch_jagged", "compiled_jagged", "triton", "semi_local")
__all__ = ["IMPLS", "TIME_BUCKET_DIVISOR", "auto_impl", "hstu_attention", "jagged_positions",
           "next_timestamps", "time_buckets"]

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
                   query_timestamps: Optional[torch.Tensor] = None,
                   window: int = 0, global_tokens: int = 0) -> torch.Tensor:
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
        impl: ``"pytorch_padded"``, ``"pytorch_jagged"``, ``"compiled_jagged"``,
            ``"triton"``, ``"semi_local"`` or ``"auto"`` (:func:`auto_impl`: ``triton`` for
            CUDA tensors when Triton imports, ``compiled_jagged`` for CPU tensors when its
            C++ kernel builds and loads, else ``pytorch_jagged``).
        query_timestamps: ``[ΣLᵢ]`` the time each query's gaps are measured from, instead of
            ``ts[i + 1]`` (own time for a last token) — e.g. the held-out item's time for the
            last token at evaluation, so it sees the gap it was trained with. Only with
            ``timestamps``.
        window, global_tokens: the semi-local pattern (``semi_local``, or ``pytorch_padded``
            as its masked dense reference): keys with ``i − j < window`` or
            ``j < global_tokens``. ``window = 0`` is full causal attention.

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
    if (impl == "semi_local" and window < 1) or window < 0 or global_tokens < 0 or (
            window > 0 and impl not in ("semi_local", "pytorch_padded")):
        raise ValueError(f"hstu_attention: impl 'semi_local' needs window >= 1 (and "
                         f"global_tokens >= 0); a window only goes with 'semi_local' or its "
                         f"reference 'pytorch_padded'; got impl={impl!r}, window={window}, "
                         f"global_tokens={global_tokens}")
    if impl == "auto":
        impl = auto_impl(q.device)
    if impl == "pytorch_padded":
        return _padded(q, k, v, offsets, max_seq_len, rab_pos, rab_time, timestamps,
                       query_timestamps, window, global_tokens)
    if impl == "compiled_jagged":
        from models.hstu.compiled import compiled_jagged_attention, kernel_for

        if kernel_for(q) is not None:
            return compiled_jagged_attention(q, k, v, offsets, max_seq_len, rab_pos, rab_time,
                                             timestamps, query_timestamps)
        impl = "pytorch_jagged"  # off the CPU, or no compiler here: the same tiles, eagerly
    if impl == "semi_local":
        from models.hstu.semi_local import semi_local_attention

        return semi_local_attention(q, k, v, offsets, max_seq_len, rab_pos, rab_time,
                                    timestamps, query_timestamps, window=window,
                                    global_tokens=global_tokens)
    if impl == "pytorch_jagged":
        return _jagged(q, k, v, offsets, max_seq_len, rab_pos, rab_time, timestamps,
                       query_timestamps=query_timestamps)
    from models.hstu.triton_attention import triton_hstu_attention

    return triton_hstu_attention(q, k, v, offsets, max_seq_len, rab_pos, rab_time, timestamps,
                                 query_timestamps)


def auto_impl(device: torch.device) -> str:
    """What ``impl="auto"`` runs on tensors of ``device``: ``triton`` on CUDA where Triton
    imports; on the CPU ``compiled_jagged`` where its C++ kernel builds (or is cached) and
    loads — where it cannot, :func:`models.hstu.compiled.load_kernel` logs one line saying
    why and ``pytorch_jagged`` (the same values, eagerly) is used; ``pytorch_jagged``
    elsewhere."""
    if device.type == "cuda":
        return "triton" if _triton_available() else "pytorch_jagged"
    if device.type == "cpu":
        from models.hstu.compiled import load_kernel

        return "compiled_jagged" if load_kernel() is not None else "pytorch_jagged"
    return "pytorch_jagged"


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
            query_timestamps: Optional[torch.Tensor] = None, window: int = 0,
            global_tokens: int = 0) -> torch.Tensor:
    """Reference: pad to ``[B, max(L), H, d]``, mask, attend, unpad; with ``window > 0`` the
    mask is the semi-local one (``i − j < window`` or ``j < global_tokens``)."""
    total, heads, _ = q.shape
    batch = offsets.numel() - 1
    # Exported programs (trainer.inference) pad to max_seq_len: a width that depends on the
    # data cannot be traced; masking makes the result the same.
    longest = (max_seq_len if torch.compiler.is_exporting()
               else int(offsets.diff().max()) if batch else 0)
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
    if window > 0:
        i, j = steps[:, None], steps[None, :]
        causal = causal & ((i - j < window) | (j < global_tokens))
    attn = F.silu(scores + bias.unsqueeze(1)) * (causal.to(q.dtype) / max_seq_len)
    out = torch.einsum("bhij,bjhd->bihd", attn, vp)
    return out[seq, pos]


def _jagged(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor,
            max_seq_len: int, rab_pos: torch.Tensor, rab_time: Optional[torch.Tensor],
            timestamps: Optional[torch.Tensor], block: int = 64,
            query_timestamps: Optional[torch.Tensor] = None,
            tile_cells: int = 1 << 18) -> torch.Tensor:
    """Causal tiles only, sequences grouped by tile count (see :class:`_TileGroups`)."""
    if q.shape[0] == 0:
        return v * 0  # keeps the (empty) result connected to the graph
    ts = ts_next = None
    if timestamps is not None:
        ts = torch.cat([timestamps, timestamps.new_zeros(1)])
        tq = next_timestamps(timestamps, offsets) if query_timestamps is None \
            else query_timestamps
        ts_next = torch.cat([tq, timestamps.new_zeros(1)])
    return _JaggedAttention.apply(q, k, v, rab_pos, rab_time, offsets, ts, ts_next,
                                  max_seq_len, block, tile_cells)


class _TileGroups:
    """The tile schedule of one jagged batch.

    Sequences with the same number of ``block``-row tiles form a group; a group of ``S``
    sequences of ``n`` tiles is gathered once into padded ``[S, H, n·block, d]`` buffers
    (rows past a sequence's end come from the all-zero pad row, index ``ΣL``), so padding
    costs at most one tile per sequence. Query tile ``t`` of a group attends to keys
    ``[0, (t + 1)·block)``: both are strided views of the buffers, so no tile is copied, and
    the tile's ``[S_c, H, block, (t + 1)·block]`` scores are computed for chunks of ``S_c``
    sequences small enough (``tile_cells`` scores) to stay in cache while the elementwise
    passes run over them.
    """

    def __init__(self, offsets: torch.Tensor, total: int, block: int, heads: int,
                 tile_cells: int) -> None:
        lengths = offsets.diff()
        tiles = (lengths + block - 1) // block
        order = torch.argsort(tiles, descending=True, stable=True)
        counts = torch.bincount(tiles)
        self.block, self.max_tiles = block, int(tiles.max()) if tiles.numel() else 0
        steps = torch.arange(self.max_tiles * block, device=offsets.device)
        #: per group: (tile count n, gather index [S, n·block], chunks per tile t)
        self.groups: List[Tuple[int, torch.Tensor, List[List[Tuple[int, int]]]]] = []
        first = 0
        for n in range(self.max_tiles, 0, -1):
            size = int(counts[n])
            if size == 0:
                continue
            members = order[first:first + size]
            first += size
            pos = steps[:n * block]
            idx = torch.where(pos < lengths[members, None], offsets[:-1][members, None] + pos,
                              total)
            chunks = []
            for t in range(n):
                per = max(1, tile_cells // (heads * block * (t + 1) * block))
                chunks.append([(lo, min(lo + per, size)) for lo in range(0, size, per)])
            self.groups.append((n, idx, chunks))

    def position_bias(self, rab_pos: torch.Tensor, max_seq_len: int,
                      dtype: torch.dtype) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Per tile ``t``: the ``[T, J]`` relative positions (clamped) and ``rab_pos`` there,
        with the causal mask folded in: a very negative bias above the diagonal, where
        ``SiLU`` and its derivative are then exactly 0 (so no separate mask pass is needed;
        pad keys of real queries always lie above it)."""
        steps = torch.arange(self.max_tiles * self.block, device=rab_pos.device)
        masked = -0.5 * torch.finfo(dtype).max
        out = []
        for t in range(self.max_tiles):
            q_pos = steps[t * self.block:(t + 1) * self.block, None]
            k_pos = steps[None, :(t + 1) * self.block]
            rel = (q_pos - k_pos).clamp(0, max_seq_len - 1)
            bias = torch.where(k_pos <= q_pos, rab_pos[rel].to(dtype),
                               torch.full((), masked, dtype=dtype, device=rab_pos.device))
            out.append((rel, bias))
        return out


def _group_major(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx [S, L]`` of ``x [ΣL + 1, H, d]`` as a contiguous ``[S, H, L, d]``."""
    return x[idx].transpose(1, 2).contiguous()


def _with_pad_row(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``[ΣL, H, d]`` → ``[ΣL + 1, H, d]`` times ``scale``, the zero pad row last."""
    out = torch.cat([x, x.new_zeros(1, *x.shape[1:])])
    return out.mul_(scale) if scale != 1.0 else out


class _JaggedAttention(torch.autograd.Function):
    """Forward and backward over the causal tiles, recomputing each tile's scores in the
    backward pass (as flash attention does) so no ``[H, ΣLᵢ²]`` tensor is ever kept; only
    the time buckets of the tiles (one byte per causal pair) are kept from the forward.

    The ``1/n`` of the attention is folded into ``V`` (forward) and into the output gradient
    (backward), so each tile costs two elementwise passes forward (bias, SiLU) and three
    backward (bias, SiLU, SiLU's derivative) besides its matmuls.
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                rab_pos: torch.Tensor, rab_time: Optional[torch.Tensor],
                offsets: torch.Tensor, ts: Optional[torch.Tensor],
                ts_next: Optional[torch.Tensor], max_seq_len: int,
                block: int, tile_cells: int) -> torch.Tensor:
        total, heads = q.shape[:2]
        plan = _TileGroups(offsets, total, block, heads, tile_cells)
        pos_bias = plan.position_bias(rab_pos, max_seq_len, q.dtype)
        qx, kx, vx = _with_pad_row(q), _with_pad_row(k), _with_pad_row(v, 1.0 / max_seq_len)
        out = v.new_empty(total + 1, *v.shape[1:])
        buckets: List[torch.Tensor] = []
        for n, idx, chunks in plan.groups:
            qg, kg, vg = _group_major(qx, idx), _group_major(kx, idx), _group_major(vx, idx)
            og = torch.empty_like(vg)
            tsg = tqg = None
            if ts is not None and ts_next is not None:
                tsg, tqg = ts[idx], ts_next[idx]
            for t in range(n):
                rows = slice(t * block, (t + 1) * block)
                keys = (t + 1) * block
                for lo, hi in chunks[t]:
                    scores, bucket = _tile_scores(qg[lo:hi, :, rows], kg[lo:hi, :, :keys],
                                                  pos_bias[t][1], rab_time,
                                                  None if tqg is None else tqg[lo:hi, rows],
                                                  None if tsg is None else tsg[lo:hi, :keys])
                    if bucket is not None:
                        buckets.append(bucket)
                    attn = F.silu(scores, inplace=True)
                    og[lo:hi, :, rows] = (attn @ _flat(vg[lo:hi, :, :keys])).view(
                        hi - lo, heads, block, -1)
            # Pad rows (index ΣL) are written several times; they are dropped below.
            out[idx.flatten()] = og.transpose(1, 2).flatten(0, 1)
        ctx.save_for_backward(q, k, v, rab_pos, rab_time, ts, ts_next)
        ctx.plan, ctx.max_seq_len, ctx.buckets = plan, max_seq_len, buckets
        return out[:total]

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        q, k, v, rab_pos, rab_time, ts, ts_next = ctx.saved_tensors
        plan, n_max = ctx.plan, ctx.max_seq_len
        block, heads, total = plan.block, q.shape[1], q.shape[0]
        pos_bias = plan.position_bias(rab_pos, n_max, q.dtype)
        qx, kx, vx = _with_pad_row(q), _with_pad_row(k), _with_pad_row(v)
        gx = _with_pad_row(grad_out.to(v.dtype), 1.0 / n_max)  # pad rows: zero gradient
        dq, dk, dv = (x.new_empty(total + 1, *x.shape[1:]) for x in (q, k, v))
        # Bias gradients sum over ΣLᵢ² pairs: at least fp32 even when q is bf16.
        acc = torch.promote_types(q.dtype, rab_pos.dtype)
        d_pos = torch.zeros(n_max, dtype=acc, device=q.device)
        d_time = None if rab_time is None else \
            torch.zeros(rab_time.numel(), dtype=acc, device=q.device)
        buckets = iter(ctx.buckets)
        for n, idx, chunks in plan.groups:
            qg, kg, vg, gg = (_group_major(x, idx) for x in (qx, kx, vx, gx))
            dqg, dkg, dvg = torch.zeros_like(qg), torch.zeros_like(kg), torch.zeros_like(vg)
            for t in range(n):
                rows = slice(t * block, (t + 1) * block)
                keys = (t + 1) * block
                rel, bias = pos_bias[t]
                for lo, hi in chunks[t]:
                    bucket = None if d_time is None else next(buckets).long()
                    q3, k3 = _flat(qg[lo:hi, :, rows]), _flat(kg[lo:hi, :, :keys])
                    g3, v3 = _flat(gg[lo:hi, :, rows]), _flat(vg[lo:hi, :, :keys])
                    scores = _biased_scores(q3, k3, bias, rab_time, bucket, hi - lo, heads)
                    # The gradient buffers' tile views are strided (keys < n·block), where an
                    # in-place baddbmm_ falls back to one matmul per batch entry: matmul into
                    # a fresh tensor and add instead.
                    _flat(dvg[lo:hi, :, :keys]).add_(
                        torch.bmm(F.silu(scores).transpose(1, 2), g3))
                    d_scores = torch.ops.aten.silu_backward(torch.bmm(g3, v3.transpose(1, 2)),
                                                            scores)
                    _flat(dqg[lo:hi, :, rows]).add_(torch.bmm(d_scores, k3))
                    _flat(dkg[lo:hi, :, :keys]).add_(torch.bmm(d_scores.transpose(1, 2), q3))
                    d_bias = d_scores.view(hi - lo, heads, block, keys).sum(1)  # [S_c, T, J]
                    d_pos.index_add_(0, rel.flatten(), d_bias.sum(0).flatten().to(acc))
                    if d_time is not None:
                        d_time.index_add_(0, bucket.flatten(), d_bias.flatten().to(acc))
            flat = idx.flatten()
            for dx, dxg in ((dq, dqg), (dk, dkg), (dv, dvg)):
                dx[flat] = dxg.transpose(1, 2).flatten(0, 1)
        return (dq[:total], dk[:total], dv[:total], d_pos.to(rab_pos.dtype),
                None if d_time is None else d_time.to(rab_time.dtype),
                None, None, None, None, None, None)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``[S, H, R, d]`` view → ``[S·H, R, d]`` view: ``S`` and ``H`` merge because the buffers
    are sequence-major and only ``S`` and ``R`` are sliced. ``view`` (never a copy): the
    backward accumulates into these views in place."""
    return x.view(-1, *x.shape[2:])


def _biased_scores(q3: torch.Tensor, k3: torch.Tensor, pos_bias: torch.Tensor,
                   rab_time: Optional[torch.Tensor], bucket: Optional[torch.Tensor],
                   seqs: int, heads: int) -> torch.Tensor:
    """``Q Kᵀ + rab`` of one tile chunk, ``[S_c·H, T, J]``: the bias is written first and the
    matmul accumulates onto it (one pass over the scores instead of two)."""
    rows, keys = pos_bias.shape
    bias = pos_bias if bucket is None else pos_bias + rab_time[bucket].to(pos_bias.dtype)
    scores = q3.new_empty(seqs, heads, rows, keys)
    scores.copy_(bias.unsqueeze(-3) if bias.dim() == 3 else bias)
    return scores.view(seqs * heads, rows, keys).baddbmm_(q3, k3.transpose(1, 2))


def _tile_scores(q4: torch.Tensor, k4: torch.Tensor, pos_bias: torch.Tensor,
                 rab_time: Optional[torch.Tensor], ts_next_q: Optional[torch.Tensor],
                 ts_k: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Forward scores ``[S_c·H, T, J]`` of queries ``q4 [S_c, H, T, d]`` against keys ``k4 [S_c,
    H, J, d]``, and the tile's time buckets ``[S_c, T, J]`` stored compactly for the backward
    pass (None without a time bias)."""
    bucket = None
    if rab_time is not None:
        assert ts_next_q is not None and ts_k is not None
        bucket = time_buckets(ts_next_q[:, :, None] - ts_k[:, None, :], rab_time.numel() - 1)
    scores = _biased_scores(_flat(q4), _flat(k4), pos_bias, rab_time, bucket, q4.shape[0],
                            q4.shape[1])
    if bucket is not None:
        bucket = bucket.to(torch.uint8 if rab_time.numel() <= 256 else torch.int32)
    return scores, bucket
