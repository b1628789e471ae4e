"""Semi-local HSTU attention: each query sees a local causal window plus a few global tokens.

Same pointwise attention as :func:`models.hstu.attention.hstu_attention` (``SiLU(q·k + rab) /
n``, bias shared by the heads, ``n`` the configured maximum length), but query ``i`` of a
sequence attends only to keys ``j ≤ i`` with

* ``i − j < W`` (the local window, the diagonal included), or
* ``j < G`` (the sequence's first ``G`` tokens, its global tokens: the oldest events, which
  every later query may still see — the semi-local pattern of ULTRA-HSTU, arXiv 2602.16986).

Cost ``O(ΣLᵢ·(W + G + T))`` for query tiles of ``T`` rows instead of ``O(ΣLᵢ²)``; memory is
linear in ``ΣLᵢ``. Layout: the jagged queries are cut into tiles of ``T`` rows (one sequence
per tile, the last tile of a sequence padded); tile ``t`` of a sequence gathers the ``G``
global keys and the band of ``W + T − 1`` keys ending at its last row
(``[t·T − W + 1, (t + 1)·T)``), so one tile is a dense ``[H, T, G + W + T − 1]`` block.
Band keys below ``G`` are masked (they are already among the global keys), as are keys past
the window, above the diagonal, or outside the sequence. Tiles are processed in chunks whose
scores fit in ``tile_cells`` values, each chunk under activation checkpointing when a gradient
is needed, so the backward recomputes a chunk's scores instead of keeping them.

Shapes: ``q, k [ΣLᵢ, H, d]``, ``v [ΣLᵢ, H, d_v]``, ``offsets [B + 1]``, ``timestamps [ΣLᵢ]``
→ ``[ΣLᵢ, H, d_v]``.

Example:
    >>> offsets = torch.tensor([0, 5, 5, 7])  # lengths 5, 0, 2
    >>> q, k, v = (torch.randn(7, 2, 8) for _ in range(3))
    >>> semi_local_attention(q, k, v, offsets, 16, torch.zeros(16), window=2,
    ...                      global_tokens=1).shape
    torch.Size([7, 2, 8])
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from models.hstu.jagged import next_timestamps, time_buckets

__all__ = ["semi_local_attention", "semi_local_mask"]


def semi_local_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int,
                    global_tokens: int) -> torch.Tensor:
    """Which (query, key) position pairs attend: ``j ≤ i`` and (``i − j < W`` or ``j < G``);
    broadcasts ``q_pos [..., Tq, 1]`` against ``k_pos [..., 1, Tk]``."""
    return (k_pos <= q_pos) & ((q_pos - k_pos < window) | (k_pos < global_tokens))


def _tiles(offsets: torch.Tensor, total: int, block: int, window: int, global_tokens: int
           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tile schedule: query rows ``[N, T]`` and their positions, key rows ``[N, K]`` and
    their positions, and the per-key "attendable at all" flag ``[N, K]`` (inside the sequence,
    and not a band copy of a global key). Rows past a sequence's end point at the pad row
    ``total``."""
    lengths = offsets.diff()
    tiles = (lengths + block - 1) // block
    n_tiles = int(tiles.sum())
    dev = offsets.device
    tile_seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=dev), tiles,
                                       output_size=n_tiles)
    first = torch.cumsum(tiles, 0) - tiles
    tile_t = torch.arange(n_tiles, device=dev) - first[tile_seq]
    start, length = offsets[:-1][tile_seq, None], lengths[tile_seq, None]
    q_pos = tile_t[:, None] * block + torch.arange(block, device=dev)
    q_rows = torch.where(q_pos < length, start + q_pos, total)
    band = tile_t[:, None] * block - window + 1 + torch.arange(window + block - 1, device=dev)
    glob = torch.arange(global_tokens, device=dev).expand(n_tiles, -1)
    k_pos = torch.cat([glob, band], 1)
    is_global = torch.zeros_like(k_pos, dtype=torch.bool)
    is_global[:, :global_tokens] = True
    k_ok = (k_pos >= 0) & (k_pos < length) & (is_global | (k_pos >= global_tokens))
    k_rows = torch.where(k_ok, start + k_pos.clamp(min=0), total)
    return q_rows, q_pos, k_rows, k_pos, k_ok


