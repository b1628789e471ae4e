"""SASRec (Kang & McAuley 2018): causal softmax self-attention over the item history, the
baseline HSTU is compared with on the same data, loss and evaluation.

Input of token ``t``: ``e(item_t)·√D + p(t)`` (learned absolute position, plus the action
embedding when ``action_feature`` is set), dropout. Each block (pre-LN):
``x ← x + Dropout(MHA(LN(x)))`` with a causal mask, ``x ← x + Dropout(FFN(LN(x)))`` with a
ReLU FFN of width ``ffn_mult · D``; a final LayerNorm. The jagged history is padded to
``[B, max Lᵢ, D]`` for ``nn.MultiheadAttention`` (rows are left-aligned, so the causal mask
alone keeps every real query off the padding); outputs are gathered back to ``[ΣLᵢ, D]``
and L2-normalised like HSTU's.

Example::

    spec = get_model_spec("sasrec")
    model = spec.build(schema, spec.make_args("ml1m"), "cpu")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from data.schema import Schema
from models.blocks import place
from models.sequential import (
    SequentialArgs,
    SequentialEncoder,
    SequentialModel,
    build_sequence_ec,
    check_sequential_args,
    jagged_to_padded,
)
from models.spec import ModelSpec


@dataclass
class SASRecArgs(SequentialArgs):
    """Arguments of SASRec (plus the shared :class:`SequentialArgs`)."""

    num_layers: int = 2
    num_heads: int = 1
    #: FFN hidden width as a multiple of D.
    ffn_mult: int = 1
    dropout: float = 0.2


class SASRecBlock(nn.Module):
    """Pre-LN causal self-attention + FFN block on ``[B, T, D]``."""

    def __init__(self, dim: int, heads: int, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(ffn_mult * dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        h = self.attn_norm(x)
        x = x + self.dropout(self.attn(h, h, h, attn_mask=causal, need_weights=False)[0])
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class SASRecEncoder(SequentialEncoder):
    def __init__(self, item_feature: str, action_feature: str, dim: int, max_len: int,
                 args: SASRecArgs) -> None:
        super().__init__(item_feature, action_feature, dim, max_len, args.dropout)
        self.blocks = nn.ModuleList([SASRecBlock(dim, args.num_heads, args.ffn_mult, args.dropout)
                                     for _ in range(args.num_layers)])
        self.final_norm = nn.LayerNorm(dim)

    def encode(self, x: torch.Tensor, offsets: torch.Tensor,
               timestamps: Optional[torch.Tensor],
               query_timestamps: Optional[torch.Tensor]) -> torch.Tensor:
        lengths = offsets.diff()
        if torch.compiler.is_exporting():
            # An exported program's width cannot depend on the data: pad to n (the causal
            # mask keeps the padded tail out of every real position, so outputs are the same).
            t = self.max_len
        else:
            t = int(lengths.max()) if lengths.numel() else 0
        if t == 0:
            return self.final_norm(x)
        padded, flat = jagged_to_padded(x, offsets, t)
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), diagonal=1)
        for block in self.blocks:
            padded = block(padded, causal)
        return self.final_norm(padded.reshape(-1, x.shape[1])[flat])


def build_sasrec(schema: Schema, args: SASRecArgs, device: str = "meta") -> SequentialModel:
    check_sequential_args(args)
    if args.num_layers < 1 or args.num_heads < 1 or args.ffn_mult < 1:
        raise ValueError("model.args.num_layers, num_heads and ffn_mult must be >= 1")
    ec, item, dim = build_sequence_ec(schema, args, device)
    if dim % args.num_heads:
        raise ValueError(f"model.args.num_heads {args.num_heads} does not divide D={dim}")
    encoder = SASRecEncoder(item.name, args.action_feature, dim, args.max_len or item.max_len,
                            args)
    model = SequentialModel(ec, encoder, item.table or item.name, item.num_embeddings)
    return place(model, device)


MODEL_SPEC = ModelSpec(
    name="sasrec",
    args_cls=SASRecArgs,
    build=build_sasrec,
    flavours={
        "default": SASRecArgs(),
        # HSTU's ML-1M settings; D=52 (not 50): fbgemm's fused tables need a multiple of 4.
        "ml1m": SASRecArgs(num_layers=2, num_heads=1, embedding_dim=52, max_len=200,
                           dropout=0.2),
        "ml20m": SASRecArgs(num_layers=4, num_heads=4, embedding_dim=256, max_len=200,
                            dropout=0.2),
    },
    task="sequential",
    description="SASRec: causal softmax self-attention baseline for next-item prediction "
                "(same loss and evaluation as HSTU)",
)
