"""Shared parts of the generative (next-item) sequential recommenders: HSTU and SASRec.

A sequential model maps each user's item history to one output vector per position; position
``t`` predicts the item at ``t + 1``. Both models here share

* :class:`SequentialArgs`: the item / action features, the maximum length and the settings of
  the sampled-softmax loss (read by the ``sequential`` task kind in ``trainer/``);
* :class:`SequentialModel`: ``Batch`` → :class:`SequenceEncoding` through one
  ``EmbeddingCollection`` over the schema's sequence tables. The item table also serves the
  negatives feature (``<item_feature>_neg``, see :func:`negatives_feature`), whose ids the data
  path samples before the model runs, so negatives are looked up through the same (sharded)
  table as the history;
* :class:`SampledSoftmaxLoss` and :class:`SequentialTrain`, the loss owner that returns the
  pipeline's ``(loss, output)`` pair.

Shapes (B rows on this rank, ``ΣLᵢ`` history tokens, N negatives shared by the rank's batch):
``SequenceEncoding.user [ΣLᵢ, D]`` (L2-normalised model outputs), ``items [ΣLᵢ, D]``
(L2-normalised embeddings of the history items), ``ids [ΣLᵢ]``, ``offsets [B + 1]``,
``neg [N, D]``, ``neg_ids [N]``.

Only modules that hold a sharded module (``SequentialModel``, ``SequentialTrain``) are traced by
torchrec's pipeline; their forwards just route ``batch`` attributes, and every data-dependent
step lives in leaf modules (the encoder, the loss).
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from data.batch import Batch
from data.schema import FeatureSpec, Schema
from models.hstu.jagged import jagged_positions, next_timestamps

NEGATIVES_SUFFIX = "_neg"
QUERY_TIME_SUFFIX = "_query_ts"


def negatives_feature(item_feature: str) -> str:
    """Name of the KJT feature that carries the sampled negatives of ``item_feature``."""
    return item_feature + NEGATIVES_SUFFIX


def query_time_key(item_feature: str) -> str:
    """Key of ``Batch.timestamps`` that holds, on eval batches, each row's held-out event
    time (one value per row): the time the last position predicts at."""
    return item_feature + QUERY_TIME_SUFFIX


@dataclass
class SequentialArgs:
    """Arguments every sequential model has (data, loss and evaluation)."""

    #: the item-id sequence feature (default: the schema's first sequence feature).
    item_feature: str = ""
    #: an action-id sequence feature (e.g. ratings) aligned with the items, added to the input
    #: embedding; empty: none.
    action_feature: str = ""
    #: width D of the item (and action) table; 0: the schema's.
    embedding_dim: int = 0
    #: n, the longest history the model sees; 0: the item feature's ``max_len``.
    max_len: int = 0
    #: uniform negatives sampled per batch and rank, shared by all its positions.
    num_negatives: int = 128
    #: softmax temperature of the cosine logits.
    temperature: float = 0.05
    #: also use the batch's other target items as negatives.
    in_batch_negatives: bool = False
    #: random unseen items each held-out item is ranked against (sampled protocol).
    eval_sampled_negatives: int = 100


def check_sequential_args(args: SequentialArgs) -> None:
    """Raise ``ValueError`` naming the bad ``model.args`` key."""
    if args.num_negatives < 1:
        raise ValueError(f"model.args.num_negatives must be >= 1, got {args.num_negatives}")
    if not args.temperature > 0:
        raise ValueError(f"model.args.temperature must be > 0, got {args.temperature}")
    if args.eval_sampled_negatives < 1:
        raise ValueError("model.args.eval_sampled_negatives must be >= 1, got "
                         f"{args.eval_sampled_negatives}")
    if args.embedding_dim < 0 or args.max_len < 0:
        raise ValueError("model.args.embedding_dim and model.args.max_len must be >= 0")


def item_spec(schema: Schema, args: Any,
              missing: str = "sequential models need a sequence feature of item ids; the "
                             "schema has none (make data with `python -m data.synth seq` or "
                             "`python -m data.convert movielens --task sequential`)"
              ) -> FeatureSpec:
    """The item sequence feature named by ``args.item_feature`` (or the first sequence one);
    ``missing`` is the error when the schema has no sequence feature at all."""
    seqs = schema.sequence_features
    if not seqs:
        raise ValueError(missing)
    name = args.item_feature or seqs[0].name
    for f in seqs:
        if f.name == name:
            return f
    raise ValueError(f"model.args.item_feature {name!r} is not a sequence feature; sequence "
                     f"features: {', '.join(f.name for f in seqs)}")


class SequenceEncoding(NamedTuple):
    """What a sequential model computes for a batch (see the module docstring for shapes)."""

    user: torch.Tensor
    items: torch.Tensor
    ids: torch.Tensor
    offsets: torch.Tensor
    neg: torch.Tensor
    neg_ids: torch.Tensor

    def float(self) -> "SequenceEncoding":
        """The embeddings in fp32 (ids and offsets unchanged), after an autocast forward."""
        return self._replace(user=self.user.float(), items=self.items.float(),
                             neg=self.neg.float())


def jagged_to_padded(values: torch.Tensor, offsets: torch.Tensor, max_len: int
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[ΣLᵢ, D]`` → (``[B, max_len, D]`` zero-padded, rows left-aligned; flat index of each
    jagged token into ``B · max_len``)."""
    lengths = offsets.diff()
    b = lengths.numel()
    seq = torch.repeat_interleave(torch.arange(b, device=values.device), lengths,
                                  output_size=values.shape[0])
    pos = torch.arange(values.shape[0], device=values.device) - offsets[seq]
    flat = seq * max_len + pos
    out = values.new_zeros(b * max_len, values.shape[1])
    out = out.index_copy(0, flat, values)
    return out.view(b, max_len, values.shape[1]), flat


