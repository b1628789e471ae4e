"""DIN (Zhou et al. 2018, "Deep Interest Network for Click-Through Rate Prediction") over a
sharded ``EmbeddingBagCollection`` (pooled features) and a sharded ``EmbeddingCollection``
(behaviour sequences), with the attention computed on the jagged histories.

Target and behaviours: k pairs (target feature, sequence feature), e.g. ``(item, hist_item)``
and ``(item_cat, hist_cat)``. The target vector ``t = [e_item ‖ e_item_cat]`` (``[B, E]``,
E = k·D) comes from the pooled lookups, the behaviour vectors ``h_i = [e_hist_item,i ‖
e_hist_cat,i]`` from the sequence lookups. The local activation unit weighs each behaviour by
its relevance to the target::

    a_i = MLP_att([h_i ‖ t ‖ h_i − t ‖ h_i ⊙ t ‖ r_i])  (PReLU hidden layers, scalar out)
    u   = Σ_i a_i h_i                                   (no softmax, as in the paper)
    logit = w · MLP([dense ‖ e_1 ‖ … ‖ e_F ‖ u]) + b

``r_i`` is a learned embedding of how many steps back event i is (``recency_dim``; 0 drops
it, giving the paper's unit, flavour ``paper``). The paper's unit is blind to order, so it
can count matching behaviours but not weigh recent ones more; on the sequence-signal
synthetic set, whose click logit decays with the steps back, that order-blind unit reached
AUC 0.698 after one epoch (oracle 0.770) where the recency embedding reached 0.730 (0.751
after two; 2 ranks, embedding lr 1.0, batch 256).

Histories stay jagged: the unit runs on the ΣLᵢ events of the batch (every event sees its
row's target through a repeat by lengths) and ``u`` is a segment sum, so the cost follows
ΣLᵢ, not B · max(Lᵢ); empty histories give ``u = 0``. The k sequences of a row must have
the same length (they describe the same events).

Shapes: ``Batch.dense [B, Dd]``, ``Batch.sparse`` KJT (F keys), ``Batch.sequence`` KJT (k keys,
jagged, ΣLᵢ values each) → logits ``[B]``.

Example::

    spec = get_model_spec("din")
    model = spec.build(schema, spec.make_args("default"), "cpu")
    logits = model(batch)      # [B]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.modules.mlp import MLP

from data.batch import Batch
from data.schema import Schema
from models.blocks import build_ebc, build_sequence_collection, kept_head, place, uniform_width
from models.spec import ModelSpec


@dataclass
class DINArgs:
    """Arguments of :class:`DIN`."""

    #: width D of every pooled and sequence table (a multiple of 4); ``None`` uses the
    #: schema's (then all tables must agree).
    embedding_dim: Optional[int] = None
    #: sequence features attended over (empty: every sequence feature of the schema).
    sequence_features: List[str] = field(default_factory=list)
    #: the pooled target feature of each sequence feature, in the same order (empty: the
    #: sequence feature's name without its ``hist_`` prefix, ``hist_item`` → ``item``, or
    #: else the one pooled feature ending in ``_`` + that, ``hist_cat`` → ``item_cat``).
    target_features: List[str] = field(default_factory=list)
    #: hidden sizes of the attention unit's MLP.
    attention_dims: List[int] = field(default_factory=lambda: [64, 32])
    #: normalise the weights with a softmax over each history (the paper does not).
    attention_softmax: bool = False
    #: width of a learned recency embedding (steps back from the newest event) appended
    #: to every event's attention input; 0 = the paper's position-blind unit.
    recency_dim: int = 8
    #: hidden sizes of the MLP over ``[dense ‖ pooled ‖ u]``.
    deep_dims: List[int] = field(default_factory=lambda: [256, 128])


def segment_ids(lengths: torch.Tensor) -> torch.Tensor:
    """``[ΣLᵢ]`` row index of every event of a jagged batch with ``lengths [B]``."""
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device),
                                   lengths)


def steps_back(lengths: torch.Tensor) -> torch.Tensor:
    """``[ΣLᵢ]`` how many events after each one its row has (0 = the newest; rows are
    oldest first)."""
    rows = segment_ids(lengths)
    ends = torch.cumsum(lengths, 0)
    return ends[rows] - 1 - torch.arange(rows.numel(), device=lengths.device)


def jagged_softmax(scores: torch.Tensor, segments: torch.Tensor, num_rows: int
                   ) -> torch.Tensor:
    """Softmax of ``scores [N]`` within each row (``segments [N]``, rows 0..num_rows−1)."""
    top = torch.full((num_rows,), float("-inf"), dtype=scores.dtype, device=scores.device)
    top = top.scatter_reduce(0, segments, scores.detach(), "amax", include_self=True)
    e = torch.exp(scores - top[segments])
    total = torch.zeros(num_rows, dtype=scores.dtype, device=scores.device).index_add(
        0, segments, e)
    return e / total[segments]


def attention_mlp(in_dim: int, hidden: List[int]) -> nn.Module:
    """Linear + PReLU hidden layers, then a linear map to one score."""
    layers: List[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(in_dim, h), nn.PReLU(h)]
        in_dim = h
    layers.append(nn.Linear(in_dim, 1))
    return nn.Sequential(*layers)


class TargetAttention(nn.Module):
    """DIN's local activation unit on jagged histories.

    Shapes: ``events [N, E]`` (N = ΣLᵢ, row-major), ``target [B, E]``, ``lengths [B]``,
    optional ``extra [N, X]`` (appended to the MLP input only, e.g. a recency embedding)
    → ``(u [B, E], weights [N])``.

    Args:
        dim: E.
        hidden: hidden sizes of the attention MLP.
        softmax: normalise the weights within each row.
        extra_dim: X.

    Example::

        att = TargetAttention(8, [16])
        u, w = att(torch.randn(5, 8), torch.randn(3, 8), torch.tensor([2, 0, 3]))
        u.shape, w.shape   # (torch.Size([3, 8]), torch.Size([5]))
    """

    def __init__(self, dim: int, hidden: List[int], softmax: bool = False,
                 extra_dim: int = 0) -> None:
        super().__init__()
        self.mlp = attention_mlp(4 * dim + extra_dim, hidden)
        self.softmax = softmax

    def forward(self, events: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor,
                extra: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        segments = segment_ids(lengths)
        t = target[segments]  # [N, E]: each event's own row's target
        parts = [events, t, events - t, events * t]
        if extra is not None:
            parts.append(extra)
        weights = self.mlp(torch.cat(parts, dim=1)).squeeze(1)
        if self.softmax:
            weights = jagged_softmax(weights, segments, target.shape[0])
        u = torch.zeros_like(target).index_add(0, segments, weights.unsqueeze(1) * events)
        return u, weights


def concat_events(values: List[torch.Tensor], lengths: List[torch.Tensor], names: List[str]
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(events [N, k·D], lengths [B])`` from k aligned jagged sequences; rows whose k
    lengths differ are an error naming the features."""
    for n, l in zip(names[1:], lengths[1:]):
        # A data-dependent check: skipped while torch.export traces the model (the inference
        # package's callers build every sequence feature from the same rows).
        if not torch.compiler.is_exporting() and not torch.equal(l, lengths[0]):
            raise ValueError(f"sequence features {names[0]!r} and {n!r} have different "
                             f"lengths in a row; the attended sequences must describe the "
                             f"same events (set model.args.sequence_features)")
    return torch.cat(values, dim=1), lengths[0].to(torch.long)


