"""MIND (Li et al. 2019, "Multi-Interest Network with Dynamic Routing"): K user vectors from
dynamic (capsule) routing over the history.

User tower, per row with history embeddings ``e_1..e_L`` (most recent ``max_len``):

* behaviour-to-interest routing: ``ê_i = S e_i / ‖e_i‖`` with one shared bilinear map
  ``S [D, D]``;
  routing logits ``b [K, L]`` start from a fixed random draw (``routing_init = "random"``: a
  buffer, so that the K capsules differ although ``S`` is shared, as in the paper) or, with
  ``routing_init = "spread"``, from K history items chosen farthest-point first (the most
  recent item, then each time the item least similar to those chosen):
  ``b_ki = s · cos(ê_seed(k), ê_i)``, so the capsules start on distinct regions of the history
  rather than on random mixtures of it; for ``routing_iters`` rounds:
  ``w = softmax_k(b)``, ``z_k = Σ_i w_ki ê_i``, ``c_k = squash(z_k)``,
  ``b_ki += ⟨c_k, ê_i⟩`` (``routing_scale = 0``, the paper) or ``b_ki += s · cos(c_k, ê_i)``
  (``s = routing_scale > 0``: a soft k-means whose sharpness does not depend on the norms);
  ``squash(z) = ‖z‖² / (1 + ‖z‖²) · z / ‖z‖``; padding positions take no part;
* each capsule is concatenated with the user profile (pooled user features) and passed
  through a ReLU MLP → ``[B, K, D]``, L2-normalised.

Training: label-aware attention mixes the K interests towards the positive (``RetrievalLoss.
user_vectors``; ``β = attention_sharpness``, ``1/τ`` by default — the paper's ``pow(·, p)``
on unnormalised dots becomes a sharpness on cosines here, and large β approaches the hard
max that serving uses), and that one mix scores every candidate of the sampled softmax
(``label_attention = "positive"``, the paper; the ``paper`` flavour). With
``label_attention = "candidate"`` (the default) every
candidate attends over the interests with itself as the label (``RetrievalLoss.scores``):
its score is a smooth max over the interests, the rule serving ranks by, so the loss also
penalises an interest that scores a negative above the positive when the positive chose
another interest — the paper's mix never sees those errors, serving's max does. On the
``multi`` preset this is what makes MIND beat ``two_tower`` (docs/retrieval.md).
Serving: each of the K vectors retrieves its neighbours and a query
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
    LABEL_ATTENTION,
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
    #: s, routing agreement as ``s · cosine`` (0: the paper's raw dot product).
    routing_scale: float = 0.0
    #: initial routing logits: "random" (a fixed draw) or "spread" (farthest-point history
    #: items as seeds, see the module docstring).
    routing_init: str = "random"
    #: what the label-aware attention in training attends towards: "candidate" (every candidate
    #: scored by its own attention over the interests, a smooth max: serving's rule; MIND
    #: trails two_tower without it, docs/retrieval.md) or "positive" (the paper: the
    #: positive's mix of the interests scores every candidate; the ``paper`` flavour).
    label_attention: str = "candidate"


def squash(z: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Capsule non-linearity along the last dim: ``‖z‖² / (1 + ‖z‖²) · z / ‖z‖``."""
    n2 = (z * z).sum(-1, keepdim=True)
    return z * (n2 / (1.0 + n2) / torch.sqrt(n2 + eps))


