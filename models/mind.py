"""MIND (Li et al. 2019, "Multi-Interest Network with Dynamic Routing"): K user vectors from
dynamic (capsule) routing over the history.

User tower, per row with history embeddings ``e_1..e_L`` (most recent ``max_len``):

* behaviour-to-interest routing: ``ê_i = S e_i / ‖e_i‖`` with one shared bilinear map
  ``S [D, D]``;
  routing logits ``b [K, L]`` start from a fixed random draw (a buffer, so that the K capsules
  differ although ``S`` is shared, as in the paper); for ``routing_iters`` rounds:
  ``w = softmax_k(b)``, ``z_k = Σ_i w_ki ê_i``, ``c_k = squash(z_k)``, ``b_ki += ⟨c_k, ê_i⟩``;
  ``squash(z) = ‖z‖² / (1 + ‖z‖²) · z / ‖z‖``; padding positions take no part;
* each capsule is concatenated with the user profile (pooled user features) and passed
  through a ReLU MLP → ``[B, K, D]``, L2-normalised.

Training: label-aware attention mixes the K interests towards the positive (``RetrievalLoss.
user_vectors``; ``β = attention_sharpness``, ``1/τ`` by default — the paper's ``pow(·, p)``
on unnormalised dots becomes a sharpness on cosines here, and large β approaches the hard
max that serving uses). Serving: each of the K vectors retrieves its neighbours and a query
returns the union, ranked by ``max_k ⟨u_k, ê_j⟩`` (``trainer.tasks.retrieval``).

Shapes: ``profile [B, P]``, ``hist [ΣLᵢ, D]`` → ``[B, K, D]``.

Example::

    tower = MINDUser(profile_dim=0, dim=8, hidden=[16], num_interests=3, routing_iters=3,
                     max_len=5)
    tower(torch.zeros(2, 0), torch.randn(7, 8), torch.tensor([3, 4])).shape  # [2, 3, 8]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from data.schema import Schema
from models.blocks import place
from models.retrieval import (
    RetrievalArgs,
    RetrievalModel,
    UserTower,
    build_retrieval_tables,
    check_retrieval_args,
    mlp,
)
from models.sequential import jagged_to_padded
from models.spec import ModelSpec


@dataclass
class MINDArgs(RetrievalArgs):
    """Arguments of MIND (plus the shared :class:`RetrievalArgs`)."""

    #: K, interest capsules per user.
    num_interests: int = 4
    #: dynamic-routing rounds.
    routing_iters: int = 3
    #: β of the label-aware attention over the interests (0: 1 / temperature).
    attention_sharpness: float = 0.0
    #: seed of the fixed initial routing logits.
    routing_seed: int = 0


def squash(z: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Capsule non-linearity along the last dim: ``‖z‖² / (1 + ‖z‖²) · z / ‖z‖``."""
    n2 = (z * z).sum(-1, keepdim=True)
    return z * (n2 / (1.0 + n2) / torch.sqrt(n2 + eps))


class MINDUser(UserTower):
    """Multi-interest extractor + profile MLP (see the module docstring)."""

    def __init__(self, profile_dim: int, dim: int, hidden: list, num_interests: int,
                 routing_iters: int, max_len: int, routing_seed: int = 0) -> None:
        super().__init__()
        self.num_interests = num_interests
        self.routing_iters = routing_iters
        self.bilinear = nn.Linear(dim, dim, bias=False)
        g = torch.Generator().manual_seed(routing_seed)
        self.register_buffer("routing_init", torch.randn(num_interests, max_len, generator=g))
        self.mlp = mlp([dim + profile_dim, *hidden, dim])
        #: pad histories to this width instead of the batch's longest (an exported program
        #: sets ``max_len``: a width read from the data cannot be exported); same capsules.
        self.pad_to = 0

    def routing(self, hist: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``[ΣLᵢ, D]`` jagged history → ``[B, K, D]`` interest capsules (batched)."""
        offsets = torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0))
        b, k = lengths.numel(), self.num_interests
        t = self.pad_to or (int(lengths.max()) if lengths.numel() else 0)
        if t == 0:
            return hist.new_zeros(b, k, hist.shape[1])
        # Routing sees the history's directions (the item tower's L2-normalised rows): raw rows
        # start near zero, their capsules' agreements too, and the routing would not move.
        padded, _ = jagged_to_padded(self.bilinear(F.normalize(hist, dim=-1)), offsets, t)
        mask = (torch.arange(t, device=hist.device).unsqueeze(0)
                < lengths.unsqueeze(1)).to(hist.dtype).unsqueeze(1)  # [B, 1, T]
        logits = self.routing_init[:, :t].to(hist.dtype).unsqueeze(0).expand(b, k, t)
        caps = hist.new_zeros(b, k, hist.shape[1])
        for _ in range(self.routing_iters):
            w = torch.softmax(logits, dim=1) * mask
            caps = squash(torch.einsum("bkt,btd->bkd", w, padded))
            logits = logits + torch.einsum("bkd,btd->bkt", caps, padded)
        return caps

    def forward(self, profile: torch.Tensor, hist: torch.Tensor,
                lengths: torch.Tensor) -> torch.Tensor:
        caps = self.routing(hist, lengths)
        prof = profile.unsqueeze(1).expand(-1, self.num_interests, -1)
        return self.mlp(torch.cat([caps, prof], dim=2))


def build_mind(schema: Schema, args: MINDArgs, device: str = "meta") -> RetrievalModel:
    check_retrieval_args(args)
    if args.num_interests < 1 or args.routing_iters < 1:
        raise ValueError("model.args.num_interests and model.args.routing_iters must be >= 1")
    ebc, ec, item, dim, user_features, profile = build_retrieval_tables(schema, args, device)
    max_len = args.max_len or item.max_len
    tower = MINDUser(profile, dim, list(args.hidden), args.num_interests, args.routing_iters,
                     max_len, args.routing_seed)
    model = RetrievalModel(ebc, ec, tower, item.name, item.table or item.name,
                           item.num_embeddings, user_features, max_len)
    return place(model, device)


MODEL_SPEC = ModelSpec(
    name="mind",
    args_cls=MINDArgs,
    build=build_mind,
    flavours={"default": MINDArgs()},
    task="retrieval",
    description="MIND multi-interest retrieval: K user vectors by capsule routing over the "
                "history, label-aware attention in training, union of neighbours in serving",
)
