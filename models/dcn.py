"""DCN (Wang et al. 2017, "Deep & Cross Network for Ad Click Predictions"; DCN v1) over
sharded pooled embeddings.

The input is ``x_0 = [dense ‖ e_1 ‖ … ‖ e_F]`` (``[B, N]``: raw dense features and the
flattened pooled embeddings; tables may differ in width). The cross network applies L
vector cross layers (torchrec ``VectorCrossNet``)

    x_{l+1} = x_0 x_lᵀ w_l + b_l + x_l = x_0 · (w_l · x_l) + b_l + x_l

with ``w_l, b_l ∈ R^N``: each layer adds one degree of explicit feature crossing for 2N
parameters. The deep network is torchrec's ``MLP``. Two structures:

* ``parallel`` (the paper's):  logit = w · [Cross(x_0) ‖ MLP(x_0)] + b
* ``stacked``:                 logit = w · MLP(Cross(x_0)) + b

DCN-v2 (``dcn_v2``) replaces the vector ``w_l`` by a matrix.

Shapes: ``Batch.dense [B, Dd]``, ``Batch.sparse`` KJT with F keys → logits ``[B]``.

Example::

    spec = get_model_spec("dcn")
    model = spec.build(schema, spec.make_args("default"), "cpu")
    logits = model(batch)      # [B]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn
from torchrec.modules.crossnet import VectorCrossNet
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mlp import MLP

from data.batch import Batch
from data.schema import Schema
from models.blocks import build_ebc, kept_head, place
from models.spec import ModelSpec

STRUCTURES = ("parallel", "stacked")


@dataclass
class DCNArgs:
    """Arguments of :class:`DCN`."""

    #: table width for every pooled table (a multiple of 4); ``None`` keeps the schema's.
    embedding_dim: Optional[int] = None
    #: number of vector cross layers L.
    cross_layers: int = 3
    #: ``parallel`` (deep beside cross, the paper's) or ``stacked`` (deep after cross).
    structure: str = "parallel"
    #: hidden layer sizes of the deep MLP (empty: no deep network, cross only).
    deep_dims: List[int] = field(default_factory=lambda: [256, 128])
    #: factor on the stored embeddings in ``x_0`` (as DeepFM's ``field_scale``); 1 = none.
    field_scale: float = 1.0

    def validate(self) -> None:
        if not (self.field_scale > 0 and math.isfinite(self.field_scale)):
            raise ValueError(f"model.args.field_scale={self.field_scale} must be > 0")
        if self.structure not in STRUCTURES:
            raise ValueError(f"model.args.structure={self.structure!r}; choose one of "
                             f"{list(STRUCTURES)}")
        if self.cross_layers < 1:
            raise ValueError(f"model.args.cross_layers={self.cross_layers} must be >= 1")
        if self.embedding_dim is not None and self.embedding_dim % 4:
            raise ValueError(f"model.args.embedding_dim={self.embedding_dim} must be a "
                             f"multiple of 4 (fbgemm kernels)")


class DCN(nn.Module):
    """See the module docstring.

    Args:
        ebc: unsharded EBC over the pooled tables.
        feature_names: the pooled features, in the order they are concatenated into ``x_0``.
        dense_in: number of dense features ``Dd``.
        args: :class:`DCNArgs`.
        with_head: False builds a backbone for multi-task heads: no ``head`` (the logit
            layer); only :meth:`representation` is used.
    """

    def __init__(self, ebc: EmbeddingBagCollection, feature_names: List[str], dense_in: int,
                 args: DCNArgs, with_head: bool = True) -> None:
        super().__init__()
        args.validate()
        self.ebc = ebc
        self.feature_names = list(feature_names)
        dims = {f: c.embedding_dim for c in ebc.embedding_bag_configs()
                for f in c.feature_names}
        in_features = dense_in + sum(dims[f] for f in self.feature_names)
        self.dense_in = dense_in
        self.structure = args.structure
        self.field_scale = args.field_scale
        self.cross = VectorCrossNet(in_features, args.cross_layers)
        self.deep = MLP(in_features, args.deep_dims) if args.deep_dims else nn.Identity()
        deep_out = args.deep_dims[-1] if args.deep_dims else in_features
        if self.structure == "parallel" and args.deep_dims:
            head_in = in_features + deep_out
        else:
            head_in = deep_out
        self.head_in = head_in
        self.head = kept_head(nn.Linear(head_in, 1), with_head)

    def cross_input(self, batch: Batch) -> torch.Tensor:
        """``x_0 = [dense ‖ s·e_1 ‖ … ‖ s·e_F]`` of shape ``[B, N]`` (s = ``field_scale``)."""
        by_name = self.ebc(batch.sparse).to_dict()
        emb = torch.cat([by_name[n] for n in self.feature_names], dim=1) * self.field_scale
        return torch.cat([batch.dense, emb], dim=1) if self.dense_in else emb

    @property
    def representation_dim(self) -> int:
        """Width H of :meth:`representation` (the head's input)."""
        return self.head_in

    def representation(self, batch: Batch) -> torch.Tensor:
        """``[B, H]``: the cross/deep output the head maps to the logit (for multi-task
        heads); ``forward(batch) == head(representation(batch)).squeeze(1)``."""
        x0 = self.cross_input(batch)
        if self.structure == "stacked" or isinstance(self.deep, nn.Identity):
            return self.deep(self.cross(x0))
        return torch.cat([self.cross(x0), self.deep(x0)], dim=1)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.head(self.representation(batch)).squeeze(1)


def build_dcn(schema: Schema, args: DCNArgs, device: str = "meta",
              with_head: bool = True) -> DCN:
    args.validate()
    names = [f for t in schema.tables("sparse").values() for f in t.features]
    ebc = build_ebc(schema, device, embedding_dim=args.embedding_dim)
    model = DCN(ebc, names, schema.dense_dim, args, with_head)
    return place(model, device)


MODEL_SPEC = ModelSpec(
    name="dcn",
    args_cls=DCNArgs,
    build=build_dcn,
    flavours={
        "default": DCNArgs(),
        "stacked": DCNArgs(structure="stacked"),
        "cross_only": DCNArgs(deep_dims=[]),
        "small": DCNArgs(cross_layers=2, deep_dims=[64, 32]),
    },
    task="ctr",
    description="DCN (v1): vector cross layers x0·(w·xl) + b + xl with a deep MLP, parallel "
                "or stacked, over dense inputs and pooled embeddings",
    backbone=True,
)