class SequentialEncoder(nn.Module, abc.ABC):
    """Base of the per-model encoders: embeds the history (``item·√D + position (+ action)``,
    dropout), runs :meth:`encode` over the jagged tokens, and L2-normalises outputs and item
    embeddings. Subclasses implement ``encode(x [ΣLᵢ, D], offsets [B + 1], timestamps
    [ΣLᵢ] | None) → [ΣLᵢ, D]``.

    Args:
        item_feature, action_feature: feature names (``action_feature`` may be empty).
        dim: D.
        max_len: n; histories are truncated to their ``n`` most recent items.
        dropout: input dropout.
    """

    def __init__(self, item_feature: str, action_feature: str, dim: int, max_len: int,
                 dropout: float) -> None:
        super().__init__()
        self.item_feature = item_feature
        self.neg_feature = negatives_feature(item_feature)
        self.action_feature = action_feature
        self.dim = dim
        self.max_len = max_len
        self.pos_emb = nn.Embedding(max_len, dim)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        self.input_dropout = nn.Dropout(dropout)

    @abc.abstractmethod
    def encode(self, x: torch.Tensor, offsets: torch.Tensor,
               timestamps: Optional[torch.Tensor],
               query_timestamps: Optional[torch.Tensor]) -> torch.Tensor:
        """``[ΣLᵢ, D]`` → ``[ΣLᵢ, D]``; ``query_timestamps [ΣLᵢ]``: the time each position
        predicts at (the next event's; the held-out one's for the last position on eval
        batches), or None."""

    def forward(self, embeddings: Dict[str, JaggedTensor], sequence: KeyedJaggedTensor,
                timestamps: Optional[KeyedJaggedTensor]) -> SequenceEncoding:
        items = embeddings[self.item_feature]
        emb, lengths = items.values(), items.lengths()
        ids = sequence[self.item_feature].values()
        # Under torch.export (trainer.inference) the caller has already truncated, and the
        # data-dependent test below could not be traced.
        if (not torch.compiler.is_exporting() and lengths.numel()
                and int(lengths.max()) > self.max_len):
            # Keep the most recent max_len items (the reader truncates to the schema's
            # max_len; a model configured shorter truncates again here).
            keep_len = lengths.clamp(max=self.max_len)
            ends = torch.cumsum(lengths, 0)
            new_off = F.pad(torch.cumsum(keep_len, 0), (1, 0))
            idx = (torch.repeat_interleave(ends - keep_len - new_off[:-1], keep_len)
                   + torch.arange(int(new_off[-1]), device=emb.device))
        else:
            keep_len, idx = lengths, None
        offsets = F.pad(torch.cumsum(keep_len, 0), (1, 0))
        ts = timestamps[self.item_feature].values() if timestamps is not None else None
        if idx is not None:
            emb, ids = emb[idx], ids[idx]
            ts = ts[idx] if ts is not None else None
        x = emb * math.sqrt(self.dim) + self.pos_emb(jagged_positions(offsets, emb.shape[0])[1])
        if self.action_feature:
            act = embeddings[self.action_feature].values()
            x = x + (act[idx] if idx is not None else act)
        query_ts = None
        if ts is not None:
            # Position i predicts event i + 1 and measures time gaps from its time; the last
            # position of an eval row predicts the held-out event, whose time the data path
            # keeps (the model never sees that event's item).
            query_ts = next_timestamps(ts, offsets)
            key = query_time_key(self.item_feature)
            if timestamps is not None and key in timestamps.keys():
                held = timestamps[key]
                has = (held.lengths() > 0) & (keep_len > 0)
                if torch.compiler.is_exporting() or has.any():
                    query_ts = query_ts.clone()
                    query_ts[offsets[1:][has] - 1] = held.values()[
                        torch.cumsum(held.lengths(), 0)[has] - 1]
        user = self.encode(self.input_dropout(x), offsets, ts, query_ts)
        neg = embeddings[self.neg_feature]
        return SequenceEncoding(
            user=F.normalize(user, dim=-1), items=F.normalize(emb, dim=-1), ids=ids,
            offsets=offsets, neg=F.normalize(neg.values(), dim=-1),
            neg_ids=sequence[self.neg_feature].values())


