"""The ``sequential`` task kind: next-item training and leave-one-out ranking evaluation.

Data path (``batch_transform``, run in the reader's background thread, before the model and
its sharded lookup):

* every batch gets ``num_negatives`` uniform item ids in ``[1, num_items)`` as the extra
  sequence feature ``<item>_neg`` of the item table (spread over the rows' KJT lengths; the
  loss shares them across all positions of the rank's batch), so negatives are looked up
  through the same sharded table as the history, never through a copy;
* eval batches (rows = a user's full sequence) lose their last event in every sequence
  feature and timestamps column: that item becomes ``labels`` (int64 ``[B]``), the model sees
  the history before it, and that event's time goes to ``Batch.timestamps`` as the extra key
  ``<item>_query_ts`` (one value per row): as in training, the last position measures its
  time gaps from the time of the event it predicts (HSTU's ``Δt = ts[i+1] − ts[j]``).

Evaluation (``evaluate``): the pipeline runs the eval batches in eval mode; the last
position's L2-normalised output of every row is the query. Queries, targets and histories are
all-gathered, and every rank scores all queries against **its local rows** of the item table
(its shards of the sharded table's state dict, L2-normalised): the target's score is summed
over ranks (one rank holds it), then each rank counts its items that score higher
(history items and the padding row 0 excluded, the target itself never), and the counts are
summed over ranks. That count is the target's exact 0-based rank among all items — the same
number a merge of every rank's top-k would give for ranks below k, for two ``[Q]`` reductions
instead of a ``[Q, k]`` gather — so HR@K, NDCG@K and MRR come out identical on every rank and
equal to a single process. The sampled protocol ranks the target against
``eval_sampled_negatives`` random unseen items (drawn from one generator seeded the same on
every rank). Shards must hold whole rows (table-wise or row-wise); column-wise shards are
rejected with the config key to change.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data.batch import Batch
from data.reader import ParquetReader
from data.schema import FeatureSpec, Schema
from models.blocks import autocast_dtype, autocast_forward
from models.sequential import (
    SampledSoftmaxLoss,
    SequentialArgs,
    SequentialModel,
    item_spec,
    negatives_feature,
    query_time_key,
)
from sharding.dist import DistContext
from trainer.config import Config
from trainer.tasks.base import RunningMetrics, TaskKind, eval_batches, run_eval

HR_KS = (1, 10, 50, 200)
NDCG_KS = (10, 50, 200)

Reduce = Callable[[torch.Tensor], torch.Tensor]


# -- data path ------------------------------------------------------------------------------

def _strip_last(values: torch.Tensor, lengths: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values without each row's last element, new lengths, last element per row (0 for
    empty rows))."""
    offsets = F.pad(torch.cumsum(lengths.long(), 0), (1, 0))
    keep = torch.ones(values.numel(), dtype=torch.bool)
    nonempty = lengths > 0
    last_idx = offsets[1:][nonempty] - 1
    keep[last_idx] = False
    last = torch.zeros(lengths.numel(), dtype=values.dtype)
    last[nonempty] = values[last_idx]
    return values[keep], (lengths - nonempty.to(lengths.dtype)), last