class DINArch(nn.Module):
    """Everything after the lookups (a module without embedding tables, so that the train
    pipeline's tracer treats it as a leaf and its data-dependent shapes stay out of the
    trace).

    Shapes: ``pooled [B, P]`` (dense and pooled embeddings flattened), ``target [B, E]``,
    per sequence feature ``values [N, D]`` and ``lengths [B]`` → logits ``[B]``.
    """

    def __init__(self, pooled_dim: int, event_dim: int, args: DINArgs,
                 names: List[str], max_len: int, with_head: bool = True) -> None:
        super().__init__()
        self.names = names
        self.max_len = max_len
        self.recency = nn.Embedding(max_len, args.recency_dim) if args.recency_dim else None
        self.attention = TargetAttention(event_dim, list(args.attention_dims),
                                         args.attention_softmax, args.recency_dim)
        in_dim = pooled_dim + event_dim
        self.mlp = MLP(in_dim, args.deep_dims) if args.deep_dims else nn.Identity()
        self.head_in = args.deep_dims[-1] if args.deep_dims else in_dim
        self.head = kept_head(nn.Linear(self.head_in, 1), with_head)

    def representation(self, pooled: torch.Tensor, target: torch.Tensor,
                       values: List[torch.Tensor], lengths: List[torch.Tensor]
                       ) -> torch.Tensor:
        events, lens = concat_events(values, lengths, self.names)
        extra = None
        if self.recency is not None:
            extra = self.recency(steps_back(lens).clamp(max=self.max_len - 1))
        u, _ = self.attention(events, target, lens, extra)
        return self.mlp(torch.cat([pooled, u], dim=1))

    def forward(self, pooled: torch.Tensor, target: torch.Tensor, values: List[torch.Tensor],
                lengths: List[torch.Tensor]) -> torch.Tensor:
        return self.head(self.representation(pooled, target, values, lengths)).squeeze(1)