class SequentialModel(nn.Module):
    """``Batch`` → :class:`SequenceEncoding`: the sequence tables' ``EmbeddingCollection``
    (sharded by the trainer) feeding a :class:`SequentialEncoder`.

    Example::

        spec = get_model_spec("hstu")
        model = spec.build(schema, spec.make_args("default"), "cpu")
        enc = model(batch)        # batch.sequence holds the item and negatives features
        enc.user.shape            # [ΣLᵢ, D]
    """

    def __init__(self, ec: EmbeddingCollection, encoder: SequentialEncoder,
                 item_table: str, num_items: int) -> None:
        super().__init__()
        self.ec = ec
        self.encoder = encoder
        #: the table the task ranks against and samples negatives from (rows 1..num_items-1;
        #: row 0 is padding).
        self.item_table = item_table
        self.item_feature = encoder.item_feature
        self.num_items = num_items

    def forward(self, batch: Batch) -> SequenceEncoding:
        return self.encoder(self.ec(batch.sequence), batch.sequence, batch.timestamps)


def build_sequence_ec(schema: Schema, args: SequentialArgs, device: str
                      ) -> Tuple[EmbeddingCollection, FeatureSpec, int]:
    """EC over every sequence table of ``schema`` (the item table also serving the negatives
    feature); returns it, the item feature and D."""
    item = item_spec(schema, args)
    if args.action_feature:
        names = [f.name for f in schema.sequence_features]
        if args.action_feature not in names or args.action_feature == item.name:
            raise ValueError(f"model.args.action_feature {args.action_feature!r} is not another "
                             f"sequence feature; sequence features: {', '.join(names)}")
        if schema.feature(args.action_feature).max_len != item.max_len:
            raise ValueError(f"model.args.action_feature {args.action_feature!r} must have the "
                             f"item feature's max_len ({item.max_len})")
    dim = args.embedding_dim or item.embedding_dim
    if dim % 4:
        raise ValueError(f"model.args.embedding_dim: the item table width must be a multiple of "
                         f"4 (fbgemm's fused embedding kernels), got {dim}")
    tables: List[EmbeddingConfig] = []
    for t in schema.tables("sequence").values():
        feats = list(t.features)
        if t.name == item.table:
            feats.append(negatives_feature(item.name))
        tables.append(EmbeddingConfig(name=t.name, num_embeddings=t.num_embeddings,
                                      embedding_dim=dim, feature_names=feats))
    return EmbeddingCollection(tables=tables, device=torch.device(device)), item, dim


