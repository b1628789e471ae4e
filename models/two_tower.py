"""Two-tower retrieval (the model of YouTube's candidate generation, Yi et al. 2019): a user
tower over pooled user features and the mean-pooled history, an item tower over the item id.

User tower: ``MLP([profile ‖ mean_j e(hist_j)]) → [B, 1, D]``, L2-normalised; item tower: the
L2-normalised item-table row (see :mod:`models.retrieval`). Trained with the ``retrieval`` task
kind's sampled softmax (cross-rank in-batch + uniform negatives, logQ correction).

Example::

    spec = get_model_spec("two_tower")
    model = spec.build(schema, spec.make_args("default"), "cpu")
    model(batch).user.shape      # [B, 1, D]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from data.schema import Schema
from models.blocks import place
from models.retrieval import (
    RetrievalArgs,
    RetrievalModel,
    UserTower,
    build_retrieval_tables,
    check_retrieval_args,
    mlp,
    segment_mean,
)
from models.spec import ModelSpec


@dataclass
class TwoTowerArgs(RetrievalArgs):
    """Arguments of the two-tower model (the shared :class:`RetrievalArgs`)."""


class TwoTowerUser(UserTower):
    """``(profile [B, P], hist [ΣLᵢ, D], lengths [B])`` → ``[B, 1, D]``."""

    def __init__(self, profile_dim: int, dim: int, hidden: list) -> None:
        super().__init__()
        self.mlp = mlp([profile_dim + dim, *hidden, dim])

    def forward(self, profile: torch.Tensor, hist: torch.Tensor,
                lengths: torch.Tensor) -> torch.Tensor:
        x = torch.cat([profile, segment_mean(hist, lengths)], dim=1)
        return self.mlp(x).unsqueeze(1)


def build_two_tower(schema: Schema, args: TwoTowerArgs, device: str = "meta") -> RetrievalModel:
    check_retrieval_args(args)
    ebc, ec, item, dim, user_features, profile = build_retrieval_tables(schema, args, device)
    tower = TwoTowerUser(profile, dim, list(args.hidden))
    model = RetrievalModel(ebc, ec, tower, item.name, item.table or item.name,
                           item.num_embeddings, user_features, args.max_len or item.max_len,
                           dense_item_features=list(args.item_dense_features))
    return place(model, device)


MODEL_SPEC = ModelSpec(
    name="two_tower",
    args_cls=TwoTowerArgs,
    build=build_two_tower,
    flavours={"default": TwoTowerArgs()},
    task="retrieval",
    description="two-tower retrieval: user tower (profile + pooled history) vs item tower, "
                "sampled softmax over cross-rank in-batch + uniform negatives with logQ",
)
