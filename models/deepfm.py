"""DeepFM (Guo et al. 2017) over sharded pooled embeddings.

    logit = b + Σ_f w_f + dense·β                      first order
          + ½ Σ_d [(Σ_i e_i)_d² − Σ_i e_id²]           FM second order over F+1 fields
          + MLP(flatten(e_0 … e_F))                    deep part

``e_1 … e_F`` are the pooled embeddings of the F sparse features (dim D); ``e_0`` is the
dense features projected into the same D-space, so dense inputs take part in both the FM and
the deep part. The last column of every table is the per-id first-order weight ``w`` and the
other ``D = width − 1`` columns are the FM vector: one sharded lookup serves both terms,
instead of a second set of tables with its own all-to-all. (The width itself must stay a
multiple of 4, which fbgemm's fused kernels require, so the weight is carved out of it
rather than appended.)

``field_scale`` (default 1) multiplies the stored sparse FM vectors, as AutoInt's does. Tables
start at torchrec's ``±1/√rows``, so the FM products start near their zero saddle; under
row-wise Adagrad a larger step only adds noise, while a scale s with the step divided by s
starts the vectors s times larger for the same output step. Measured as the backbone of MMoE
on the two-task synthetic set (``data.synth ctr2 --preset ci``, 2 ranks): click AUC gap to
the oracle after one epoch 0.034 unscaled (embedding lr 0.2; 0.053 at lr 0.05) vs 0.028 with
scale 4 and lr 0.1, after two epochs 0.025 vs 0.022 (docs/multitask.md).

Shapes: ``Batch.dense [B, Dd]``, ``Batch.sparse`` KJT with F keys → logits ``[B]``.

Example::

    spec = get_model_spec("deepfm")
    model = spec.build(schema, spec.make_args("default"), "cpu")
    logits = model(batch)      # [B]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mlp import MLP

from data.batch import Batch
from data.schema import Schema
from models.blocks import (FactorizationMachine, build_ebc, kept_head, place, stack_fields,
                           uniform_width)
from models.spec import ModelSpec


@dataclass
class DeepFMArgs:
    """Arguments of :class:`DeepFM`."""

    #: table width (FM vector = width - 1, plus the first-order column); a multiple of 4.
    #: ``None`` uses the schema's (then all tables must agree).
    embedding_dim: Optional[int] = None
    #: hidden layer sizes of the deep MLP (a final linear layer maps to one logit).
    deep_dims: List[int] = field(default_factory=lambda: [256, 128])
    #: hidden sizes of the dense-feature projection before the last linear to D.
    dense_dims: List[int] = field(default_factory=lambda: [64])
    #: factor on the stored sparse FM vectors (as AutoInt's ``field_scale``); 1 = none.
    field_scale: float = 1.0


def table_width(schema: Schema, args: DeepFMArgs, model: str = "DeepFM") -> int:
    """The one table width ``model`` needs, from ``args.embedding_dim`` or the (uniform)
    schema; the last column is the first-order weight (also used by AutoInt), hence >= 8."""
    return uniform_width(schema, args.embedding_dim, model, "sparse", min_width=8)


class DeepFM(nn.Module):
    """See the module docstring.

    Args:
        ebc: unsharded EBC whose tables are ``D + 1`` wide (last column: first-order weight).
        feature_names: the pooled features, in the order their fields are stacked.
        dense_in: number of dense features ``Dd``.
        args: :class:`DeepFMArgs`.
        with_head: False builds a backbone for multi-task heads: no logit layer
            (``deep[1]``) and no ``bias``; only :meth:`representation` is used.
    """

    def __init__(self, ebc: EmbeddingBagCollection, feature_names: List[str], dense_in: int,
                 args: DeepFMArgs, with_head: bool = True) -> None:
        super().__init__()
        dims = {c.embedding_dim for c in ebc.embedding_bag_configs()}
        if len(dims) != 1:
            raise ValueError(f"DeepFM tables must share one width, got {sorted(dims)}")
        self.dim = dims.pop() - 1
        self.ebc = ebc
        self.feature_names = list(feature_names)
        self.dense_in = dense_in
        if not (args.field_scale > 0 and math.isfinite(args.field_scale)):
            raise ValueError(f"model.args.field_scale={args.field_scale} must be > 0")
        self.field_scale = args.field_scale
        num_fields = len(self.feature_names) + (1 if dense_in else 0)
        if dense_in:
            self.dense_proj = nn.Sequential(
                MLP(dense_in, args.dense_dims) if args.dense_dims else nn.Identity(),
                nn.Linear(args.dense_dims[-1] if args.dense_dims else dense_in, self.dim),
            )
            self.dense_linear = nn.Linear(dense_in, 1)
        self.fm = FactorizationMachine()
        self.hidden_dim = args.deep_dims[-1] if args.deep_dims else num_fields * self.dim
        # deep = [MLP, logit layer]: the logit layer is the model's head (kept_head).
        mlp = MLP(num_fields * self.dim, args.deep_dims)
        logit = kept_head(nn.Linear(self.hidden_dim, 1), with_head)
        self.deep = nn.Sequential(mlp, logit) if logit is not None else nn.Sequential(mlp)
        self.bias = nn.Parameter(torch.zeros(1)) if with_head else None

    def fields(self, batch: Batch) -> tuple:
        """``(fields [B, F(+1), D], first_order [B])`` — the shared representation."""
        emb = stack_fields(self.ebc(batch.sparse), self.feature_names, self.dim + 1)
        vectors = emb[:, :, : self.dim] * self.field_scale
        first = emb[:, :, self.dim].sum(dim=1)
        if self.dense_in:
            vectors = torch.cat([self.dense_proj(batch.dense).unsqueeze(1), vectors], dim=1)
            first = first + self.dense_linear(batch.dense).squeeze(1)
        return vectors, first

    @property
    def representation_dim(self) -> int:
        """Width H of :meth:`representation`: deep hidden size + D + 1."""
        return self.hidden_dim + self.dim + 1

    def representation(self, batch: Batch) -> torch.Tensor:
        """``[B, H] = [h ‖ fm ‖ first]``, what the logit is a linear function of (for
        multi-task heads): ``h`` the deep MLP's last hidden layer, ``fm`` the per-dimension
        FM terms ``½[(Σ_i e_i)² − Σ_i e_i²]`` (``[B, D]``, they sum to the FM logit) and
        ``first`` the first-order term; ``logit = deep[-1](h) + Σ fm + first + bias``."""
        vectors, first = self.fields(batch)
        fm = 0.5 * (vectors.sum(dim=1).pow(2) - vectors.pow(2).sum(dim=1))
        return torch.cat([self.deep[0](vectors.flatten(1)), fm, first.unsqueeze(1)], dim=1)

    def forward(self, batch: Batch) -> torch.Tensor:
        vectors, first = self.fields(batch)
        second = self.fm(vectors)
        deep = self.deep(vectors.flatten(1)).squeeze(1)
        return first + second + deep + self.bias


def build_deepfm(schema: Schema, args: DeepFMArgs, device: str = "meta",
                 with_head: bool = True) -> DeepFM:
    names = [f for t in schema.tables("sparse").values() for f in t.features]
    ebc = build_ebc(schema, device, embedding_dim=table_width(schema, args))
    model = DeepFM(ebc, names, schema.dense_dim, args, with_head)
    return place(model, device)


MODEL_SPEC = ModelSpec(
    name="deepfm",
    args_cls=DeepFMArgs,
    build=build_deepfm,
    flavours={
        "default": DeepFMArgs(),
        "small": DeepFMArgs(deep_dims=[64, 32], dense_dims=[32]),
        "large": DeepFMArgs(deep_dims=[1024, 512, 256], dense_dims=[256]),
    },
    task="ctr",
    description="DeepFM: first-order + FM + deep MLP over pooled embeddings and dense inputs",
    backbone=True,
)