class SampledSoftmaxLoss(nn.Module):
    """Next-item sampled softmax over cosine similarities.

    Every position ``t`` of a row with a next item predicts it: the logits are
    ``⟨u_t, e_{t+1}⟩ / τ`` for the positive and ``⟨u_t, e_n⟩ / τ`` for each negative (the
    rank's sampled negatives, plus the batch's other targets when ``in_batch``), with every
    negative equal to the target id masked out (accidental hits); the loss is the mean over
    positions of ``logsumexp(all logits) − positive logit``.

    In eval mode (and always) it also returns the last position's output of every row (the
    query the held-out item is ranked with).

    ``forward(enc, targets)`` → ``(loss, (loss, query [B, D], targets, ids [ΣLᵢ],
    lengths [B], hits, positions))``: ``hits`` counts positions whose positive beat every
    negative, ``positions`` the predicted positions.
    """

    def __init__(self, temperature: float, in_batch: bool) -> None:
        super().__init__()
        self.temperature = temperature
        self.in_batch = in_batch

    def logits(self, enc: SequenceEncoding) -> Tuple[torch.Tensor, torch.Tensor]:
        """(``[P, 1 + negatives]`` logits with the positive first and accidental hits at
        −inf, ``[P]`` target ids) over the P positions that have a next item."""
        total = enc.ids.shape[0]
        idx = torch.arange(total, device=enc.ids.device)
        has_next = torch.ones(total, dtype=torch.bool, device=enc.ids.device)
        last = enc.offsets[1:] - 1
        has_next[last[enc.offsets[1:] > enc.offsets[:-1]]] = False
        src = idx[has_next]
        user, target_ids, target = enc.user[src], enc.ids[src + 1], enc.items[src + 1]
        pos = (user * target).sum(-1, keepdim=True)
        neg = user @ enc.neg.T
        neg = neg.masked_fill(enc.neg_ids.unsqueeze(0) == target_ids.unsqueeze(1), -math.inf)
        parts = [pos, neg]
        if self.in_batch:
            uniq, first = _unique_first(target_ids)
            inb = user @ target[first].T
            parts.append(inb.masked_fill(uniq.unsqueeze(0) == target_ids.unsqueeze(1),
                                         -math.inf))
        return torch.cat(parts, dim=1) / self.temperature, target_ids

    def forward(self, enc: SequenceEncoding, targets: torch.Tensor
                ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
        logits, _ = self.logits(enc)
        p = logits.shape[0]
        if p:
            loss = (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()
            hits = (logits[:, 0:1] > logits[:, 1:]).all(dim=1).sum()
        else:  # no row with two items: a zero loss that still reaches every parameter
            loss = enc.user.sum() * 0.0
            hits = torch.zeros((), dtype=torch.int64, device=logits.device)
        lengths = enc.offsets.diff()
        last = (enc.offsets[1:] - 1).clamp(min=0)
        query = enc.user[last] if enc.user.shape[0] else enc.user.new_zeros(
            lengths.numel(), enc.user.shape[1])
        query = query * (lengths > 0).unsqueeze(1).to(query.dtype)
        out = (loss.detach(), query.detach(), targets, enc.ids, lengths, hits,
               torch.tensor(p, device=logits.device))
        return loss, out


def _unique_first(ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sorted unique ids, index of one occurrence of each in ``ids``)."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    first = torch.full((uniq.numel(),), ids.numel(), dtype=torch.int64, device=ids.device)
    first = first.scatter_reduce(0, inverse, torch.arange(ids.numel(), device=ids.device),
                                 reduce="amin")
    return uniq, first

