"""Shared parts of the retrieval models (``two_tower``, ``mind``): data features, towers' input
tables, the sampled-softmax loss with logQ correction, and the task wrapper.

Data: a retrieval row is one user and one positive item. The item sequence feature
(``item_seq`` by default, table ``item``) holds the user's history **followed by** the
positive; the ``retrieval`` task kind's data path (``trainer.tasks.retrieval``) strips that last id
into ``Batch.labels`` and into the extra sequence feature ``<item>_pos`` (one id per row), and
adds ``num_negatives`` uniform item ids as ``<item>_neg`` (see
:func:`models.sequential.negatives_feature`). History, positives and negatives are thus looked
up through the same sharded item table, never through a copy. Pooled user features (the
schema's sparse features: user id, profile fields) go through an ``EmbeddingBagCollection``.

Towers:

* item tower (:class:`ItemTower`): ``ê_j = normalise(e_j + Σ_f mean_{c ∈ F_f(j)} t_f[c] +
  W x_j)``, the item table's row plus, per item feature ``f`` of ``args.item_features`` (e.g.
  ``category``, multi-hot ``genres``), the mean of the item's ids' rows of that feature's table
  ``t_f`` (all width ``D``: a sum, no projection, so an item without features, or a model
  without item features, is its id row), plus the linear map ``W [D, F]`` (zero at start) of
  its standardised numeric features ``x_j [F]`` (``args.item_dense_features``, e.g. a price).
  ``F_f(j)`` comes from the dataset's ``item_features.parquet`` (:mod:`data.item_features`),
  held as ``[N, G_f]`` buffers. The data path adds each looked-up
  item's feature ids (``G_f`` slots per item, 0 = empty) as the extra sequence features
  ``<role>__<f>`` of the tables ``<item table>_<f>`` (roles: the item feature, ``_pos``,
  ``_neg``), so the feature tables are EC tables sharded like the item table. The history
  rows the user towers see are the item tower's unnormalised sums ``[ΣLᵢ, D]``;
* user tower (model specific): ``[B, K, D]`` L2-normalised user vectors, ``K = 1`` for
  ``two_tower`` and ``K = num_interests`` for ``mind``.

Loss (:class:`RetrievalLoss`), for row ``i`` with user vectors ``u_i`` and positive ``p_i``:
with ``K > 1`` the label-aware attention (MIND) mixes the interests into one vector,
``v_i = normalise(Σ_k softmax_k(β ⟨u_ik, ê_{p_i}⟩) u_ik)``; ``K = 1`` gives ``v_i = u_i1``.
With ``label_attention = "candidate"`` every candidate ``j`` (the positive too) attends with
itself as the label instead: its score is ``Σ_k softmax_k(β c_ijk) c_ijk``,
``c_ijk = ⟨u_ik, ê_j⟩``, in place of ``⟨v_i, ê_j⟩`` (a smooth max over the interests: the
score serving ranks by).
Candidates are the positive, the in-batch positives of **all ranks** and the uniform negatives
of all ranks (gathered through :attr:`RetrievalLoss.gather`, which the trainer sets to a
differentiable all-gather; identity in one process). Logits ``s_ij = ⟨v_i, ê_j⟩ / τ − log Q_j``
with the logQ correction (Yi et al. 2019) ``Q_j = B_all · P(j)`` for the positive and the
in-batch columns (``P(j)`` the item's frequency as a positive, from the train split) and
``Q = U_all / (N − 1)`` for the uniform columns (``N − 1`` items, ``U_all`` drawn); every
negative column whose id equals the row's positive is masked (accidental hits). The loss is the
mean over rows of ``logsumexp_j s_ij − s_i,pos``.

Only modules that hold a sharded module (:class:`RetrievalModel`, :class:`RetrievalTrain`) are
traced by torchrec's pipeline; their forwards only route ``batch`` attributes, and every
data-dependent step lives in leaf modules (the user tower, the loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from data.batch import Batch
from data.schema import FeatureSpec, Schema
from models.blocks import build_ebc
from models.sequential import item_spec, negatives_feature

POSITIVE_SUFFIX = "_pos"
#: what MIND's label-aware attention in training is towards (see ``RetrievalLoss.scores``).
LABEL_ATTENTION = ("positive", "candidate")
ITEM_FEATURE_SEP = "__"


def positive_feature(item_feature: str) -> str:
    """Name of the KJT feature that carries each row's positive item (one id per row)."""
    return item_feature + POSITIVE_SUFFIX


