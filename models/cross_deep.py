"""The structure DCN (v1, :mod:`models.dcn`) and DCN-v2 (:mod:`models.dcn_v2`) share: a cross
network and a deep MLP over ``x_0 = [dense ‖ s·e_1 ‖ … ‖ s·e_F]``, stacked or parallel, and a
linear head. The two models differ only in their cross network (vector vs matrix kernels),
which they pass in, and in what a parallel model without a deep network feeds its head.

* ``stacked``:  logit = w · MLP(Cross(x_0)) + b
* ``parallel``: logit = w · [Cross(x_0) ‖ MLP(x_0)] + b

Without a deep network (``deep_dims = []``) the MLP is the identity: a stacked model's head
sees ``Cross(x_0)``; a parallel one's sees ``[Cross(x_0) ‖ x_0]`` when
``parallel_keeps_input`` (DCN-v2) or ``Cross(x_0)`` alone (DCN v1).

Shapes: ``Batch.dense [B, Dd]``, ``Batch.sparse`` KJT with F keys → ``x_0 [B, N]`` (N = Dd +
Σ table widths) → representation ``[B, H]`` → logits ``[B]``.

Example::

    from torchrec.modules.crossnet import CrossNet
    model = CrossDeep(ebc, ["s0", "s1"], 4, CrossNet(4 + 2 * 16, 2), "stacked", [64, 32])
    logits = model(batch)                 # [B]
    rep = model.representation(batch)     # [B, 32]
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mlp import MLP

from data.batch import Batch
from data.schema import Schema
from models.blocks import kept_head

STRUCTURES = ("parallel", "stacked")


def cross_input_width(ebc: EmbeddingBagCollection, feature_names: List[str],
                      dense_in: int) -> int:
    """N, the width of ``x_0``: the dense features plus every pooled feature's table width."""
    dims = {f: c.embedding_dim for c in ebc.embedding_bag_configs() for f in c.feature_names}
    return dense_in + sum(dims[f] for f in feature_names)


def pooled_feature_names(schema: Schema) -> List[str]:
    """The pooled features in table order: the order they are concatenated into ``x_0``."""
    return [f for t in schema.tables("sparse").values() for f in t.features]


class CrossDeep(nn.Module):
    """See the module docstring.

    Args:
        ebc: unsharded EBC over the pooled tables.
        feature_names: the pooled features, in the order they are concatenated into ``x_0``.
        dense_in: number of dense features ``Dd``.
        cross: the cross network, ``[B, N]`` → ``[B, N]``.
        structure: ``stacked`` or ``parallel``.
        deep_dims: hidden sizes of the deep MLP (empty: no deep network).
        field_scale: factor on the stored embeddings in ``x_0`` (1 = none).
        parallel_keeps_input: a parallel model without a deep network feeds its head
            ``[Cross(x_0) ‖ x_0]`` (True) or ``Cross(x_0)`` (False).
        with_head: False builds a backbone for multi-task heads: no ``head`` (the logit
            layer); only :meth:`representation` is used.
    """

    def __init__(self, ebc: EmbeddingBagCollection, feature_names: List[str], dense_in: int,
                 cross: nn.Module, structure: str, deep_dims: List[int],
                 field_scale: float = 1.0, parallel_keeps_input: bool = True,
                 with_head: bool = True) -> None:
        super().__init__()
        if structure not in STRUCTURES:
            raise ValueError(f"model.args.structure={structure!r}; choose one of "
                             f"{list(STRUCTURES)}")
        self.ebc = ebc
        self.feature_names = list(feature_names)
        in_features = cross_input_width(ebc, self.feature_names, dense_in)
        self.dense_in = dense_in
        self.field_scale = field_scale
        self.cross = cross
        self.deep = MLP(in_features, deep_dims) if deep_dims else nn.Identity()
        deep_out = deep_dims[-1] if deep_dims else in_features
        # The one difference between the two models: what a parallel model without a deep
        # network concatenates (see the module docstring).
        self.concat = structure == "parallel" and (bool(deep_dims) or parallel_keeps_input)
        self.head_in = in_features + deep_out if self.concat else deep_out
        self.head = kept_head(nn.Linear(self.head_in, 1), with_head)

    def cross_input(self, batch: Batch) -> torch.Tensor:
        """``x_0 = [dense ‖ s·e_1 ‖ … ‖ s·e_F]`` of shape ``[B, N]`` (s = ``field_scale``;
        features by name: sharded and unsharded EBCs may order their output keys
        differently)."""
        by_name = self.ebc(batch.sparse).to_dict()
        emb = torch.cat([by_name[n] for n in self.feature_names], dim=1)
        if self.field_scale != 1.0:
            emb = emb * self.field_scale
        return torch.cat([batch.dense, emb], dim=1) if self.dense_in else emb

    @property
    def representation_dim(self) -> int:
        """Width H of :meth:`representation` (the head's input)."""
        return self.head_in

    def representation(self, batch: Batch) -> torch.Tensor:
        """``[B, H]``: the cross/deep output the head maps to the logit (for multi-task
        heads); ``forward(batch) == head(representation(batch)).squeeze(1)``."""
        x0 = self.cross_input(batch)
        if self.concat:
            return torch.cat([self.cross(x0), self.deep(x0)], dim=1)
        return self.deep(self.cross(x0))

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.head(self.representation(batch)).squeeze(1)