class MINDUser(UserTower):
    """Multi-interest extractor + profile MLP (see the module docstring)."""

    def __init__(self, profile_dim: int, dim: int, hidden: list, num_interests: int,
                 routing_iters: int, max_len: int, routing_seed: int = 0,
                 routing_scale: float = 0.0, routing_init: str = "random") -> None:
        super().__init__()
        self.routing_scale = routing_scale
        self.spread = routing_init == "spread"
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
        if self.spread:
            logits = self.spread_logits(padded, mask[:, 0])
        else:
            logits = self.routing_init[:, :t].to(hist.dtype).unsqueeze(0).expand(b, k, t)
        unit = F.normalize(padded, dim=-1)
        caps = hist.new_zeros(b, k, hist.shape[1])
        for _ in range(self.routing_iters):
            w = torch.softmax(logits, dim=1) * mask
            caps = squash(torch.einsum("bkt,btd->bkd", w, padded))
            if self.routing_scale:
                agree = torch.einsum("bkd,btd->bkt", F.normalize(caps, dim=-1), unit)
                logits = logits + self.routing_scale * agree
            else:
                logits = logits + torch.einsum("bkd,btd->bkt", caps, padded)
        return caps

    def spread_logits(self, padded: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B, K, T]`` initial logits ``s · cos(ê_seed(k), ê_i)`` from farthest-point seeds
        (``padded [B, T, D]``, ``mask [B, T]``; the seeds are picked without gradient)."""
        b, t = mask.shape
        unit = F.normalize(padded, dim=-1)
        sim = unit @ unit.transpose(1, 2)  # [B, T, T]
        rows = torch.arange(b, device=padded.device)
        with torch.no_grad():
            # Rows are left-aligned, oldest first: the most recent item is the first seed.
            seed = (mask.sum(1) - 1).clamp(min=0).long()
            seeds = [seed]
            closest = sim[rows, seed]
            for _ in range(1, self.num_interests):
                # Padding positions are never chosen (and rows shorter than K repeat a seed).
                seed = (closest + (1.0 - mask) * 4.0).argmin(1)
                seeds.append(seed)
                closest = torch.maximum(closest, sim[rows, seed])
        chosen = torch.stack(seeds, 1)  # [B, K]
        init = torch.gather(sim, 1, chosen.unsqueeze(2).expand(b, self.num_interests, t))
        return init.detach() * (self.routing_scale or 1.0)

    def forward(self, profile: torch.Tensor, hist: torch.Tensor,
                lengths: torch.Tensor) -> torch.Tensor:
        caps = self.routing(hist, lengths)
        prof = profile.unsqueeze(1).expand(-1, self.num_interests, -1)
        return self.mlp(torch.cat([caps, prof], dim=2))


def build_mind(schema: Schema, args: MINDArgs, device: str = "meta") -> RetrievalModel:
    check_retrieval_args(args)
    if args.num_interests < 1 or args.routing_iters < 1:
        raise ValueError("model.args.num_interests and model.args.routing_iters must be >= 1")
    if args.routing_scale < 0:
        raise ValueError(f"model.args.routing_scale must be >= 0, got {args.routing_scale}")
    if args.routing_init not in ("random", "spread"):
        raise ValueError(f"model.args.routing_init must be 'random' or 'spread', got "
                         f"{args.routing_init!r}")
    if args.label_attention not in LABEL_ATTENTION:
        raise ValueError(f"model.args.label_attention must be one of {LABEL_ATTENTION}, got "
                         f"{args.label_attention!r}")
    ebc, ec, item, dim, user_features, profile = build_retrieval_tables(schema, args, device)
    max_len = args.max_len or item.max_len
    tower = MINDUser(profile, dim, list(args.hidden), args.num_interests, args.routing_iters,
                     max_len, args.routing_seed, args.routing_scale, args.routing_init)
    model = RetrievalModel(ebc, ec, tower, item.name, item.table or item.name,
                           item.num_embeddings, user_features, max_len,
                           dense_item_features=list(args.item_dense_features))
    return place(model, device)


MODEL_SPEC = ModelSpec(
    name="mind",
    args_cls=MINDArgs,
    build=build_mind,
    # "paper": the paper's routing (random initial logits, raw dot agreement) and label-aware
    # attention towards the positive only.
    flavours={"default": MINDArgs(), "paper": MINDArgs(label_attention="positive")},
    task="retrieval",
    description="MIND multi-interest retrieval: K user vectors by capsule routing over the "
                "history, label-aware attention in training, union of neighbours in serving",
)