class SequentialBatches:
    """The reader transform of one split (see the module docstring).

    Args:
        item_feature: the item sequence feature; negatives go to ``<item_feature>_neg``.
        num_items: rows of the item table (ids ``1..num_items-1``; 0 is padding).
        num_negatives: negatives per batch.
        seed: with the batch's sample ids, seeds the negatives (a resumed run draws the same).
        holdout: eval split: move each row's last event into ``labels``.
    """

    def __init__(self, item_feature: str, num_items: int, num_negatives: int, seed: int,
                 holdout: bool) -> None:
        if num_items < 2:
            raise ValueError(f"item feature {item_feature!r}: the table needs at least 2 rows "
                             f"(row 0 is padding), has {num_items}")
        self.item_feature = item_feature
        self.neg_feature = negatives_feature(item_feature)
        self.num_items = num_items
        self.num_negatives = num_negatives
        self.seed = seed
        self.holdout = holdout

    def __call__(self, batch: Batch) -> Batch:
        seq = batch.sequence
        if seq is None or self.item_feature not in seq.keys():
            raise ValueError(f"batch has no sequence feature {self.item_feature!r}")
        b = batch.batch_size
        ids = batch.sample_ids
        key = [self.seed, int(self.holdout), b,
               int(ids[0]) if ids is not None and ids.numel() else 0,
               int(ids.sum()) if ids is not None else 0]
        rng = np.random.default_rng(key)
        neg = torch.from_numpy(rng.integers(1, self.num_items, size=self.num_negatives))
        neg_lengths = torch.full((b,), self.num_negatives // b, dtype=torch.int32)
        neg_lengths[: self.num_negatives % b] += 1
        labels = batch.labels
        keys, values, lengths = [], [], []
        ts_keys, ts_values, ts_lengths = [], [], []
        seq_d = seq.to_dict()
        ts_d = batch.timestamps.to_dict() if batch.timestamps is not None else {}
        for k in seq.keys():
            v, ln = seq_d[k].values(), seq_d[k].lengths()
            tv = ts_d[k].values() if k in ts_d else None
            held_ts = None
            if self.holdout:
                v, new_ln, last = _strip_last(v, ln)
                if tv is not None:
                    tv, _, held_ts = _strip_last(tv, ln)
                if k == self.item_feature:
                    labels = last.long()
                ln = new_ln
            keys.append(k)
            values.append(v)
            lengths.append(ln.int())
            if tv is not None:
                ts_keys.append(k)
                ts_values.append(tv)
                ts_lengths.append(ln.int())
                if held_ts is not None and k == self.item_feature:
                    # The held-out event's time: the time the last position predicts at.
                    ts_keys.append(query_time_key(k))
                    ts_values.append(held_ts)
                    ts_lengths.append(torch.ones(b, dtype=torch.int32))
        keys.append(self.neg_feature)
        values.append(neg)
        lengths.append(neg_lengths)
        sequence = KeyedJaggedTensor(keys=keys, values=torch.cat(values),
                                     lengths=torch.cat(lengths))
        timestamps = batch.timestamps
        if timestamps is not None:
            timestamps = KeyedJaggedTensor(keys=ts_keys, values=torch.cat(ts_values),
                                           lengths=torch.cat(ts_lengths))
        return Batch(dense=batch.dense, sparse=batch.sparse, labels=labels, sequence=sequence,
                     timestamps=timestamps, sample_ids=batch.sample_ids)


# -- ranking --------------------------------------------------------------------------------

def _no_reduce(x: torch.Tensor) -> torch.Tensor:
    return x


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x


def _history_pairs(targets: torch.Tensor, hist_ids: torch.Tensor, hist_lengths: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(query index, item id) of every history item to exclude (the target never is)."""
    row = torch.repeat_interleave(torch.arange(hist_lengths.numel(), device=hist_ids.device),
                                  hist_lengths.long(), output_size=hist_ids.numel())
    keep = hist_ids != targets[row]
    return row[keep], hist_ids[keep]


def target_scores(query: torch.Tensor, targets: torch.Tensor,
                  shards: Sequence[Tuple[int, torch.Tensor]], reduce: Reduce) -> torch.Tensor:
    """``⟨q, ê_target⟩`` per query, from whichever rank holds the target's row."""
    out = torch.zeros(targets.numel(), dtype=query.dtype, device=query.device)
    for off, w in shards:
        inside = (targets >= off) & (targets < off + w.shape[0])
        if inside.any():
            rows = F.normalize(w[targets[inside] - off].to(query.dtype), dim=-1)
            out[inside] += (query[inside] * rows).sum(-1)
    return reduce(out)


def full_ranks(query: torch.Tensor, targets: torch.Tensor, hist_ids: torch.Tensor,
               hist_lengths: torch.Tensor, shards: Sequence[Tuple[int, torch.Tensor]],
               reduce: Reduce = _no_reduce, chunk_rows: int = 65_536
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(0-based rank of each target among all items [Q], target scores [Q]).

    Args:
        query: ``[Q, D]`` L2-normalised queries (all ranks' rows).
        targets: ``[Q]`` held-out item ids.
        hist_ids, hist_lengths: each query's history (jagged), excluded from the ranking.
        shards: this rank's ``(first row, weight [R, D])`` pieces of the item table.
        reduce: sum over ranks (``dist.all_reduce``; identity in one process).
        chunk_rows: score at most this many items at once (bounds ``[Q, rows]`` memory).
    """
    t_score = target_scores(query, targets, shards, reduce)
    # [Q, D] @ [D, R]: one matmul per chunk (the brute-force references score the same way).
    greater = count_above(lambda e: query @ e.T, t_score, targets, hist_ids, hist_lengths,
                          shards, query.dtype, chunk_rows)
    return reduce(greater), t_score


def count_above(score: Callable[[torch.Tensor], torch.Tensor], t_score: torch.Tensor,
                targets: torch.Tensor, hist_ids: torch.Tensor, hist_lengths: torch.Tensor,
                shards: Sequence[Tuple[int, torch.Tensor]], dtype: torch.dtype,
                chunk_rows: int = 65_536) -> torch.Tensor:
    """``[Q]`` how many of this rank's items score above each target's ``t_score``, its own
    history, the padding row 0 and the target itself left out.

    ``score`` maps a chunk of L2-normalised item rows ``[R, D]`` to ``[Q, R]`` scores; each
    caller keeps its own arithmetic (a matmul, an einsum + max over interests) so the
    counts match its brute-force reference to the bit.
    """
    hrow, hid = _history_pairs(targets, hist_ids, hist_lengths)
    greater = torch.zeros(targets.numel(), dtype=torch.int64, device=t_score.device)
    for off, w in shards:
        for a in range(0, w.shape[0], chunk_rows):
            lo, hi = off + a, off + min(w.shape[0], a + chunk_rows)
            scores = score(F.normalize(w[a:hi - off].to(dtype), dim=-1))
            inside = (hid >= lo) & (hid < hi)
            scores[hrow[inside], hid[inside] - lo] = -math.inf
            if lo == 0:
                scores[:, 0] = -math.inf  # padding row
            # The target is compared with t_score, not with itself: its column here could
            # differ from t_score in the last bit and count it above itself.
            own = (targets >= lo) & (targets < hi)
            scores[own.nonzero().squeeze(1), targets[own] - lo] = -math.inf
            greater += (scores > t_score.unsqueeze(1)).sum(1)
    return greater


def sample_unseen(targets: torch.Tensor, hist_ids: torch.Tensor, hist_lengths: torch.Tensor,
                  num_items: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``[Q, k']`` distinct random items per query, none in its history nor its target nor 0
    (``k' = min(k, fewest unseen items)``). CPU tensors (``generator`` is a CPU generator)."""
    q = targets.numel()
    weights = torch.ones(q, num_items)
    weights[:, 0] = 0
    row = torch.repeat_interleave(torch.arange(q), hist_lengths.long(),
                                  output_size=hist_ids.numel())
    weights[row, hist_ids] = 0
    weights[torch.arange(q), targets] = 0
    k = min(k, int(weights.sum(1).min()) if q else k)
    if q == 0 or k <= 0:
        return torch.zeros(q, 0, dtype=torch.int64)
    return torch.multinomial(weights, k, replacement=False, generator=generator)


def candidate_scores(query: torch.Tensor, cand: torch.Tensor,
                     shards: Sequence[Tuple[int, torch.Tensor]], reduce: Reduce) -> torch.Tensor:
    """``⟨q, ê_c⟩`` for ``cand [Q, k]``, summed over the ranks that hold the rows."""
    out = torch.zeros(cand.shape, dtype=query.dtype, device=query.device)
    rows = torch.arange(cand.shape[0], device=cand.device).unsqueeze(1).expand_as(cand)
    for off, w in shards:
        inside = (cand >= off) & (cand < off + w.shape[0])
        if inside.any():
            e = F.normalize(w[cand[inside] - off].to(query.dtype), dim=-1)
            out[inside] = (query[rows[inside]] * e).sum(-1)
    return reduce(out)


class RankingMetrics:
    """Sums of HR@K, NDCG@K and reciprocal ranks over queries; ``result()`` = means."""

    def __init__(self) -> None:
        self.sums: Dict[str, float] = {}
        self.count = 0

    def add(self, ranks: torch.Tensor, prefix: str = "", hr_ks: Sequence[int] = HR_KS,
            ndcg_ks: Sequence[int] = NDCG_KS, count: bool = True) -> None:
        r = ranks.double()
        for k in hr_ks:
            self._add(f"{prefix}hr@{k}", float((r < k).sum()))
        gain = 1.0 / torch.log2(r + 2.0)
        for k in ndcg_ks:
            self._add(f"{prefix}ndcg@{k}", float(torch.where(r < k, gain, 0.0).sum()))
        self._add(f"{prefix}mrr", float((1.0 / (r + 1.0)).sum()))
        if count:
            self.count += int(ranks.numel())

    def _add(self, key: str, value: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value

    def result(self) -> Dict[str, float]:
        n = max(self.count, 1)
        return {**{k: v / n for k, v in self.sums.items()}, "eval_users": float(self.count)}


def table_state(dmp: nn.Module, table: str) -> Any:
    """The model's state-dict entry of EC table ``table`` (a ``ShardedTensor`` when sharded,
    else the tensor), found by its ``embeddings.<table>.weight`` suffix."""
    suffix = f"embeddings.{table}.weight"
    state = dmp.state_dict()
    keys = [k for k in state if k.endswith(suffix)]
    if len(keys) != 1:
        raise KeyError(f"table {table!r}: expected one state-dict entry ending with "
                       f"{suffix!r}, found {keys}")
    return state[keys[0]]


def local_item_shards(dmp: nn.Module, table: str) -> List[Tuple[int, torch.Tensor]]:
    """This rank's ``(first row, weight [R, D])`` pieces of the sharded table ``table``,
    read from the model's state dict (views of the live weights)."""
    w = table_state(dmp, table)
    if isinstance(w, ShardedTensor):
        full_dim = w.size(1)
        out = []
        for shard in w.local_shards():
            off, size = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            if off[1] != 0 or size[1] != full_dim:
                raise ValueError(
                    f"sequential evaluation ranks every item on the rank holding its row, but "
                    f"table {table!r} was sharded column-wise; set [sharding.tables.{table}] "
                    f"sharding_types = [\"table_wise\", \"row_wise\"]")
            out.append((int(off[0]), shard.tensor.detach()))
        return out
    if hasattr(w, "to_local"):  # DTensor
        raise ValueError(f"table {table!r}: DTensor state dicts are not supported by the "
                         f"sequential evaluation; use a ShardedTensor-based sharding")
    return [(0, w.detach())]


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` of every rank along dim 0 (same shape on every rank)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _all_gather_jagged(values: torch.Tensor, lengths: torch.Tensor
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """All ranks' jagged rows concatenated in rank order."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return values, lengths
    all_lengths = _all_gather(lengths)
    sizes = _all_gather(torch.tensor([values.numel()], device=values.device))
    padded = torch.zeros(int(sizes.max()), dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    gathered = _all_gather(padded).view(sizes.numel(), -1)
    return torch.cat([gathered[r, : int(sizes[r])] for r in range(sizes.numel())]), all_lengths


class _RankingRun:
    """``RunningMetrics`` of one evaluation: ranks each eval batch's queries (a collective)."""

    def __init__(self, shards: List[Tuple[int, torch.Tensor]], num_items: int,
                 sampled: int, seed: int) -> None:
        self.shards = shards
        self.num_items = num_items
        self.sampled = sampled
        self.generator = torch.Generator().manual_seed(seed)
        self.metrics = RankingMetrics()

    def update(self, output: Tuple[Any, ...], mask: Optional[torch.Tensor] = None) -> None:
        _, query, targets, hist_ids, hist_lengths, _, _ = output
        if mask is None:
            mask = torch.ones(targets.shape[0], dtype=torch.bool, device=targets.device)
        # Collectives run on the batch's device (gloo on CPU, nccl on CUDA).
        query = _all_gather(query.float())
        targets = _all_gather(targets.long())
        real = _all_gather(mask.to(targets.device, torch.int64)) > 0  # padding rows: False
        hist_ids, hist_lengths = _all_gather_jagged(hist_ids.long(), hist_lengths.long())
        valid = (hist_lengths > 0) & real  # a query needs a history
        ranks, t_score = full_ranks(query, targets, hist_ids, hist_lengths, self.shards,
                                    _all_reduce)
        self.metrics.add(ranks[valid])
        cand = sample_unseen(targets.cpu(), hist_ids.cpu(), hist_lengths.cpu(), self.num_items,
                             self.sampled, self.generator).to(query.device)
        c_score = candidate_scores(query, cand, self.shards, _all_reduce)
        sampled_ranks = (c_score > t_score.unsqueeze(1)).sum(1)
        self.metrics.add(sampled_ranks[valid], prefix="sampled_", hr_ks=(1, 10),
                         ndcg_ks=(10,), count=False)

    def compute(self) -> Dict[str, float]:
        return self.metrics.result()


class _TrainRunning:
    """Window means of the loss and of the sampled accuracy (positive above every negative)."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)  # hits, positions

    def update(self, output: Tuple[Any, ...]) -> None:
        self.sums[0] += output[5].double()
        self.sums[1] += output[6].double()

    def compute(self) -> Dict[str, float]:
        s = _all_reduce(self.sums.clone())
        self.sums.zero_()
        return {"sampled_acc": float(s[0] / s[1].clamp(min=1)), "positions": float(s[1])}


class ItemTableKind(TaskKind):
    """A task kind over one item table (sequential, retrieval): checks the model's argument
    type and finds the item feature, its table and the item count."""

    args_type: type = SequentialArgs

    def __init__(self, cfg: Config, schema: Schema) -> None:
        super().__init__(cfg, schema)
        if not isinstance(self.args, self.args_type):
            raise ValueError(f"model {self.spec.name!r} has task {self.name!r} but its args are "
                             f"not {self.args_type.__name__}")
        item = self.item_spec(schema)
        self.item_feature = item.name
        self.item_table = item.table or item.name
        self.num_items = item.num_embeddings

    def item_spec(self, schema: Schema) -> FeatureSpec:
        """The sequence feature of item ids."""
        return item_spec(schema, self.args)

    def examples(self, output: Tuple[Any, ...]) -> int:
        # Both kinds' outputs carry the batch's target ids at index 4 (one per example).
        return int(output[4].numel())

    def train_metrics(self, ctx: DistContext, window_examples: int) -> RunningMetrics:
        return _TrainRunning(ctx.device)


class SequentialKind(ItemTableKind):
    """Next-item prediction with sampled softmax; full-ranking leave-one-out evaluation."""

    name = "sequential"

    def batch_transform(self, split: str) -> Callable[[Batch], Batch]:
        """The reader transform of ``split`` (``train`` or ``eval``)."""
        return SequentialBatches(self.item_feature, self.num_items, self.args.num_negatives,
                                 self.cfg.training.seed, holdout=split == "eval")

    def wrap(self, model: nn.Module, device_type: str) -> nn.Module:
        return SequentialTrain(model, self.args.temperature,  # type: ignore[arg-type]
                              self.args.in_batch_negatives, self.cfg.training.dense_dtype,
                              device_type)

    def evaluate(self, pipeline: TrainPipelineSparseDist, dmp: nn.Module,
                 reader: ParquetReader, ctx: DistContext, max_batches: int) -> Dict[str, float]:
        n = eval_batches(reader, max_batches)
        shards = local_item_shards(dmp, self.item_table)
        running = _RankingRun(shards, self.num_items, self.args.eval_sampled_negatives,
                              self.cfg.training.seed)
        rows = run_eval(pipeline, dmp, reader, n, running)
        return {**running.compute(), "eval_rows": float(rows)}

    def summary(self, metrics: Mapping[str, float]) -> str:
        if "hr@10" in metrics:
            return (f"hr@10 {metrics['hr@10']:.4f} ndcg@10 {metrics['ndcg@10']:.4f} "
                    f"mrr {metrics['mrr']:.4f}")
        return f"sampled_acc {metrics.get('sampled_acc', float('nan')):.4f}"

    def final(self, metrics: Mapping[str, float], meta: Mapping[str, Any]
              ) -> Dict[str, Optional[float]]:
        oracle: Mapping[str, Any] = meta.get("oracle", {})

        def known(key: str) -> Optional[float]:
            return float(oracle[key]) if key in oracle else None

        return {
            "hr@10": metrics.get("hr@10"),
            "ndcg@10": metrics.get("ndcg@10"),
            "mrr": metrics.get("mrr"),
            "oracle_hr@10": known("hr@10"),
            "oracle_ndcg@10": known("ndcg@10"),
            "time_blind_oracle_hr@10": known("time_blind_hr@10"),
            "hr@50": metrics.get("hr@50"),
            "hr@200": metrics.get("hr@200"),
            "sampled_hr@10": metrics.get("sampled_hr@10"),
            "sampled_ndcg@10": metrics.get("sampled_ndcg@10"),
            "eval_users": metrics.get("eval_users"),
        }


class SequentialTrain(nn.Module):
    """Loss owner of a :class:`SequentialModel`: ``forward(batch)`` → ``(loss, output)`` (see
    :class:`SampledSoftmaxLoss`); ``batch.labels`` holds the held-out target ids on eval
    batches (empty on train batches).

    ``dense_dtype`` (``fp32`` | ``bf16`` | ``fp16``) autocasts the encoder's dense compute
    (projections, attention, feed-forward); the item-table lookups stay fp32 (fbgemm ops are
    outside autocast's op list), and the encoding is cast back to fp32 before the sampled
    softmax so the loss, its logsumexp over the negatives and the ranking stay full
    precision, as in ``CTRTrain``.
    """

    def __init__(self, model: SequentialModel, temperature: float,
                 in_batch_negatives: bool, dense_dtype: str = "fp32",
                 device_type: str = "cpu") -> None:
        super().__init__()
        self.model = model
        self.loss = SampledSoftmaxLoss(temperature, in_batch_negatives)
        self.autocast_dtype = autocast_dtype(dense_dtype)
        self.device_type = device_type

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
        return self.loss(autocast_forward(self.model, batch, self.autocast_dtype,
                                          self.device_type), batch.labels)
