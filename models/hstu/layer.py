"""One HSTU layer (arXiv 2402.17152) on jagged sequences.

``x̂ = LN(x)``; ``U, V, Q, K = split(SiLU(x̂ W + b))``;
``A V = hstu_attention(Q, K, V)`` (pointwise SiLU attention with relative position and
time-gap bias, divided by the configured maximum length, causal);
``y = x + W_o(dropout(U ⊙ LN(A V)))``.

Shapes: ``x`` is ``[ΣLᵢ, D]`` with ``offsets [B + 1]``; per head, Q and K have
``attn_dim`` features and U and V ``linear_dim``; ``LN(A V)`` normalises the heads'
outputs concatenated (``H · linear_dim`` features).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.hstu.attention import IMPLS, hstu_attention


class HSTULayer(nn.Module):
    """Pre-LN HSTU layer over jagged ``x [ΣLᵢ, D]``.

    Args:
        dim: ``D``, the model width.
        num_heads: ``H``.
        max_seq_len: ``n``: the attention divisor and the relative-position bias size.
        attn_dim: per-head Q/K width (default ``D // H``).
        linear_dim: per-head U/V width (default ``D // H``).
        num_time_buckets: number of time-gap buckets of the relative bias (the last one
            collects every larger gap); None for datasets without timestamps.
        dropout: dropout on ``U ⊙ LN(A V)`` before the output projection.
        impl: the attention implementation (see ``hstu_attention``).
        window, global_tokens: the local window ``W`` and global tokens ``G`` of
            ``impl="semi_local"`` (ignored otherwise).

    Example:
        >>> layer = HSTULayer(dim=32, num_heads=2, max_seq_len=16, num_time_buckets=8)
        >>> offsets = torch.tensor([0, 5, 5, 6])  # lengths 5, 0, 1
        >>> ts = torch.tensor([0, 10, 20, 300, 4000, 7])
        >>> layer(torch.randn(6, 32), offsets, ts).shape
        torch.Size([6, 32])
    """

    def __init__(self, dim: int, num_heads: int, max_seq_len: int,
                 attn_dim: Optional[int] = None, linear_dim: Optional[int] = None,
                 num_time_buckets: Optional[int] = 128, dropout: float = 0.0,
                 impl: str = "auto", window: int = 256, global_tokens: int = 4) -> None:
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"unknown HSTULayer impl {impl!r}; valid: {', '.join(IMPLS)}")
        if dim % num_heads and (attn_dim is None or linear_dim is None):
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}; "
                             "give attn_dim and linear_dim explicitly")
        self.num_heads = num_heads
        self.max_seq_len = max_seq_len
        self.attn_dim = attn_dim or dim // num_heads
        self.linear_dim = linear_dim or dim // num_heads
        self.impl = impl
        self.window, self.global_tokens = (window, global_tokens) if impl == "semi_local" \
            else (0, 0)
        self.input_norm = nn.LayerNorm(dim)
        self.uvqk = nn.Linear(dim, num_heads * 2 * (self.linear_dim + self.attn_dim))
        self.attn_norm = nn.LayerNorm(num_heads * self.linear_dim)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(num_heads * self.linear_dim, dim)
        self.rab_pos = nn.Parameter(torch.empty(max_seq_len).normal_(std=0.02))
        self.rab_time = (nn.Parameter(torch.empty(num_time_buckets + 1).normal_(std=0.02))
                         if num_time_buckets is not None else None)

    def forward(self, x: torch.Tensor, offsets: torch.Tensor,
                timestamps: Optional[torch.Tensor] = None,
                query_timestamps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x [ΣLᵢ, D]``, ``offsets [B + 1]``, ``timestamps [ΣLᵢ]`` → ``[ΣLᵢ, D]``;
        ``query_timestamps [ΣLᵢ]`` as in ``hstu_attention``."""
        if (self.rab_time is None) != (timestamps is None):
            raise ValueError("HSTULayer: timestamps are required exactly when the layer has a "
                             f"time bias (num_time_buckets set: {self.rab_time is not None}, "
                             f"timestamps given: {timestamps is not None})")
        total = x.shape[0]
        heads, dqk, duv = self.num_heads, self.attn_dim, self.linear_dim
        u, v, q, k = F.silu(self.uvqk(self.input_norm(x))).split(
            [heads * duv, heads * duv, heads * dqk, heads * dqk], dim=-1)
        av = hstu_attention(q.reshape(total, heads, dqk), k.reshape(total, heads, dqk),
                            v.reshape(total, heads, duv), offsets, self.max_seq_len,
                            self.rab_pos, self.rab_time, timestamps, impl=self.impl,
                            query_timestamps=query_timestamps, window=self.window,
                            global_tokens=self.global_tokens)
        return x + self.out(self.dropout(u * self.attn_norm(av.reshape(total, heads * duv))))
