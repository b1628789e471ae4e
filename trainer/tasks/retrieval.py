"""The ``retrieval`` task kind (``two_tower``, ``mind``): sampled softmax over cross-rank
negatives, exact and ANN full-corpus evaluation.

Data path (:class:`RetrievalBatches`, the reader's background thread): each row's item
sequence is its history followed by its positive. The sequential kind's transform
(:class:`trainer.tasks.sequential.SequentialBatches` with ``holdout``) moves that last id into
``labels`` and adds ``num_negatives`` uniform ids as ``<item>_neg``; this one adds the positive
again as ``<item>_pos`` (one id per row), so positives and negatives are looked up through the
sharded item table.

Training: :func:`all_gather_rows` (a differentiable, variable-size all-gather) becomes the
loss's ``gather``, so every rank's softmax sees all ranks' positives and uniform negatives
(the pool grows with the world size); the logQ term uses each item's frequency among the
train split's positives (:func:`positive_counts`, counted once at start).

Evaluation: the user vectors of every eval row (``[Q, K, D]``) are all-gathered; every rank
ranks them against **its own rows** of the item table (the sequential kind's exact merge:
the target's score summed over ranks, then counts of higher-scoring items summed over ranks,
history items and the padding row excluded), with the score of an item
``max_k ⟨u_k, ê_j⟩`` (the union of the K interests' neighbours; ``K = 1`` for two-tower). So
recall@K (= HR@K: one positive per row), NDCG@K and MRR are identical on every rank and equal
to a single process. The ANN variant assembles the whole normalised item table (an all-reduce),
builds a FAISS HNSW inner-product index on rank 0, and ranks the same queries by the union of
each interest's ``K + history`` nearest neighbours; rank 0 broadcasts its metrics, reported as
``ann_recall@K`` and ``ann_fraction@K = ann_recall@K / recall@K``.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data.batch import Batch
from data.item_features import ItemFeatures
from data.reader import ParquetReader, split_files
from data.schema import FeatureSpec, Schema
from models.blocks import autocast_dtype, autocast_forward
from models.retrieval import (
    RetrievalArgs,
    RetrievalLoss,
    RetrievalModel,
    item_feature_ids,
    item_feature_key,
    item_feature_table,
    positive_feature,
    retrieval_item_spec,
)
from models.sequential import negatives_feature
from sharding.dist import DistContext
from trainer.config import Config, ConfigError
from trainer.tasks.sequential import (
    ItemTableKind,
    RankingMetrics,
    SequentialBatches,
    _all_gather,
    _all_gather_jagged,
    _all_reduce,
    count_above,
    local_item_shards,
    table_state,
    target_scores,
)
from trainer.tasks.base import eval_batches, run_eval

logger = logging.getLogger(__name__)

RECALL_KS = (10, 50, 100, 200)
NDCG_KS = (10, 50)
ANN_KS = (10, 50, 100)

Reduce = Callable[[torch.Tensor], torch.Tensor]
Shards = Sequence[Tuple[int, torch.Tensor]]


# -- data path ------------------------------------------------------------------------------

class RetrievalBatches:
    """The reader transform (see the module docstring); timestamps are dropped (unused)."""

    def __init__(self, item_feature: str, num_items: int, num_negatives: int, seed: int,
                 split: str, item_lookups: Optional[Mapping[str, np.ndarray]] = None) -> None:
        self.item_feature = item_feature
        self.pos_feature = positive_feature(item_feature)
        #: ``[num_items, G_f]`` feature ids of every item, per item feature of the item tower.
        self.item_lookups = {k: torch.as_tensor(np.asarray(v), dtype=torch.int64)
                             for k, v in (item_lookups or {}).items()}
        # Another seed per split, so eval negatives are not the train batches' draws.
        split_seed = {"train": 0, "valid": 1, "eval": 2, "test": 2}.get(split, 3)
        self.inner = SequentialBatches(item_feature, num_items, num_negatives,
                                       seed * 4 + split_seed, holdout=True)

    def __call__(self, batch: Batch) -> Batch:
        out = self.inner(batch)
        seq = out.sequence
        assert seq is not None
        labels = out.labels.long()
        keys = seq.keys() + [self.pos_feature]
        values = [seq.values(), labels]
        lengths = [seq.lengths().int(), torch.ones(labels.numel(), dtype=torch.int32)]
        if self.item_lookups:
            # Every looked-up item's feature ids (G slots each) for the item tower.
            roles = [(self.item_feature, seq[self.item_feature]),
                     (negatives_feature(self.item_feature), seq[negatives_feature(
                         self.item_feature)])]
            role_ids = [(r, jt.values().long(), jt.lengths().int()) for r, jt in roles]
            role_ids.append((self.pos_feature, labels, lengths[1]))
            for role, ids, ln in role_ids:
                for name, table in self.item_lookups.items():
                    v, n = item_feature_ids(table, ids, ln)
                    keys.append(item_feature_key(role, name))
                    values.append(v)
                    lengths.append(n)
        sequence = KeyedJaggedTensor(keys=keys, values=torch.cat(values),
                                     lengths=torch.cat(lengths))
        return Batch(dense=out.dense, sparse=out.sparse, labels=labels, sequence=sequence,
                     timestamps=None, sample_ids=out.sample_ids)


def positive_counts(dataset_dir: str, split: str, item_feature: str, num_items: int
                    ) -> torch.Tensor:
    """``[num_items]`` int64 counts of each item as a row's positive (last id) in ``split``."""
    counts = np.zeros(num_items, dtype=np.int64)
    for path in split_files(dataset_dir, split):
        col = pq.read_table(path, columns=[item_feature]).column(item_feature).combine_chunks()
        offsets = np.asarray(col.offsets)
        values = np.asarray(col.values)
        ends = offsets[1:][offsets[1:] > offsets[:-1]] - 1
        last = values[ends]
        if last.size and (last.min() < 0 or last.max() >= num_items):
            raise ValueError(f"{path}: column {item_feature!r} holds ids outside [0, "
                             f"{num_items}) (the schema's num_embeddings)")
        counts += np.bincount(last, minlength=num_items)
    return torch.from_numpy(counts)