def item_feature_key(role_feature: str, name: str) -> str:
    """KJT feature with the ids of item feature ``name`` of every item that ``role_feature``
    (the item feature, its ``_pos`` or ``_neg``) looks up: ``G`` slots per item."""
    return role_feature + ITEM_FEATURE_SEP + name


def item_feature_ids(lookup: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Jagged feature ids of the items ``ids`` (jagged by ``lengths``) from one feature's
    ``[num_items, G]`` lookup: ``G`` slots per item, so values ``[n·G]`` and lengths ``·G``."""
    return lookup[ids].reshape(-1), lengths * lookup.shape[1]


def _slot_mean(rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``[n, D]`` mean of ``rows [n, G, D]`` over the slots whose id (``ids [n, G]``) is > 0
    (zero where an item has none)."""
    mask = (ids > 0).to(rows.dtype).unsqueeze(2)
    return (rows * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def item_feature_table(item_table: str, name: str) -> str:
    """Embedding table of item feature ``name``."""
    return f"{item_table}_{name}"


@dataclass
class RetrievalArgs:
    """Arguments every retrieval model has (data, loss and evaluation)."""

    #: the item sequence feature: history then the positive (default: the first sequence one).
    item_feature: str = ""
    #: width D of the item table and of the user vectors; 0: the item table's.
    embedding_dim: int = 0
    #: longest history the user tower sees; 0: the item feature's ``max_len``.
    max_len: int = 0
    #: uniform negatives sampled per batch and rank (mixed negative sampling).
    num_negatives: int = 128
    #: also use every rank's in-batch positives as negatives.
    in_batch_negatives: bool = True
    #: logQ correction of every candidate's sampling probability.
    logq_correction: bool = True
    #: softmax temperature of the cosine logits.
    temperature: float = 0.05
    #: hidden widths of the user tower's MLP.
    hidden: List[int] = field(default_factory=lambda: [128])
    #: the pooled (sparse) features the user tower sees; empty: all of the schema's. A user-id
    #: embedding memorises a user's few training positives and generalises worse than cohort
    #: features plus the history (the synthetic configs leave ``user_id`` out: see
    #: docs/retrieval.md); the other tables are still looked up, their rows get no gradient.
    user_features: List[str] = field(default_factory=list)
    #: per-item features the item tower adds to the id embedding (columns of the dataset's
    #: ``item_features.parquet``, e.g. ``["category"]``; docs/retrieval.md); empty: an item
    #: is its id embedding.
    item_features: List[str] = field(default_factory=list)
    #: per-item numeric features the item tower adds through a linear map to D (float columns
    #: of ``item_features.parquet``, e.g. ``["log_popularity"]``), standardised over the items
    #: by the retrieval task kind; empty: none.
    item_dense_features: List[str] = field(default_factory=list)
    #: vocabulary size of each of ``item_features``, in order. Filled from the dataset by the
    #: retrieval task kind (and checked against it when set), so that the run's saved config
    #: rebuilds the same tables at export; leave it empty.
    item_feature_rows: List[int] = field(default_factory=list)


def check_retrieval_args(args: RetrievalArgs) -> None:
    """Raise ``ValueError`` naming the bad ``model.args`` key."""
    if args.num_negatives < 1:
        raise ValueError(f"model.args.num_negatives must be >= 1, got {args.num_negatives}")
    if not args.temperature > 0:
        raise ValueError(f"model.args.temperature must be > 0, got {args.temperature}")
    if args.embedding_dim < 0 or args.max_len < 0:
        raise ValueError("model.args.embedding_dim and model.args.max_len must be >= 0")
    if any(h < 1 for h in args.hidden):
        raise ValueError(f"model.args.hidden: widths must be >= 1, got {args.hidden}")
    for name in args.item_features:
        if not (name.isidentifier() and ITEM_FEATURE_SEP not in name):
            raise ValueError(f"model.args.item_features: {name!r} is not a plain identifier "
                             f"(letters, digits, single underscores)")
    for name in args.item_dense_features:
        if not name.isidentifier():
            raise ValueError(f"model.args.item_dense_features: {name!r} is not a plain "
                             f"identifier")
    both = set(args.item_features) & set(args.item_dense_features)
    if both or len(set(args.item_dense_features)) != len(args.item_dense_features):
        raise ValueError(f"model.args.item_dense_features lists a name twice or one of "
                         f"model.args.item_features: {args.item_dense_features}")
    if len(set(args.item_features)) != len(args.item_features):
        raise ValueError(f"model.args.item_features lists a name twice: {args.item_features}")
    if args.item_features and len(args.item_feature_rows) != len(args.item_features):
        raise ValueError(f"model.args.item_feature_rows must give one vocabulary size per "
                         f"model.args.item_features entry (the retrieval task fills it from "
                         f"the dataset's item_features.parquet), got {args.item_feature_rows}")
    if any(r < 2 for r in args.item_feature_rows):
        raise ValueError(f"model.args.item_feature_rows: sizes must be >= 2, got "
                         f"{args.item_feature_rows}")


def retrieval_item_spec(schema: Schema, args: RetrievalArgs) -> FeatureSpec:
    """The item sequence feature named by ``args.item_feature`` (or the first sequence one)."""
    return item_spec(schema, args, "retrieval models need a sequence feature of item ids "
                                   "(history then the positive); the schema has none (make data "
                                   "with `python -m data.synth retrieval` or `python -m "
                                   "data.convert movielens --task retrieval`)")


class RetrievalEncoding(NamedTuple):
    """What a retrieval model computes for a batch of B rows (N uniform negatives).

    ``user [B, K, D]`` L2-normalised user vectors; ``pos [B, D]`` / ``neg [N, D]``
    L2-normalised item-tower outputs; ``pos_ids [B]``, ``neg_ids [N]``; the history
    ``hist_ids [ΣLᵢ]`` with ``hist_lengths [B]`` (excluded from evaluation rankings)."""

    user: torch.Tensor
    pos: torch.Tensor
    pos_ids: torch.Tensor
    neg: torch.Tensor
    neg_ids: torch.Tensor
    hist_ids: torch.Tensor
    hist_lengths: torch.Tensor

    def float(self) -> "RetrievalEncoding":
        return self._replace(user=self.user.float(), pos=self.pos.float(), neg=self.neg.float())


def segment_mean(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``[ΣLᵢ, D]`` jagged → ``[B, D]`` per-row means (zeros for empty rows)."""
    b = lengths.numel()
    row = torch.repeat_interleave(torch.arange(b, device=values.device), lengths,
                                  output_size=values.shape[0])
    out = values.new_zeros(b, values.shape[1]).index_add(0, row, values)
    return out / lengths.clamp(min=1).unsqueeze(1).to(values.dtype)


def truncate_recent_jagged(values: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor,
                           max_len: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep each row's ``max_len`` most recent entries of jagged ``values``/``ids``."""
    if not lengths.numel() or int(lengths.max()) <= max_len:
        return values, ids, lengths
    keep = lengths.clamp(max=max_len)
    ends = torch.cumsum(lengths, 0)
    new_off = F.pad(torch.cumsum(keep, 0), (1, 0))
    idx = (torch.repeat_interleave(ends - keep - new_off[:-1], keep)
           + torch.arange(int(new_off[-1]), device=values.device))
    return values[idx], ids[idx], keep


class UserTower(nn.Module):
    """Base of the user towers: ``forward(profile [B, P], hist [ΣLᵢ, D], hist_lengths [B])``
    → ``[B, K, D]`` (not yet normalised). ``profile`` is the concatenated pooled user
    features and dense features (``P`` may be 0)."""

    num_interests: int = 1


class ItemTower(nn.Module):
    """Item tower: id row plus the mean of each item feature's rows (see the module docstring).

    Args:
        features: item feature names; ``tables``: their embedding tables (same order).
        num_items: rows of the item table.

    Buffers ``lookup_<f>`` (``[num_items, G_f]`` int64, 0 = empty slot) hold every item's
    feature ids; :meth:`set_lookups` fills them from the dataset and a state dict may bring
    any ``G_f`` (they resize on load). ``forward(role, embeddings, sequence)`` → ``[n, D]``
    unnormalised vectors of the ``n`` ids of KJT feature ``role``; :meth:`matrix` → the
    normalised ``[num_items, D]`` matrix of every item."""

    def __init__(self, features: List[str], tables: List[str], num_items: int,
                 dense_features: Optional[List[str]] = None, dim: int = 0) -> None:
        super().__init__()
        self.features = list(features)
        self.tables = list(tables)
        self.dense_features = list(dense_features or [])
        for name in self.features:
            self.register_buffer(f"lookup_{name}", torch.zeros(num_items, 1, dtype=torch.int64))
        #: ``[num_items, F]`` standardised numeric features (:meth:`set_dense`) and their
        #: projection to D; zero-initialised, so training starts from the id (+ categorical)
        #: tower and the projection grows only as far as the features help.
        self.register_buffer("dense_values", torch.zeros(num_items, len(self.dense_features)))
        self.dense: Optional[nn.Linear] = None
        if self.dense_features:
            if dim < 1:
                raise ValueError("ItemTower: numeric item features need the width D")
            self.dense = nn.Linear(len(self.dense_features), dim, bias=False)
            nn.init.zeros_(self.dense.weight)

    def lookup(self, name: str) -> torch.Tensor:
        return getattr(self, f"lookup_{name}")

    def set_lookups(self, lookups: Dict[str, torch.Tensor]) -> None:
        """``lookups[f]``: ``[num_items, G_f]`` ids of every item (from the dataset)."""
        for name in self.features:
            old = self.lookup(name)
            new = torch.as_tensor(lookups[name], dtype=torch.int64)
            if new.dim() != 2 or new.shape[0] != old.shape[0]:
                raise ValueError(f"item feature {name!r}: the lookup has shape "
                                 f"{tuple(new.shape)}, the item table {old.shape[0]} rows")
            setattr(self, f"lookup_{name}", new.to(old.device))

    def set_dense(self, values: torch.Tensor) -> None:
        """``values [num_items, F]``: every item's standardised numeric features, in
        ``dense_features`` order (from the dataset)."""
        old = self.dense_values
        values = torch.as_tensor(values, dtype=old.dtype)
        if values.shape != old.shape:
            raise ValueError(f"numeric item features {self.dense_features}: values of shape "
                             f"{tuple(values.shape)}, expected {tuple(old.shape)}")
        self.dense_values = values.to(old.device)

    @property
    def has_features(self) -> bool:
        """Whether an item is more than its id row (its full matrix needs :meth:`matrix`)."""
        return bool(self.features or self.dense_features)

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        # A trained model's lookups are [N, G_f]; a freshly built one holds [N, 1] stand-ins.
        for name in self.features:
            key = f"{prefix}lookup_{name}"
            if key in state_dict:
                setattr(self, f"lookup_{name}", torch.empty_like(state_dict[key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, role: str, embeddings: Dict[str, JaggedTensor],
                sequence: KeyedJaggedTensor) -> torch.Tensor:
        out = embeddings[role].values()
        n = out.shape[0]
        for name in self.features:
            key = item_feature_key(role, name)
            g = self.lookup(name).shape[1]
            rows = embeddings[key].values().reshape(n, g, out.shape[1])
            out = out + _slot_mean(rows, sequence[key].values().reshape(n, g))
        if self.dense is not None:
            out = out + self.dense(self.dense_values[sequence[role].values()].to(out.dtype))
        return out

    @torch.no_grad()
    def matrix(self, item_table: torch.Tensor, feature_tables: Dict[str, torch.Tensor]
               ) -> torch.Tensor:
        """``[N, D]`` normalised item vectors (row 0, the padding id, zero) from the full
        item table ``[N, D]`` and each feature's full table ``feature_tables[f]``."""
        out = item_table.float().clone()
        for name in self.features:
            ids = self.lookup(name).to(out.device)
            out = out + _slot_mean(feature_tables[name].float()[ids], ids)  # [N, G, D] rows
        if self.dense is not None:
            out = out + self.dense(self.dense_values.to(out.device)).float()
        out = F.normalize(out, dim=-1)
        out[0] = 0.0
        return out


class RetrievalModel(nn.Module):
    """``Batch`` → :class:`RetrievalEncoding`: pooled user features (EBC, may be absent) and
    the item table (EC, history / positives / negatives) feeding a :class:`UserTower`.

    Example::

        spec = get_model_spec("two_tower")
        model = spec.build(schema, spec.make_args("default"), "cpu")
        enc = model(batch)       # batch from the retrieval task's data path
        enc.user.shape           # [B, 1, D]
    """

    def __init__(self, ebc: Optional[EmbeddingBagCollection], ec: EmbeddingCollection,
                 tower: UserTower, item_feature: str, item_table: str, num_items: int,
                 user_features: List[str], max_len: int,
                 dense_item_features: Optional[List[str]] = None) -> None:
        super().__init__()
        self.ebc = ebc
        self.ec = ec
        # The item features are the EC tables that ``build_retrieval_tables`` gave a
        # ``<item feature>__<name>`` feature (so every builder gets the item tower unchanged).
        names, tables = [], []
        for cfg in ec.embedding_configs():
            for fname in cfg.feature_names:
                prefix = item_feature + ITEM_FEATURE_SEP
                if fname.startswith(prefix):
                    names.append(fname[len(prefix):])
                    tables.append(cfg.name)
        dim = next(c.embedding_dim for c in ec.embedding_configs() if c.name == item_table)
        self.encoder = RetrievalEncoder(tower, item_feature, user_features, max_len,
                                        ItemTower(names, tables, num_items,
                                                  dense_item_features, dim))
        self.item_feature = item_feature
        self.item_table = item_table
        self.num_items = num_items
        self.user_features = user_features

    @property
    def tower(self) -> UserTower:
        return self.encoder.tower

    @property
    def item_tower(self) -> ItemTower:
        return self.encoder.item_tower

    def forward(self, batch: Batch) -> RetrievalEncoding:
        pooled = self.ebc(batch.sparse) if self.ebc is not None else None
        return self.encoder(pooled, batch.dense, self.ec(batch.sequence), batch.sequence)


class RetrievalEncoder(nn.Module):
    """Leaf step of :class:`RetrievalModel` (data-dependent, so not traced by the pipeline):
    profile features, history truncation, the user tower, normalisation."""

    def __init__(self, tower: UserTower, item_feature: str, user_features: List[str],
                 max_len: int, item_tower: Optional[ItemTower] = None) -> None:
        super().__init__()
        self.tower = tower
        self.item_tower = item_tower or ItemTower([], [], 0)
        self.item_feature = item_feature
        self.user_features = user_features
        self.max_len = max_len
        #: keep each history's ``max_len`` most recent ids; an exported program (whose
        #: callers truncate) sets it False: the check reads the data.
        self.truncate = True

    def forward(self, pooled: Optional[object], dense: torch.Tensor,
                embeddings: Dict[str, JaggedTensor], sequence: KeyedJaggedTensor
                ) -> RetrievalEncoding:
        hist = embeddings[self.item_feature]
        hist_ids = sequence[self.item_feature].values()
        items = self.item_tower
        values, ids, lengths = items(self.item_feature, embeddings, sequence), hist_ids, \
            hist.lengths()
        if self.truncate:
            values, ids, lengths = truncate_recent_jagged(values, ids, lengths, self.max_len)
        parts = [dense] if dense.numel() else []
        if pooled is not None:
            by_name = pooled.to_dict()  # type: ignore[attr-defined]
            parts += [by_name[n] for n in self.user_features]
        b = lengths.numel()
        profile = torch.cat(parts, dim=1) if parts else values.new_zeros(b, 0)
        user = F.normalize(self.tower(profile, values, lengths), dim=-1)
        pos = items(positive_feature(self.item_feature), embeddings, sequence)
        neg = items(negatives_feature(self.item_feature), embeddings, sequence)
        return RetrievalEncoding(
            user=user, pos=F.normalize(pos, dim=-1),
            pos_ids=sequence[positive_feature(self.item_feature)].values(),
            neg=F.normalize(neg, dim=-1),
            neg_ids=sequence[negatives_feature(self.item_feature)].values(),
            hist_ids=ids, hist_lengths=lengths)


def build_retrieval_tables(schema: Schema, args: RetrievalArgs, device: str
                           ) -> Tuple[Optional[EmbeddingBagCollection], EmbeddingCollection,
                                      FeatureSpec, int, List[str], int]:
    """(EBC over the pooled user tables or None, EC over the sequence tables with the item
    table also serving the positive and negatives features, the item feature, D, the pooled
    feature names, the profile width P = dense + Σ pooled dims)."""
    item = retrieval_item_spec(schema, args)
    dim = args.embedding_dim or item.embedding_dim
    if dim % 4:
        raise ValueError(f"model.args.embedding_dim: the item table width must be a multiple of "
                         f"4 (fbgemm's fused embedding kernels), got {dim}")
    tables: List[EmbeddingConfig] = []
    for t in schema.tables("sequence").values():
        feats = list(t.features)
        if t.name == item.table:
            feats += [positive_feature(item.name), negatives_feature(item.name)]
        tables.append(EmbeddingConfig(name=t.name, num_embeddings=t.num_embeddings,
                                      embedding_dim=dim, feature_names=feats))
    roles = [item.name, positive_feature(item.name), negatives_feature(item.name)]
    taken = set(schema.tables())
    for name, rows in zip(args.item_features, args.item_feature_rows):
        table = item_feature_table(item.table or item.name, name)
        if table in taken:
            raise ValueError(f"model.args.item_features: the table of item feature {name!r}, "
                             f"{table!r}, is already a table of the schema")
        tables.append(EmbeddingConfig(name=table, num_embeddings=rows, embedding_dim=dim,
                                      feature_names=[item_feature_key(r, name)
                                                     for r in roles]))
    ec = EmbeddingCollection(tables=tables, device=torch.device(device))
    sparse = schema.sparse_features
    ebc = build_ebc(schema, device) if sparse else None
    names = [f.name for f in sparse]
    unknown = [n for n in args.user_features if n not in names]
    if unknown:
        raise ValueError(f"model.args.user_features: {unknown} are not pooled (sparse) features "
                         f"of the schema; it has {names}")
    chosen = [f for f in sparse if not args.user_features or f.name in args.user_features]
    user_features = [f.name for f in chosen]
    profile = schema.dense_dim + sum(f.embedding_dim for f in chosen)
    return ebc, ec, item, dim, user_features, profile


def mlp(sizes: List[int]) -> nn.Sequential:
    """ReLU MLP ``sizes[0] → … → sizes[-1]`` (no activation after the last layer)."""
    layers: List[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def identity_gather(x: torch.Tensor) -> torch.Tensor:
    return x


class RetrievalLoss(nn.Module):
    """Sampled softmax over all ranks' in-batch positives and uniform negatives with logQ
    correction and accidental-hit masking (see the module docstring for the formula).

    Args:
        temperature: τ.
        in_batch: use the gathered in-batch positives as negatives.
        num_items: rows of the item table (ids ``1..num_items-1``; 0 is padding).
        attention_sharpness: β of MIND's label-aware attention (0: ``1 / τ``).
        label_attention: with K > 1, what the label-aware attention is towards: "positive"
            (the paper) or "candidate" (every column its own label; :meth:`scores`).

    ``log_freq [num_items]`` (a buffer) holds ``log P(j)``; with ``logq`` the corrections
    apply. ``gather`` concatenates a tensor over ranks along dim 0 (differentiably); the
    trainer sets it, the default is the identity.

    ``forward(enc, targets)`` → ``(loss, (loss, user [B, K, D], targets, hist_ids,
    hist_lengths, hits, rows))``: ``hits`` counts rows whose positive beat every negative.
    """

    def __init__(self, temperature: float, in_batch: bool, logq: bool, num_items: int,
                 attention_sharpness: float = 0.0, label_attention: str = "positive") -> None:
        super().__init__()
        self.label_attention = label_attention  # checked with the config (models.mind)
        self.temperature = temperature
        self.in_batch = in_batch
        self.logq = logq
        self.num_items = num_items
        self.sharpness = attention_sharpness or 1.0 / temperature
        self.register_buffer("log_freq", torch.full((num_items,), -math.log(max(
            num_items - 1, 1))))
        self.gather: Callable[[torch.Tensor], torch.Tensor] = identity_gather

    def set_frequencies(self, counts: torch.Tensor) -> None:
        """``P(j) = (count_j + 1) / (Σ count + N − 1)`` over ids 1..N−1 (add-one smoothing)."""
        if counts.numel() != self.num_items:
            raise ValueError(f"item counts have {counts.numel()} entries, the item table "
                             f"{self.num_items} rows")
        c = counts.double().clone() + 1.0
        c[0] = 0.0
        self.log_freq.copy_((c / c.sum()).log().to(self.log_freq.dtype))

    def user_vectors(self, user: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``[B, D]``: the single user vector, or MIND's label-aware mix of the K interests."""
        if user.shape[1] == 1:
            return user[:, 0]
        att = torch.softmax(self.sharpness * torch.einsum("bkd,bd->bk", user, pos), dim=1)
        return F.normalize(torch.einsum("bk,bkd->bd", att, user), dim=-1)

    def scores(self, user: torch.Tensor, pos: torch.Tensor, cand: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(``[B, 1]``, ``[B, C]``) cosines of each row's user vector(s) with its positive
        ``pos [B, D]`` and with the candidates ``cand [C, D]``.

        ``K = 1``: the one vector. ``label_attention = "positive"`` (MIND's paper): the
        positive's attention mix :meth:`user_vectors` scores every column. ``"candidate"``:
        every column attends over the K interests with itself as the label,
        ``Σ_k softmax_k(β c_k) c_k`` with ``c_k = ⟨u_k, ê_j⟩`` — a smooth max over the
        interests, the score the serving rule (an item's best interest) ranks by, so an
        interest that points at negatives is penalised even where the positive chose another.
        """
        if user.shape[1] > 1 and self.label_attention == "candidate":
            sp = torch.einsum("bkd,bd->bk", user, pos)
            sc = torch.einsum("bkd,cd->bkc", user, cand)
            return ((torch.softmax(self.sharpness * sp, 1) * sp).sum(1, keepdim=True),
                    (torch.softmax(self.sharpness * sc, 1) * sc).sum(1))
        v = self.user_vectors(user, pos)
        return (v * pos).sum(-1, keepdim=True), v @ cand.T

    def logits(self, enc: RetrievalEncoding) -> torch.Tensor:
        """``[B, 1 + C]`` corrected logits, the positive first, accidental hits at −inf."""
        v = enc.user
        pos_ids = enc.pos_ids.long()
        cols, col_ids, col_logq = [], [], []
        all_pos_ids = self.gather(pos_ids)
        b_all = all_pos_ids.numel()
        if self.in_batch:
            cols.append(self.gather(enc.pos))
            col_ids.append(all_pos_ids)
            col_logq.append(self.log_freq[all_pos_ids] + math.log(b_all))
        neg_ids = self.gather(enc.neg_ids.long())
        cols.append(self.gather(enc.neg))
        col_ids.append(neg_ids)
        u_all = neg_ids.numel()
        col_logq.append(torch.full((u_all,), math.log(u_all / max(self.num_items - 1, 1)),
                                   dtype=v.dtype, device=v.device))
        cand, cand_ids = torch.cat(cols), torch.cat(col_ids)
        pos_score, cand_score = self.scores(enc.user, enc.pos, cand)
        pos_logit = pos_score / self.temperature
        neg_logit = cand_score / self.temperature
        if self.logq:
            pos_logit = pos_logit - (self.log_freq[pos_ids] + math.log(b_all)).unsqueeze(1)
            neg_logit = neg_logit - torch.cat(col_logq).to(v.dtype).unsqueeze(0)
        neg_logit = neg_logit.masked_fill(cand_ids.unsqueeze(0) == pos_ids.unsqueeze(1),
                                          -math.inf)
        return torch.cat([pos_logit, neg_logit], dim=1)

    def forward(self, enc: RetrievalEncoding, targets: torch.Tensor
                ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
        logits = self.logits(enc)
        rows = logits.shape[0]
        if rows:
            loss = (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()
            hits = (logits[:, 0:1] > logits[:, 1:]).all(dim=1).sum()
        else:  # an empty batch: a zero loss that still reaches every parameter
            loss = enc.user.sum() * 0.0
            hits = torch.zeros((), dtype=torch.int64, device=logits.device)
        out = (loss.detach(), enc.user.detach(), targets, enc.hist_ids, enc.hist_lengths, hits,
               torch.tensor(rows, device=logits.device))
        return loss, out