class SequenceCTRBase(nn.Module):
    """The lookups DIN and DIEN share: pooled features, target vectors, jagged behaviours.

    Args:
        ebc: unsharded EBC over the pooled tables (width D).
        ec: unsharded EC over the sequence tables (width D).
        feature_names: pooled features, in the order they are flattened.
        sequence_names / target_names: the k (sequence, target) pairs.
        dense_in: number of dense features.
    """

    def __init__(self, ebc: EmbeddingBagCollection, ec: EmbeddingCollection,
                 feature_names: List[str], sequence_names: List[str], target_names: List[str],
                 dense_in: int) -> None:
        super().__init__()
        dims = {c.embedding_dim for c in ebc.embedding_bag_configs()}
        dims |= {c.embedding_dim for c in ec.embedding_configs()}
        if len(dims) != 1:
            raise ValueError(f"{type(self).__name__} tables must share one width, got "
                             f"{sorted(dims)}; set model.args.embedding_dim")
        self.dim = dims.pop()
        self.ebc, self.ec = ebc, ec
        self.feature_names = list(feature_names)
        self.sequence_names, self.target_names = list(sequence_names), list(target_names)
        self.dense_in = dense_in

    @property
    def pooled_dim(self) -> int:
        return self.dense_in + len(self.feature_names) * self.dim

    @property
    def event_dim(self) -> int:
        return len(self.sequence_names) * self.dim

    def lookups(self, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor],
                                             List[torch.Tensor]]:
        """``(pooled [B, P], target [B, E], values k × [N, D], lengths k × [B])``."""
        by_name = self.ebc(batch.sparse).to_dict()
        parts = [by_name[n] for n in self.feature_names]
        if self.dense_in:
            parts = [batch.dense] + parts
        target = torch.cat([by_name[n] for n in self.target_names], dim=1)
        jagged = self.ec(batch.sequence)
        values = [jagged[n].values() for n in self.sequence_names]
        lengths = [jagged[n].lengths() for n in self.sequence_names]
        return torch.cat(parts, dim=1), target, values, lengths


class DIN(SequenceCTRBase):
    """See the module docstring (arguments as :class:`SequenceCTRBase`, plus ``args``;
    ``with_head=False`` builds a backbone for multi-task heads, without ``arch.head``)."""

    def __init__(self, ebc: EmbeddingBagCollection, ec: EmbeddingCollection,
                 feature_names: List[str], sequence_names: List[str], target_names: List[str],
                 dense_in: int, max_len: int, args: DINArgs, with_head: bool = True) -> None:
        super().__init__(ebc, ec, feature_names, sequence_names, target_names, dense_in)
        self.arch = DINArch(self.pooled_dim, self.event_dim, args, self.sequence_names,
                            max_len, with_head)

    @property
    def representation_dim(self) -> int:
        """Width H of :meth:`representation` (the head's input)."""
        return self.arch.head_in

    def representation(self, batch: Batch) -> torch.Tensor:
        """``[B, H]``: the deep MLP's output (for multi-task heads)."""
        pooled, target, values, lengths = self.lookups(batch)
        return self.arch.representation(pooled, target, values, lengths)

    def forward(self, batch: Batch) -> torch.Tensor:
        pooled, target, values, lengths = self.lookups(batch)
        return self.arch(pooled, target, values, lengths)


