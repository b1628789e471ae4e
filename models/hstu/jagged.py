"""Jagged-sequence index helpers shared by the HSTU attention implementations and the
sequential models (a leaf module: it imports nothing of ours).

A jagged batch is ``values [ΣLᵢ, ...]`` with ``offsets [B + 1]`` (``offsets[0] = 0``,
``Lᵢ = offsets[i + 1] − offsets[i]``, empty sequences allowed).

Example::

    >>> import torch
    >>> offsets = torch.tensor([0, 2, 2, 5])
    >>> seq, pos = jagged_positions(offsets, 5)
    >>> seq.tolist(), pos.tolist()
    ([0, 0, 2, 2, 2], [0, 1, 0, 1, 2])
    >>> next_timestamps(torch.tensor([10, 20, 5, 7, 9]), offsets).tolist()
    [20, 20, 7, 9, 9]
"""

from __future__ import annotations

import torch

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
