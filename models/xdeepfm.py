"""xDeepFM (Lian et al. 2018, "xDeepFM: Combining Explicit and Implicit Feature Interactions
for Recommender Systems") over sharded pooled embeddings.

    logit = b + Σ_f w_f + dense·β                      linear (first order)
          + wᶜ · CIN(X⁰)                               compressed interaction network
          + MLP(flatten(X⁰))                           deep part

``X⁰ [B, m, D]`` are the m field vectors: the pooled embeddings of the sparse features and,
when there are dense features, one field projected from them (as in DeepFM, whose field and
first-order construction this model shares: the last table column is the per-id first-order
weight). The CIN builds feature maps vector-wise, field by field::

    X^k_{h,*} = Σ_{i=1}^{H_{k−1}} Σ_{j=1}^{m} W^{k,h}_{ij} (X^{k−1}_{i,*} ∘ X⁰_{j,*}) + b^{k,h}

(an outer product along the field axes, compressed by a 1×1 convolution to ``H_k`` maps
of width D), then sum-pools every map over the embedding dimension, ``p^k_h = Σ_d X^k_{h,d}``,
and concatenates ``p¹ … p^L``. With ``split_half`` (the authors' default) every layer but
the last passes half of its maps to the next layer and pools the other half.

Shapes: ``Batch.dense [B, Dd]``, ``Batch.sparse`` KJT with F keys → logits ``[B]``.

Example::

    spec = get_model_spec("xdeepfm")
    model = spec.build(schema, spec.make_args("default"), "cpu")
    logits = model(batch)      # [B]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from data.batch import Batch
from data.schema import Schema
from models.blocks import build_ebc, kept_head, place
from models.deepfm import DeepFM, DeepFMArgs, table_width
from models.spec import ModelSpec


@dataclass
class XDeepFMArgs(DeepFMArgs):
    """Arguments of :class:`XDeepFM` (DeepFM's, plus the CIN's)."""

    #: feature maps H_k of every CIN layer.
    cin_dims: List[int] = field(default_factory=lambda: [128, 128])
    #: pass half of each non-final layer's maps on and pool the other half.
    split_half: bool = True


class CIN(nn.Module):
    """Compressed Interaction Network: ``[B, m, D]`` → sum-pooled maps ``[B, out_dim]``.

    Args:
        num_fields: m.
        layer_dims: H_1 … H_L (even, except the last, when ``split_half``).
        split_half: see the module docstring.

    Example::

        CIN(5, [8, 8]).forward(torch.randn(4, 5, 16)).shape   # torch.Size([4, 12])
    """

    def __init__(self, num_fields: int, layer_dims: List[int], split_half: bool = True
                 ) -> None:
        super().__init__()
        if not layer_dims or any(h < 1 for h in layer_dims):
            raise ValueError(f"model.args.cin_dims={layer_dims} must be non-empty, sizes >= 1")
        self.split_half = split_half
        self.convs = nn.ModuleList()
        self.next_dims: List[int] = []
        prev, out = num_fields, 0
        for k, h in enumerate(layer_dims):
            last = k == len(layer_dims) - 1
            if split_half and not last and h % 2:
                raise ValueError(f"model.args.cin_dims={layer_dims}: with split_half every "
                                 f"layer but the last needs an even size")
            self.convs.append(nn.Conv1d(prev * num_fields, h, kernel_size=1))
            nxt = h // 2 if split_half and not last else h
            self.next_dims.append(nxt)
            out += h - nxt if split_half and not last else h
            prev = nxt
        self.out_dim = out

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        B, m, D = x0.shape
        xk, pooled = x0, []
        for k, conv in enumerate(self.convs):
            # z[b, i·m + j, d] = X^{k-1}_{i,d} · X^0_{j,d}
            z = (xk.unsqueeze(2) * x0.unsqueeze(1)).reshape(B, -1, D)
            # The 1×1 convolution as one matmul (conv1d's CPU kernel is ~3x slower here).
            maps = torch.matmul(conv.weight.squeeze(2), z) + conv.bias.unsqueeze(1)  # [B, H_k, D]
            nxt = self.next_dims[k]
            if self.split_half and k < len(self.convs) - 1:
                xk, direct = maps[:, :nxt], maps[:, nxt:]
            else:
                xk, direct = maps, maps
            pooled.append(direct.sum(dim=2))
        return torch.cat(pooled, dim=1)


class XDeepFM(DeepFM):
    """See the module docstring. DeepFM's fields, first order and deep part; the CIN takes
    the place of the FM.

    Args:
        ebc: unsharded EBC whose tables are ``D + 1`` wide (last column: first-order weight).
        feature_names: the pooled features, in field order.
        dense_in: number of dense features ``Dd``.
        args: :class:`XDeepFMArgs`.
        with_head: False builds a backbone for multi-task heads: no logit layers
            (``deep[1]``, ``cin_out``) and no ``bias``; only :meth:`representation` is used.
    """

    def __init__(self, ebc: EmbeddingBagCollection, feature_names: List[str], dense_in: int,
                 args: XDeepFMArgs, with_head: bool = True) -> None:
        super().__init__(ebc, feature_names, dense_in, args, with_head)
        del self.fm
        num_fields = len(self.feature_names) + (1 if dense_in else 0)
        self.cin = CIN(num_fields, list(args.cin_dims), args.split_half)
        self.cin_out = kept_head(nn.Linear(self.cin.out_dim, 1), with_head)

    @property
    def representation_dim(self) -> int:
        """Width H of :meth:`representation`: deep hidden size + CIN pooled width + 1."""
        return self.hidden_dim + self.cin.out_dim + 1

    def representation(self, batch: Batch) -> torch.Tensor:
        """``[B, H] = [h ‖ p ‖ first]`` (for multi-task heads): ``h`` the deep MLP's last
        hidden layer, ``p`` the CIN's pooled maps, ``first`` the first-order term;
        ``logit = deep[-1](h) + cin_out(p) + first + bias``."""
        vectors, first = self.fields(batch)
        return torch.cat([self.deep[0](vectors.flatten(1)), self.cin(vectors),
                          first.unsqueeze(1)], dim=1)

    def forward(self, batch: Batch) -> torch.Tensor:
        vectors, first = self.fields(batch)
        cin = self.cin_out(self.cin(vectors)).squeeze(1)
        deep = self.deep(vectors.flatten(1)).squeeze(1)
        return first + cin + deep + self.bias


def build_xdeepfm(schema: Schema, args: XDeepFMArgs, device: str = "meta",
                  with_head: bool = True) -> XDeepFM:
    names = [f for t in schema.tables("sparse").values() for f in t.features]
    ebc = build_ebc(schema, device, embedding_dim=table_width(schema, args, "xDeepFM"))
    model = XDeepFM(ebc, names, schema.dense_dim, args, with_head)
    return place(model, device)


MODEL_SPEC = ModelSpec(
    name="xdeepfm",
    args_cls=XDeepFMArgs,
    build=build_xdeepfm,
    flavours={
        "default": XDeepFMArgs(),
        "small": XDeepFMArgs(deep_dims=[64, 32], dense_dims=[32], cin_dims=[32, 32]),
        "large": XDeepFMArgs(deep_dims=[400, 400], dense_dims=[128], cin_dims=[200, 200, 200]),
    },
    task="ctr",
    description="xDeepFM: linear + compressed interaction network (CIN) + deep MLP over "
                "pooled embeddings and dense inputs",
    backbone=True,
)
