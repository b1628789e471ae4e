"""Wide & Deep (Cheng et al. 2016, "Wide & Deep Learning for Recommender Systems") over
sharded pooled embeddings.

    logit = b + Σ_f w_f(ids_f) + dense·β                    wide (first order)
          + w · MLP([dense ‖ e_1 ‖ … ‖ e_F'])               deep

The wide part is a linear model over every sparse feature's ids (``w_f(ids_f)`` is the pooled
per-id weight: a sum over a multi-hot row) and the raw dense features. The paper's wide part
also takes cross-product transformations (``AND(gender=female, language=en)``); here a crossed
feature is an ordinary sparse feature of the schema whose ids are the hashed crosses (a
converter or a preprocessing step makes them). Features named in ``wide_only`` (typically
those crosses) feed only the wide part, as in the paper; all others feed both.

As in DeepFM, the last column of every table is the per-id wide weight and the other
``D = width − 1`` columns the deep embedding, so one sharded lookup serves both parts.

Shapes: ``Batch.dense [B, Dd]``, ``Batch.sparse`` KJT with F keys → logits ``[B]``.

Example::

    spec = get_model_spec("wide_deep")
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
from models.blocks import build_ebc, kept_head, place, stack_fields
from models.deepfm import table_width
from models.spec import ModelSpec


@dataclass
class WideDeepArgs:
    """Arguments of :class:`WideDeep`."""

    #: table width (deep embedding = width - 1, plus the wide weight column); a multiple of
    #: 4. ``None`` uses the schema's (then all pooled tables must agree).
    embedding_dim: Optional[int] = None
    #: hidden layer sizes of the deep MLP (a final linear layer maps to one logit).
    deep_dims: List[int] = field(default_factory=lambda: [256, 128])
    #: sparse features used only by the wide part (e.g. crossed-id features).
    wide_only: List[str] = field(default_factory=list)
    #: factor on the stored deep embeddings (as DeepFM's and AutoInt's ``field_scale``).
    field_scale: float = 1.0


class WideDeep(nn.Module):
    """See the module docstring.

    Args:
        ebc: unsharded EBC whose tables are ``D + 1`` wide (last column: wide weight).
        feature_names: the pooled features, in field order.
        dense_in: number of dense features ``Dd``.
        args: :class:`WideDeepArgs`.
        with_head: False builds a backbone for multi-task heads: no logit layer
            (``deep[1]``) and no ``bias``; only :meth:`representation` is used.
    """

    def __init__(self, ebc: EmbeddingBagCollection, feature_names: List[str], dense_in: int,
                 args: WideDeepArgs, with_head: bool = True) -> None:
        super().__init__()
        dims = {c.embedding_dim for c in ebc.embedding_bag_configs()}
        if len(dims) != 1:
            raise ValueError(f"WideDeep tables must share one width, got {sorted(dims)}")
        self.dim = dims.pop() - 1
        unknown = sorted(set(args.wide_only) - set(feature_names))
        if unknown:
            raise ValueError(f"model.args.wide_only names {unknown}, not sparse features of "
                             f"the schema ({', '.join(feature_names)})")
        if not (args.field_scale > 0 and math.isfinite(args.field_scale)):
            raise ValueError(f"model.args.field_scale={args.field_scale} must be > 0")
        self.field_scale = args.field_scale
        self.ebc = ebc
        self.feature_names = list(feature_names)
        self.deep_names = [f for f in feature_names if f not in set(args.wide_only)]
        if not self.deep_names and not dense_in:
            raise ValueError("model.args.wide_only leaves the deep part no input")
        self.dense_in = dense_in
        deep_in = dense_in + len(self.deep_names) * self.dim
        if dense_in:
            self.dense_linear = nn.Linear(dense_in, 1)
        self.hidden_dim = args.deep_dims[-1] if args.deep_dims else deep_in
        # deep = [MLP, logit layer]: the logit layer is the model's head (kept_head).
        mlp = MLP(deep_in, args.deep_dims) if args.deep_dims else nn.Identity()
        logit = kept_head(nn.Linear(self.hidden_dim, 1), with_head)
        self.deep = nn.Sequential(mlp, logit) if logit is not None else nn.Sequential(mlp)
        self.bias = nn.Parameter(torch.zeros(1)) if with_head else None

    def parts(self, batch: Batch) -> tuple:
        """``(deep input [B, Dd + F'·D], wide logit [B])``."""
        emb = stack_fields(self.ebc(batch.sparse), self.feature_names, self.dim + 1)
        wide = emb[:, :, self.dim].sum(dim=1)
        index = [self.feature_names.index(f) for f in self.deep_names]
        deep_in = emb[:, index, : self.dim].flatten(1) * self.field_scale
        if self.dense_in:
            wide = wide + self.dense_linear(batch.dense).squeeze(1)
            deep_in = torch.cat([batch.dense, deep_in], dim=1)
        return deep_in, wide

    @property
    def representation_dim(self) -> int:
        """Width H of :meth:`representation`: deep hidden size + 1."""
        return self.hidden_dim + 1

    def representation(self, batch: Batch) -> torch.Tensor:
        """``[B, H] = [h ‖ wide]`` (for multi-task heads): ``h`` the deep MLP's last hidden
        layer; ``logit = deep[-1](h) + wide + bias``."""
        deep_in, wide = self.parts(batch)
        return torch.cat([self.deep[0](deep_in), wide.unsqueeze(1)], dim=1)

    def forward(self, batch: Batch) -> torch.Tensor:
        deep_in, wide = self.parts(batch)
        return wide + self.deep(deep_in).squeeze(1) + self.bias


def build_wide_deep(schema: Schema, args: WideDeepArgs, device: str = "meta",
                    with_head: bool = True) -> WideDeep:
    names = [f for t in schema.tables("sparse").values() for f in t.features]
    ebc = build_ebc(schema, device, embedding_dim=table_width(schema, args, "WideDeep"))
    model = WideDeep(ebc, names, schema.dense_dim, args, with_head)
    return place(model, device)


MODEL_SPEC = ModelSpec(
    name="wide_deep",
    args_cls=WideDeepArgs,
    build=build_wide_deep,
    flavours={
        "default": WideDeepArgs(),
        "small": WideDeepArgs(deep_dims=[64, 32]),
        "large": WideDeepArgs(deep_dims=[1024, 512, 256]),
    },
    task="ctr",
    description="Wide & Deep: a linear model over the sparse ids and dense inputs plus a "
                "deep MLP over embeddings",
    backbone=True,
)