def _chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rab_pos: torch.Tensor,
           rab_time: Optional[torch.Tensor], q_rows: torch.Tensor, q_pos: torch.Tensor,
           k_rows: torch.Tensor, k_pos: torch.Tensor, k_ok: torch.Tensor,
           ts: Optional[torch.Tensor], ts_next: Optional[torch.Tensor], max_seq_len: int,
           window: int, global_tokens: int) -> torch.Tensor:
    """One chunk of tiles: ``[N_c, T, H, d_v]`` outputs (pad rows included)."""
    qt = q[q_rows].transpose(1, 2)  # [N_c, H, T, d]
    kt = k[k_rows].transpose(1, 2)  # [N_c, H, K, d]
    vt = v[k_rows].transpose(1, 2)
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    mask = semi_local_mask(qp, kp, window, global_tokens) & k_ok[:, None, :]  # [N_c, T, K]
    bias = rab_pos[(qp - kp).clamp(0, max_seq_len - 1)]
    if rab_time is not None:
        assert ts is not None and ts_next is not None
        dt = ts_next[q_rows][:, :, None] - ts[k_rows][:, None, :]
        bias = bias + rab_time[time_buckets(dt, rab_time.numel() - 1)]
    scores = qt @ kt.transpose(-1, -2) + bias.unsqueeze(1).to(qt.dtype)
    # where() after SiLU: masked scores may be anything (pad rows are zeros), their weight 0.
    attn = torch.where(mask.unsqueeze(1), F.silu(scores), scores.new_zeros(()))
    return (attn @ vt).transpose(1, 2) / max_seq_len


def semi_local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         offsets: torch.Tensor, max_seq_len: int, rab_pos: torch.Tensor,
                         rab_time: Optional[torch.Tensor] = None,
                         timestamps: Optional[torch.Tensor] = None,
                         query_timestamps: Optional[torch.Tensor] = None, *,
                         window: int, global_tokens: int = 0, block: int = 64,
                         tile_cells: int = 1 << 21) -> torch.Tensor:
    """Semi-local causal HSTU attention (see the module docstring); the arguments are those of
    :func:`models.hstu.attention.hstu_attention` plus the local ``window`` ``W ≥ 1`` and the
    number of ``global_tokens`` ``G ≥ 0``."""
    if window < 1 or global_tokens < 0:
        raise ValueError(f"semi-local attention needs window >= 1 and global_tokens >= 0; got "
                         f"window={window}, global_tokens={global_tokens}")
    total, heads = q.shape[:2]
    if total == 0:
        return v * 0  # keeps the (empty) result connected to the graph
    # A tile never needs more rows than the window: smaller tiles waste less of the band.
    block = max(1, min(block, window))
    q_rows, q_pos, k_rows, k_pos, k_ok = _tiles(offsets, total, block, window, global_tokens)
    pad = (lambda x: torch.cat([x, x.new_zeros(1, *x.shape[1:])]))
    qx, kx, vx = pad(q), pad(k), pad(v)
    ts = ts_next = None
    if timestamps is not None:
        ts = pad(timestamps)
        ts_next = pad(next_timestamps(timestamps, offsets) if query_timestamps is None
                      else query_timestamps)
    per = max(1, tile_cells // (heads * block * k_pos.shape[1]))
    grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, rab_pos, rab_time))
    outs = []
    for lo in range(0, q_rows.shape[0], per):
        part = (q_rows[lo:lo + per], q_pos[lo:lo + per], k_rows[lo:lo + per],
                k_pos[lo:lo + per], k_ok[lo:lo + per])
        args = (qx, kx, vx, rab_pos, rab_time, *part, ts, ts_next, max_seq_len, window,
                global_tokens)
        outs.append(checkpoint(_chunk, *args, use_reentrant=False) if grad else _chunk(*args))
    out = torch.cat(outs).flatten(0, 1)  # [N·T, H, d_v], tiles in jagged order
    # Tiles enumerate each sequence's positions in order, sequences in order: the real rows
    # of the tiles, in tile order, are exactly rows 0 … ΣL − 1.
    return out[(q_rows < total).flatten()]