# -- cross-rank negatives -------------------------------------------------------------------

def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dim 0 in rank order (sizes may differ per rank).
    Differentiable for floating tensors: the backward sums each rank's gradient into the rank
    that owns the rows (``torch.distributed.nn``), so an item embedding gathered by other
    ranks gets the gradient of every rank's loss, as torchrec sums embedding gradients."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return x
    ws = dist.get_world_size()
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(ws)]
    dist.all_gather(sizes, n)
    counts = [int(s) for s in sizes]
    m = max(counts)
    pad = [0, 0] * (x.dim() - 1) + [0, m - x.shape[0]]
    padded = F.pad(x, pad) if m > x.shape[0] else x
    if x.is_floating_point():
        parts = list(dist_fn.all_gather(padded.contiguous()))
    else:
        parts = [torch.empty_like(padded) for _ in range(ws)]
        dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


# -- exact and ANN ranking ------------------------------------------------------------------

def interest_ranks(query: torch.Tensor, targets: torch.Tensor, hist_ids: torch.Tensor,
                   hist_lengths: torch.Tensor, shards: Shards, reduce: Reduce = lambda x: x,
                   chunk_rows: int = 65_536) -> Tuple[torch.Tensor, torch.Tensor]:
    """(0-based rank of each target among all items [Q], target scores [Q]), an item's score
    being ``max_k ⟨query_k, ê_j⟩``.

    Args:
        query: ``[Q, K, D]`` L2-normalised user vectors (all ranks' rows).
        targets: ``[Q]`` held-out item ids.
        hist_ids, hist_lengths: each query's history (jagged), excluded from the ranking.
        shards: this rank's ``(first row, weight [R, D])`` pieces of the item table.
        reduce: sum over ranks (identity in one process).
    """
    per_k = torch.stack([target_scores(query[:, k], targets, shards, reduce)
                         for k in range(query.shape[1])], dim=1)
    t_score = per_k.max(dim=1).values
    greater = count_above(lambda e: torch.einsum("qkd,rd->qkr", query, e).max(dim=1).values,
                          t_score, targets, hist_ids, hist_lengths, shards, query.dtype,
                          chunk_rows)
    return reduce(greater), t_score