def _default_target(sequence: str, pooled: List[str]) -> str:
    """``hist_X`` → ``X`` if that is a pooled feature, else the one pooled feature named
    ``*_X`` (``hist_cat`` → ``item_cat``); otherwise ``X`` (which the caller rejects)."""
    stem = sequence[len("hist_"):] if sequence.startswith("hist_") else sequence
    if stem in pooled:
        return stem
    suffixed = [p for p in pooled if p.endswith("_" + stem)]
    return suffixed[0] if len(suffixed) == 1 else stem


def sequence_pairs(schema: Schema, sequence_features: List[str], target_features: List[str],
                   model: str) -> Tuple[List[str], List[str]]:
    """The (sequence, target) feature pairs from the args, checked against ``schema``."""
    seq_names = [f.name for f in schema.sequence_features]
    pooled = [f.name for f in schema.sparse_features]
    if not seq_names:
        raise ValueError(f"{model} needs sequence features; the schema has none (make "
                         f"sequence data with `python -m data.synth ctr_seq`)")
    seqs = list(sequence_features) or seq_names
    bad = [s for s in seqs if s not in seq_names]
    if bad:
        raise ValueError(f"model.args.sequence_features: {bad} are not sequence features of "
                         f"the schema ({', '.join(seq_names)})")
    targets = list(target_features) or [_default_target(s, pooled) for s in seqs]
    if len(targets) != len(seqs):
        raise ValueError(f"model.args.target_features={targets} must pair one pooled feature "
                         f"with each of the sequence features {seqs}")
    bad = [t for t in targets if t not in pooled]
    if bad:
        raise ValueError(f"model.args.target_features: {bad} are not pooled (sparse) features "
                         f"of the schema ({', '.join(pooled)}); name the candidate feature of "
                         f"each of {seqs}")
    return seqs, targets


def sequence_ctr_inputs(schema: Schema, embedding_dim: Optional[int],
                        sequence_features: List[str], target_features: List[str],
                        device: str, model: str) -> Dict[str, object]:
    """The constructor arguments DIN and DIEN share, built from ``schema``."""
    seqs, targets = sequence_pairs(schema, sequence_features, target_features, model)
    width = uniform_width(schema, embedding_dim, model)
    # Every sequence table, attended or not: the batch carries every sequence key.
    ec = build_sequence_collection(schema, width, device)
    names = [f for t in schema.tables("sparse").values() for f in t.features]
    return dict(ebc=build_ebc(schema, device, embedding_dim=width), ec=ec,
                feature_names=names, sequence_names=seqs, target_names=targets,
                dense_in=schema.dense_dim,
                max_len=max(schema.feature(s).max_len for s in seqs))


def build_din(schema: Schema, args: DINArgs, device: str = "meta",
              with_head: bool = True) -> DIN:
    inputs = sequence_ctr_inputs(schema, args.embedding_dim, args.sequence_features,
                                 args.target_features, device, "DIN")
    model = DIN(**inputs, args=args, with_head=with_head)  # type: ignore[arg-type]
    return place(model, device)


MODEL_SPEC = ModelSpec(
    name="din",
    args_cls=DINArgs,
    build=build_din,
    flavours={
        "default": DINArgs(),
        "small": DINArgs(attention_dims=[32], deep_dims=[64, 32]),
        "softmax": DINArgs(attention_softmax=True),
        "paper": DINArgs(recency_dim=0),
    },
    task="ctr",
    description="DIN: target attention over jagged behaviour sequences (sharded EC) plus a "
                "deep MLP over pooled embeddings and dense inputs",
    backbone=True,
)
