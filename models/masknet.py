"""MaskNet (Wang et al. 2021, "MaskNet: Introducing Feature-Wise Multiplication to CTR
Ranking Models by Instance-Guided Mask") over sharded pooled embeddings.

Fields: the pooled embedding of every sparse feature and, when there are dense features, one
field projected from them, all of width D: ``V_emb = [e_1 ‖ … ‖ e_m]`` (``[B, m·D]``). Each
MaskBlock multiplies its input feature-wise by an instance-guided mask computed from
``V_emb``::

    V_mask = W_2 ReLU(W_1 V_emb + β_1) + β_2                  (aggregation r·m·D, projection)
    V_out  = ReLU(LN(W_i (V_mask ⊙ V_in)))                     (hidden layer, width h)

On embeddings ``V_in = LN_emb(V_emb)`` (layer norm over each field's D coordinates); on a
previous block's output ``V_in = V_prev`` (then the mask's projection has width h).

* ``serial`` (SerMaskNet): block 1 on the embeddings, block k on block k−1's output;
  ``logit = w · V_out^K + b``;
* ``parallel`` (ParaMaskNet): K blocks on the embeddings, each with its own mask;
  ``logit = w · MLP([V_out^1 ‖ … ‖ V_out^K]) + b``.

Shapes: ``Batch.dense [B, Dd]``, ``Batch.sparse`` KJT with F keys → logits ``[B]``.

Example::

    spec = get_model_spec("masknet")
    model = spec.build(schema, spec.make_args("parallel"), "cpu")
    logits = model(batch)      # [B]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mlp import MLP

from data.batch import Batch
from data.schema import Schema
from models.blocks import build_ebc, kept_head, place, stack_fields, uniform_width
from models.spec import ModelSpec

MODES = ("serial", "parallel")


@dataclass
class MaskNetArgs:
    """Arguments of :class:`MaskNet`."""

    #: table width D of every pooled table (a multiple of 4); ``None`` uses the schema's
    #: (then all pooled tables must agree).
    embedding_dim: Optional[int] = None
    #: ``serial`` (SerMaskNet) or ``parallel`` (ParaMaskNet).
    mode: str = "parallel"
    #: number of MaskBlocks K.
    num_blocks: int = 3
    #: width h of every MaskBlock's hidden layer.
    block_dim: int = 64
    #: reduction ratio r: the mask's aggregation layer is r × its input width (m·D).
    mask_ratio: float = 2.0
    #: hidden sizes of the MLP over the concatenated blocks (parallel mode only).
    head_dims: List[int] = field(default_factory=lambda: [256, 128])

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"model.args.mode={self.mode!r}; choose one of {list(MODES)}")
        if self.num_blocks < 1 or self.block_dim < 1:
            raise ValueError(f"model.args.num_blocks={self.num_blocks} and block_dim="
                             f"{self.block_dim} must be >= 1")
        if not self.mask_ratio > 0:
            raise ValueError(f"model.args.mask_ratio={self.mask_ratio} must be > 0")
        if self.embedding_dim is not None and self.embedding_dim % 4:
            raise ValueError(f"model.args.embedding_dim={self.embedding_dim} must be a "
                             f"multiple of 4 (fbgemm kernels)")


class MaskBlock(nn.Module):
    """``V_out = ReLU(LN(W_i (V_mask ⊙ V_in)))`` with ``V_mask = W_2 ReLU(W_1 V_emb + β_1) + β_2``.

    Shapes: ``v_emb [B, E]``, ``v_in [B, N]`` → ``[B, out_dim]``.

    Args:
        emb_dim: E, the width of the flattened embeddings the mask is computed from.
        in_dim: N, the width of the block's input (E on embeddings, h after a block).
        out_dim: h.
        ratio: aggregation width = ``max(1, round(ratio · E))``.

    Example::

        MaskBlock(40, 40, 16, 2.0)(torch.randn(4, 40), torch.randn(4, 40)).shape  # [4, 16]
    """

    def __init__(self, emb_dim: int, in_dim: int, out_dim: int, ratio: float) -> None:
        super().__init__()
        agg = max(1, round(ratio * emb_dim))
        self.aggregation = nn.Linear(emb_dim, agg)
        self.projection = nn.Linear(agg, in_dim)
        self.hidden = nn.Linear(in_dim, out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def mask(self, v_emb: torch.Tensor) -> torch.Tensor:
        return self.projection(torch.relu(self.aggregation(v_emb)))

    def forward(self, v_emb: torch.Tensor, v_in: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.hidden(self.mask(v_emb) * v_in)))


class MaskNet(nn.Module):
    """See the module docstring.

    Args:
        ebc: unsharded EBC over the pooled tables (width D).
        feature_names: the pooled features, in field order.
        dense_in: number of dense features ``Dd`` (projected into one field).
        args: :class:`MaskNetArgs`.
        with_head: False builds a backbone for multi-task heads: no ``head`` (the logit
            layer); only :meth:`representation` is used.
    """

    def __init__(self, ebc: EmbeddingBagCollection, feature_names: List[str], dense_in: int,
                 args: MaskNetArgs, with_head: bool = True) -> None:
        super().__init__()
        args.validate()
        dims = {c.embedding_dim for c in ebc.embedding_bag_configs()}
        if len(dims) != 1:
            raise ValueError(f"MaskNet tables must share one width, got {sorted(dims)}; set "
                             f"model.args.embedding_dim")
        self.dim = dims.pop()
        self.ebc = ebc
        self.feature_names = list(feature_names)
        self.dense_in = dense_in
        self.mode = args.mode
        if dense_in:
            self.dense_proj = nn.Linear(dense_in, self.dim)
        emb = (len(self.feature_names) + (1 if dense_in else 0)) * self.dim
        self.emb_norm = nn.LayerNorm(self.dim)
        h = args.block_dim
        if self.mode == "serial":
            self.blocks = nn.ModuleList(
                MaskBlock(emb, emb if k == 0 else h, h, args.mask_ratio)
                for k in range(args.num_blocks))
            self.mlp: nn.Module = nn.Identity()
            out = h
        else:
            self.blocks = nn.ModuleList(MaskBlock(emb, emb, h, args.mask_ratio)
                                        for _ in range(args.num_blocks))
            cat = args.num_blocks * h
            self.mlp = MLP(cat, args.head_dims) if args.head_dims else nn.Identity()
            out = args.head_dims[-1] if args.head_dims else cat
        self.head_in = out
        self.head = kept_head(nn.Linear(out, 1), with_head)

    def embeddings(self, batch: Batch) -> torch.Tensor:
        """``V_emb [B, m, D]``: the dense field (if any) then the sparse fields."""
        emb = stack_fields(self.ebc(batch.sparse), self.feature_names, self.dim)
        if self.dense_in:
            emb = torch.cat([self.dense_proj(batch.dense).unsqueeze(1), emb], dim=1)
        return emb

    @property
    def representation_dim(self) -> int:
        """Width H of :meth:`representation` (the head's input)."""
        return self.head_in

    def representation(self, batch: Batch) -> torch.Tensor:
        """``[B, H]``: the last block's output (serial) or the MLP over all blocks
        (parallel); ``forward(batch) == head(representation(batch)).squeeze(1)``."""
        fields = self.embeddings(batch)
        v_emb = fields.flatten(1)
        v_in = self.emb_norm(fields).flatten(1)
        if self.mode == "serial":
            for block in self.blocks:
                v_in = block(v_emb, v_in)
            return v_in
        return self.mlp(torch.cat([block(v_emb, v_in) for block in self.blocks], dim=1))

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.head(self.representation(batch)).squeeze(1)


def build_masknet(schema: Schema, args: MaskNetArgs, device: str = "meta",
                  with_head: bool = True) -> MaskNet:
    args.validate()
    names = [f for t in schema.tables("sparse").values() for f in t.features]
    ebc = build_ebc(schema, device, embedding_dim=uniform_width(schema, args.embedding_dim,
                                                             "MaskNet", "sparse"))
    model = MaskNet(ebc, names, schema.dense_dim, args, with_head)
    return place(model, device)


MODEL_SPEC = ModelSpec(
    name="masknet",
    args_cls=MaskNetArgs,
    build=build_masknet,
    flavours={
        "default": MaskNetArgs(),
        "parallel": MaskNetArgs(mode="parallel"),
        "serial": MaskNetArgs(mode="serial"),
        "small": MaskNetArgs(num_blocks=2, block_dim=32, head_dims=[64]),
        "small_serial": MaskNetArgs(mode="serial", num_blocks=2, block_dim=32),
    },
    task="ctr",
    description="MaskNet: instance-guided masks over layer-normalised embeddings, serial or "
                "parallel MaskBlocks",
    backbone=True,
)