def table_pieces(dmp: nn.Module, table: str) -> List[Tuple[int, int, torch.Tensor]]:
    """This rank's ``(first row, first column, weight)`` pieces of the sequence table
    ``table`` (any sharding type of an EC table: none of them replicates it)."""
    w = table_state(dmp, table)
    if isinstance(w, ShardedTensor):
        return [(int(s.metadata.shard_offsets[0]), int(s.metadata.shard_offsets[1]),
                 s.tensor.detach()) for s in w.local_shards()]
    return [(0, 0, w.detach())]


def full_table(shards: Sequence[Tuple[Any, ...]], rows: int, dim: int) -> torch.Tensor:
    """``[rows, D]`` table (CPU, as trained) assembled from every rank's ``(row, w)`` or
    ``(row, column, w)`` pieces."""
    full = torch.zeros(rows, dim)
    for piece in shards:
        off, col, w = piece if len(piece) == 3 else (piece[0], 0, piece[1])
        full[off:off + w.shape[0], col:col + w.shape[1]] = w.detach().float().cpu()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dev = shards[0][-1].device if shards else torch.device("cpu")
        full_dev = full.to(dev)
        dist.all_reduce(full_dev)
        full = full_dev.cpu()
    return full


def standardise_items(values: np.ndarray) -> np.ndarray:
    """``[N, F]`` numeric item features → zero mean, unit variance per column over the items
    ``1..N-1`` (row 0, the padding id, is set to 0; a constant column becomes 0), float32."""
    real = values[1:].astype(np.float64)
    mean = real.mean(0) if real.size else np.zeros(values.shape[1])
    std = real.std(0) if real.size else np.ones(values.shape[1])
    out = (values - mean) / np.where(std > 0, std, 1.0)
    out[0] = 0.0
    return out.astype(np.float32)


def _find_item_tower(module: nn.Module) -> Any:
    """The :class:`models.retrieval.ItemTower` inside a (sharded, DDP-wrapped) model."""
    from models.retrieval import ItemTower

    for m in module.modules():
        if isinstance(m, ItemTower):
            return m
    raise KeyError("the model has no item tower")


def full_item_matrix(shards: Shards, num_items: int, dim: int) -> torch.Tensor:
    """``[num_items, D]`` L2-normalised item table assembled from every rank's shards."""
    return F.normalize(full_table(shards, num_items, dim), dim=-1)


