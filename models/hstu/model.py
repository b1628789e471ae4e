"""HSTU generative recommender (arXiv 2402.17152): next-item prediction over a user's jagged
item history with a stack of :class:`models.hstu.HSTULayer`.

Input of token ``t``: ``e(item_t)·√D + p(t)`` (learned absolute position), plus the action
embedding when ``action_feature`` is set, then dropout. Each layer: pre-LN, SiLU ``U, V, Q, K``
projections, pointwise ``SiLU(QKᵀ + rab) / n`` causal attention with relative position and
time-gap bias (the time bias only when the item feature has timestamps and ``time_bias``),
``U ⊙ LN(A V)``, output projection, dropout, residual. Outputs are L2-normalised and scored
against the L2-normalised item embeddings (sampled softmax in training, all items in
evaluation: ``trainer.tasks.sequential``).

Shapes: ``Batch.sequence`` KJT (item ids ``[ΣLᵢ]`` plus the negatives feature) →
:class:`models.sequential.SequenceEncoding` with ``user [ΣLᵢ, D]``.

Example::

    spec = get_model_spec("hstu")
    model = spec.build(schema, spec.make_args("ml1m"), "cpu")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from data.schema import Schema
from models.blocks import place
from models.hstu.attention import IMPLS
from models.hstu.layer import HSTULayer
from models.sequential import (
    SequentialArgs,
    SequentialEncoder,
    SequentialModel,
    build_sequence_ec,
    check_sequential_args,
)
from models.spec import ModelSpec


@dataclass
class HSTUArgs(SequentialArgs):
    """Arguments of the HSTU model (plus the shared :class:`SequentialArgs`)."""

    #: HSTU layers.
    num_layers: int = 2
    #: attention heads.
    num_heads: int = 1
    #: per-head Q/K and U/V widths (0: D // num_heads).
    attn_dim: int = 0
    linear_dim: int = 0
    #: dropout on the input and inside every layer.
    dropout: float = 0.2
    #: relative time-gap bias (needs timestamps on the item feature).
    time_bias: bool = True
    #: time-gap buckets of that bias.
    num_time_buckets: int = 128
    #: attention implementation: auto (triton on CUDA; on CPU compiled_jagged, the C++
    #: kernel, where it builds, else pytorch_jagged with one log line), compiled_jagged,
    #: pytorch_jagged, pytorch_padded, triton, or semi_local (a local window plus global
    #: tokens instead of full causal attention: cost O(ΣLᵢ·(W + G)) instead of O(ΣLᵢ²)).
    attention_impl: str = "auto"
    #: semi_local only: each query sees the last ``semi_local_window`` positions (itself
    #: included) ...
    semi_local_window: int = 256
    #: ... and its sequence's first ``semi_local_global_tokens`` positions.
    semi_local_global_tokens: int = 4


class HSTUEncoder(SequentialEncoder):
    """Stack of HSTU layers over the embedded jagged history (see the module docstring)."""

    def __init__(self, item_feature: str, action_feature: str, dim: int, max_len: int,
                 args: HSTUArgs, use_time: bool) -> None:
        super().__init__(item_feature, action_feature, dim, max_len, args.dropout)
        self.use_time = use_time
        self.layers = nn.ModuleList([
            HSTULayer(dim, args.num_heads, max_len, attn_dim=args.attn_dim or None,
                      linear_dim=args.linear_dim or None,
                      num_time_buckets=args.num_time_buckets if use_time else None,
                      dropout=args.dropout, impl=args.attention_impl,
                      window=args.semi_local_window,
                      global_tokens=args.semi_local_global_tokens)
            for _ in range(args.num_layers)])

    def encode(self, x: torch.Tensor, offsets: torch.Tensor,
               timestamps: Optional[torch.Tensor],
               query_timestamps: Optional[torch.Tensor]) -> torch.Tensor:
        ts, tq = (timestamps, query_timestamps) if self.use_time else (None, None)
        for layer in self.layers:
            x = layer(x, offsets, ts, tq)
        return x


def build_hstu(schema: Schema, args: HSTUArgs, device: str = "meta") -> SequentialModel:
    check_sequential_args(args)
    if args.num_layers < 1 or args.num_heads < 1:
        raise ValueError("model.args.num_layers and model.args.num_heads must be >= 1")
    if args.attention_impl not in IMPLS:
        raise ValueError(f"model.args.attention_impl {args.attention_impl!r} is not one of "
                         f"{', '.join(IMPLS)}")
    if args.attention_impl == "semi_local" and (args.semi_local_window < 1
                                                 or args.semi_local_global_tokens < 0):
        raise ValueError(f"model.args.semi_local_window must be >= 1 and "
                         f"model.args.semi_local_global_tokens >= 0; got "
                         f"{args.semi_local_window} and {args.semi_local_global_tokens}")
    ec, item, dim = build_sequence_ec(schema, args, device)
    if dim % args.num_heads and not (args.attn_dim and args.linear_dim):
        raise ValueError(f"model.args.num_heads {args.num_heads} does not divide D={dim}; set "
                         f"model.args.attn_dim and model.args.linear_dim")
    use_time = bool(args.time_bias and item.timestamps)
    encoder = HSTUEncoder(item.name, args.action_feature, dim, args.max_len or item.max_len,
                          args, use_time)
    model = SequentialModel(ec, encoder, item.table or item.name, item.num_embeddings)
    return place(model, device)


MODEL_SPEC = ModelSpec(
    name="hstu",
    args_cls=HSTUArgs,
    build=build_hstu,
    flavours={
        "default": HSTUArgs(),
        # The paper's MovieLens-1M settings (2 layers, D=50, 1 head, n=200, dropout 0.2), with
        # D=52: fbgemm's fused tables need a multiple of 4.
        "ml1m": HSTUArgs(num_layers=2, num_heads=1, embedding_dim=52, max_len=200,
                         dropout=0.2),
        # MovieLens-20M: 4 layers, D=256, 4 heads (the paper's larger MovieLens setting).
        "ml20m": HSTUArgs(num_layers=4, num_heads=4, embedding_dim=256, max_len=200,
                          dropout=0.2),
    },
    task="sequential",
    description="HSTU: jagged pointwise-attention generative recommender (next item, "
                "sampled softmax, full-ranking eval)",
)