class AnnIndex:
    """A FAISS HNSW inner-product index over item rows ``1..N-1`` (row 0 is padding).

    Args:
        items: ``[N, D]`` L2-normalised item vectors (row = item id).
        m: HNSW neighbours per node; ``ef_construction`` / ``ef_search``: its beam widths.
    """

    def __init__(self, items: torch.Tensor, m: int = 32, ef_construction: int = 200,
                 ef_search: int = 256) -> None:
        import faiss  # imported here: only ANN evaluation and export need it

        self.dim = items.shape[1]
        self.index = faiss.IndexHNSWFlat(self.dim, m, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = ef_construction
        self.index.hnsw.efSearch = ef_search
        t0 = time.perf_counter()
        self.index.add(np.ascontiguousarray(items[1:].numpy(), dtype=np.float32))
        self.build_s = time.perf_counter() - t0

    def search(self, query: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """(scores, item ids) ``[Q, k]`` of the ``k`` nearest items (ids −1 where fewer)."""
        scores, idx = self.index.search(np.ascontiguousarray(query, dtype=np.float32), k)
        return scores, np.where(idx >= 0, idx + 1, -1)


def ann_ranks(index: AnnIndex, query: np.ndarray, targets: np.ndarray, hist_ids: np.ndarray,
              hist_lengths: np.ndarray, k: int) -> np.ndarray:
    """0-based rank of each target in the ANN top-``k`` (``k`` where it is not there):
    every interest retrieves ``k + |history|`` neighbours, the union is ranked by score
    (an item's best interest), history items dropped."""
    q, kk = query.shape[0], query.shape[1]
    longest = int(hist_lengths.max()) if hist_lengths.size else 0
    scores, ids = index.search(query.reshape(q * kk, -1), k + longest)
    scores = scores.reshape(q, -1)
    ids = ids.reshape(q, -1)
    offsets = np.concatenate(([0], np.cumsum(hist_lengths)))
    out = np.full(q, k, dtype=np.int64)
    for i in range(q):
        hist = set(hist_ids[offsets[i]:offsets[i + 1]].tolist())
        best: Dict[int, float] = {}
        for s, j in zip(scores[i].tolist(), ids[i].tolist()):
            if j > 0 and j not in hist and s > best.get(j, -math.inf):
                best[j] = s
        ranked = sorted(best, key=lambda j: -best[j])[:k]
        if int(targets[i]) in ranked:
            out[i] = ranked.index(int(targets[i]))
    return out


class _RetrievalRun:
    """``RunningMetrics`` of one evaluation: exact ranks (a collective) and, on rank 0, the
    ANN ranks of the same queries."""

    def __init__(self, shards: Shards, index: Optional[AnnIndex]) -> None:
        self.shards = shards
        self.index = index
        self.metrics = RankingMetrics()
        self.ann = RankingMetrics()

    def update(self, output: Tuple[Any, ...], mask: Optional[torch.Tensor] = None) -> None:
        """``mask`` (bool ``[B]``): the batch's real rows; the rows that pad the last batches
        (``remainder="pad"``) must not count."""
        _, query, targets, hist_ids, hist_lengths, _, _ = output
        if mask is None:
            mask = torch.ones(targets.shape[0], dtype=torch.bool, device=targets.device)
        query = _all_gather(query.float())
        targets = _all_gather(targets.long())
        real = _all_gather(mask.to(targets.device, torch.int64)) > 0
        hist_ids, hist_lengths = _all_gather_jagged(hist_ids.long(), hist_lengths.long())
        valid = (targets > 0) & real  # a query needs a positive; padding rows never count
        ranks, _ = interest_ranks(query, targets, hist_ids, hist_lengths, self.shards,
                                  _all_reduce)
        self.metrics.add(ranks[valid], hr_ks=RECALL_KS, ndcg_ks=NDCG_KS)
        if self.index is not None:
            v = valid.cpu().numpy()
            hl = hist_lengths.cpu().numpy()
            a = ann_ranks(self.index, query.cpu().numpy(), targets.cpu().numpy(),
                          hist_ids.cpu().numpy(), hl, max(ANN_KS))
            self.ann.add(torch.from_numpy(a[v]), prefix="ann_", hr_ks=ANN_KS, ndcg_ks=(10,))

    def compute(self) -> Dict[str, float]:
        exact = {(k.replace("hr@", "recall@")): v for k, v in self.metrics.result().items()}
        ann_keys = [f"ann_hr@{k}" for k in ANN_KS] + ["ann_ndcg@10"]
        vals = torch.zeros(len(ann_keys) + 1, dtype=torch.float64)
        if self.index is not None:
            res = self.ann.result()
            vals[:-1] = torch.tensor([res[k] for k in ann_keys], dtype=torch.float64)
            vals[-1] = 1.0
        if dist.is_initialized() and dist.get_world_size() > 1:
            dev = self.shards[0][1].device if self.shards else torch.device("cpu")
            v = vals.to(dev)
            dist.broadcast(v, src=0)
            vals = v.cpu()
        if vals[-1] > 0:
            for key, val in zip(ann_keys, vals[:-1].tolist()):
                exact[key.replace("hr@", "recall@")] = val
            for k in ANN_KS:
                e = exact[f"recall@{k}"]
                exact[f"ann_fraction@{k}"] = exact[f"ann_recall@{k}"] / e if e > 0 else math.nan
        return exact


# -- the task kind --------------------------------------------------------------------------

class RetrievalKind(ItemTableKind):
    """Retrieval: mixed-negative sampled softmax with logQ; exact + ANN full-corpus recall."""

    name = "retrieval"
    args_type = RetrievalArgs

    def __init__(self, cfg: Config, schema: Schema) -> None:
        super().__init__(cfg, schema)
        #: build a FAISS index at every evaluation (needs ``faiss-cpu``).
        self.ann = True
        #: ``[num_items, G_f]`` ids per item feature of the item tower (empty: id only).
        self.item_lookups: Dict[str, np.ndarray] = {}
        #: ``[num_items, F]`` standardised numeric item features (None: none).
        self.item_dense: Optional[np.ndarray] = None
        if self.args.item_features or self.args.item_dense_features:
            self.item_lookups, self.item_dense = self._load_item_features(cfg)

    def table_schema(self) -> Schema:
        """The dataset's schema plus one sequence feature per item feature (its table
        ``<item table>_<f>``, ``G_f`` ids per history item), as the model builds them."""
        if not self.item_lookups:
            return self.schema
        item = self.item_spec(self.schema)
        dim = self.args.embedding_dim or item.embedding_dim
        extra = [FeatureSpec(item_feature_key(item.name, name), "sequence",
                             table=item_feature_table(self.item_table, name),
                             num_embeddings=rows, embedding_dim=dim,
                             max_len=item.max_len * self.item_lookups[name].shape[1])
                 for name, rows in zip(self.args.item_features, self.args.item_feature_rows)]
        return Schema(features=list(self.schema.features) + extra,
                      labels=list(self.schema.labels))

    def _load_item_features(self, cfg: Config
                            ) -> Tuple[Dict[str, np.ndarray], Optional[np.ndarray]]:
        """The dataset's lookups of ``model.args.item_features`` and the standardised
        ``[num_items, F]`` values of ``model.args.item_dense_features`` (None without any);
        fills (or checks) ``model.args.item_feature_rows`` in the args and in ``cfg`` (whose
        saved copy rebuilds the same tables at export)."""
        names = list(self.args.item_features)
        feats = ItemFeatures.load(cfg.data.path)
        assert feats is not None
        unknown = [n for n in names if n not in feats.names]
        if unknown:
            raise ConfigError(f"model.args.item_features: {unknown} are not categorical "
                             f"features of {cfg.data.path}/item_features.parquet, which has "
                             f"{feats.names} (numeric: {feats.dense_names})")
        unknown = [n for n in self.args.item_dense_features if n not in feats.dense_names]
        if unknown:
            raise ConfigError(f"model.args.item_dense_features: {unknown} are not numeric "
                             f"features of {cfg.data.path}/item_features.parquet, which has "
                             f"{feats.dense_names} (categorical: {feats.names})")
        if feats.num_items != self.num_items:
            raise ConfigError(f"{cfg.data.path}/item_features.parquet has {feats.num_items} "
                             f"items, the item table {self.num_items} rows: regenerate it")
        rows = [feats.rows[n] for n in names]
        if self.args.item_feature_rows and list(self.args.item_feature_rows) != rows:
            raise ConfigError(f"model.args.item_feature_rows {self.args.item_feature_rows} "
                             f"disagree with the dataset's item features ({rows}); remove the "
                             f"key (the task fills it)")
        self.args.item_feature_rows = rows
        cfg.model.args = {**cfg.model.args, "item_feature_rows": rows}
        dense = None
        if self.args.item_dense_features:
            dense = standardise_items(np.stack([feats.dense[n] for n in
                                                self.args.item_dense_features], axis=1))
        return {n: feats.tables[n] for n in names}, dense

    def item_spec(self, schema: Schema) -> FeatureSpec:
        return retrieval_item_spec(schema, self.args)

    def batch_transform(self, split: str) -> Callable[[Batch], Batch]:
        return RetrievalBatches(self.item_feature, self.num_items, self.args.num_negatives,
                                self.cfg.training.seed, split, self.item_lookups)

    def wrap(self, model: nn.Module, device_type: str) -> nn.Module:
        task = RetrievalTrain(model, self.args,  # type: ignore[arg-type]
                             float(getattr(self.args, "attention_sharpness", 0.0)),
                             self.cfg.training.dense_dtype, device_type)
        if self.args.logq_correction:
            task.loss.set_frequencies(positive_counts(
                self.cfg.data.path, self.cfg.data.train_split, self.item_feature,
                self.num_items))
        task.loss.gather = all_gather_rows
        if self.item_lookups:
            model.item_tower.set_lookups(  # type: ignore[union-attr, operator]
                {k: torch.from_numpy(v) for k, v in self.item_lookups.items()})
        if self.item_dense is not None:
            model.item_tower.set_dense(  # type: ignore[union-attr, operator]
                torch.from_numpy(self.item_dense))
        return task

    def evaluate(self, pipeline: TrainPipelineSparseDist, dmp: nn.Module,
                 reader: ParquetReader, ctx: DistContext, max_batches: int) -> Dict[str, float]:
        n = eval_batches(reader, max_batches)
        shards = local_item_shards(dmp, self.item_table)
        index = None
        build_s = math.nan
        full: Optional[torch.Tensor] = None
        if _find_item_tower(dmp).has_features:
            # The item tower over every item (id row + feature rows): assembled whole on every
            # rank, each rank ranking its own slice of the rows (the exact merge is unchanged).
            full = self._item_matrix(dmp, shards, ctx)
            ws = dist.get_world_size() if dist.is_initialized() else 1
            lo, hi = ctx.rank * full.shape[0] // ws, (ctx.rank + 1) * full.shape[0] // ws
            shards = [(lo, full[lo:hi].to(ctx.device))]
        if self.ann:
            if full is None:
                dim = shards[0][1].shape[1] if shards else 0
                dims = _all_gather(torch.tensor([dim], device=ctx.device))
                full = full_item_matrix(shards, self.num_items, int(dims.max()))
            if ctx.rank == 0:
                index = AnnIndex(full)
                build_s = index.build_s
        running = _RetrievalRun(shards, index)
        run_eval(pipeline, dmp, reader, n, running)
        out = running.compute()
        if ctx.rank == 0 and index is not None:
            out["index_build_s"] = build_s
        return out

    def _item_matrix(self, dmp: nn.Module, shards: Shards, ctx: DistContext) -> torch.Tensor:
        """``[num_items, D]`` normalised item-tower outputs of every item (CPU)."""
        dim = int(_all_gather(torch.tensor([shards[0][1].shape[1] if shards else 0],
                                           device=ctx.device)).max())
        table = full_table(shards, self.num_items, dim)
        feature_tables = {}
        for name, rows in zip(self.args.item_features, self.args.item_feature_rows):
            feature_tables[name] = full_table(
                table_pieces(dmp, item_feature_table(self.item_table, name)), rows, dim)
        tower = _find_item_tower(dmp)
        return tower.matrix(table, feature_tables)

    def summary(self, metrics: Mapping[str, float]) -> str:
        if "recall@50" in metrics:
            text = (f"recall@50 {metrics['recall@50']:.4f} ndcg@10 {metrics['ndcg@10']:.4f}")
            if "ann_recall@50" in metrics:
                text += f" ann_recall@50 {metrics['ann_recall@50']:.4f}"
            return text
        return f"sampled_acc {metrics.get('sampled_acc', float('nan')):.4f}"

    def final(self, metrics: Mapping[str, float], meta: Mapping[str, Any]
              ) -> Dict[str, Optional[float]]:
        # Another kind's oracle (e.g. a next-item set's HR@10) measures another protocol.
        oracle: Mapping[str, Any] = (meta.get("oracle", {}) if meta.get("task") == "retrieval"
                                     else {})

        def known(key: str) -> Optional[float]:
            return float(oracle[key]) if key in oracle else None

        return {
            "recall@50": metrics.get("recall@50"),
            "oracle_recall@50": known("recall@50"),
            "ndcg@10": metrics.get("ndcg@10"),
            "eval_users": metrics.get("eval_users"),
            "recall@10": metrics.get("recall@10"),
            "recall@200": metrics.get("recall@200"),
            "oracle_ndcg@10": known("ndcg@10"),
            "ann_recall@50": metrics.get("ann_recall@50"),
            "ann_fraction@50": metrics.get("ann_fraction@50"),
        }


class RetrievalTrain(nn.Module):
    """Loss owner of a :class:`RetrievalModel`: ``forward(batch)`` → ``(loss, output)`` (see
    :class:`RetrievalLoss`); ``batch.labels`` holds the positive ids (int64 ``[B]``).
    ``dense_dtype`` autocasts the user tower; the loss stays fp32 (as ``CTRTrain``)."""

    def __init__(self, model: RetrievalModel, args: RetrievalArgs,
                 attention_sharpness: float = 0.0, dense_dtype: str = "fp32",
                 device_type: str = "cpu") -> None:
        super().__init__()
        self.model = model
        self.loss = RetrievalLoss(args.temperature, args.in_batch_negatives,
                                  args.logq_correction, model.num_items, attention_sharpness,
                                  str(getattr(args, "label_attention", "positive")))
        self.autocast_dtype = autocast_dtype(dense_dtype)
        self.device_type = device_type

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
        return self.loss(autocast_forward(self.model, batch, self.autocast_dtype,
                                          self.device_type), batch.labels)
