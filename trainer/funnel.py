"""The recommender funnel on a retrieval dataset: ``two_tower`` retrieves the top-k, a ranker
trained on the same data re-ranks them.

``python -m trainer.funnel ranking-data --data DS --out DS_RANK [--negatives 4]`` turns the
retrieval rows of ``DS`` into a CTR dataset for the ranker: every ``train`` (``valid``) row
gives its user features and positive item with ``label`` 1 and ``--negatives`` uniformly drawn
items with ``label`` 0, in ``train`` (``eval``); schema = the user's sparse features plus
``item_id`` (table ``item``).

``python -m trainer.funnel evaluate --data DS --retrieval RETRIEVAL_EXPORT --ranker
RANKER_EXPORT [--k 200] [--split test]`` ranks each held-out positive of ``DS/split``:

* ``recall@K``: the positive is among the retrieval export's ANN top-K (history excluded);
* ``funnel_ndcg@10``: NDCG@10 of the positive after the ranker re-orders those K;
* ``ranker_ndcg@10``: NDCG@10 when the ranker scores every item (history excluded) — what
  the funnel approximates at K / N of the cost;
* ``retrieval_ndcg@10``: NDCG@10 of the retrieval order itself.

and prints ``final recall@K=… funnel_ndcg@10=… ranker_ndcg@10=… retrieval_ndcg@10=…
users=…``. Both exports come from ``python -m trainer.export``: the retrieval model's
inference package (:mod:`trainer.package_retrieval`) and the ranker's ``--format weights``.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data.cli import ArgumentParser
from data.batch import Batch
from data.convert.common import DatasetWriter, single_id_column
from data.reader import ParquetReader, split_files
from data.schema import FeatureSpec, LabelSpec, Schema
from trainer.predict import load_exported
from trainer.tasks.retrieval import RetrievalBatches
from trainer.package_retrieval import RetrievalPackage


def make_ranking_data(data: str, out: str, negatives: int = 4, seed: int = 0,
                      overwrite: bool = False) -> Dict[str, object]:
    """Write the ranker's CTR dataset of the retrieval dataset ``data`` (module docstring)."""
    schema = Schema.load(data)
    item = schema.sequence_features[0]
    users = schema.sparse_features
    rng = np.random.default_rng(seed)
    feats = [FeatureSpec(f.name, "sparse", table=f.table, num_embeddings=f.num_embeddings,
                         embedding_dim=f.embedding_dim, pooling=f.pooling) for f in users]
    feats.append(FeatureSpec("item_id", "sparse", table="item",
                             num_embeddings=item.num_embeddings, embedding_dim=item.embedding_dim))
    out_schema = Schema(features=feats, labels=[LabelSpec("label", "binary")])
    with DatasetWriter(out, overwrite, 500_000, 4096) as writer:
        for src, dst in (("train", "train"), ("valid", "eval")):
            for path in split_files(data, src):
                t = pq.read_table(path, columns=[f.name for f in users] + [item.name])
                seq = t.column(item.name).combine_chunks()
                offsets = np.asarray(seq.offsets)
                pos = np.asarray(seq.values)[offsets[1:] - 1]
                n = pos.size
                reps = 1 + negatives
                items = np.concatenate([pos, rng.integers(1, item.num_embeddings,
                                                          size=n * negatives)])
                rows = np.concatenate([np.arange(n)] + [np.arange(n)] * negatives)
                labels = np.concatenate([np.ones(n), np.zeros(n * negatives)])
                perm = rng.permutation(n * reps)
                cols: Dict[str, pa.Array] = {f.name: t.column(f.name).take(pa.array(
                    rows[perm])) for f in users}
                cols["item_id"] = single_id_column(items[perm].astype(np.int64))
                cols["label"] = pa.array(labels[perm].astype(np.float32))
                writer.write(dst, pa.table(cols))
        return writer.finish(out_schema, {"converter": "trainer.funnel ranking-data",
                                          "source": data, "negatives": negatives, "seed": seed})


def _ndcg10(rank: np.ndarray) -> np.ndarray:
    return np.where(rank < 10, 1.0 / np.log2(rank + 2.0), 0.0)


class Funnel:
    """Retrieval export + ranker export over one retrieval dataset's user features."""

    def __init__(self, retrieval_dir: str, ranker_dir: str) -> None:
        self.server = RetrievalPackage(retrieval_dir)
        self.ranker, self.ranker_schema = load_exported(ranker_dir)
        self.features = [f.name for f in self.ranker_schema.sparse_features]

    @torch.no_grad()
    def ranker_scores(self, batch: Batch, cand: torch.Tensor) -> torch.Tensor:
        """``[B, C]`` ranker logits of each row's user with each candidate item."""
        b, c = cand.shape
        values: List[torch.Tensor] = []
        lengths: List[torch.Tensor] = []
        for name in self.features:
            if name == "item_id":
                values.append(cand.reshape(-1))
                lengths.append(torch.ones(b * c, dtype=torch.int64))
                continue
            # Each row's ids (one or several, e.g. the multi-hot segment) once per candidate.
            jt = batch.sparse[name]
            ln = jt.lengths().long()
            rep = ln.repeat_interleave(c)  # [B * C]
            starts = F.pad(torch.cumsum(ln, 0), (1, 0))[:-1].repeat_interleave(c)
            first = F.pad(torch.cumsum(rep, 0), (1, 0))[:-1]
            total = int(rep.sum())
            idx = (torch.repeat_interleave(starts - first, rep, output_size=total)
                   + torch.arange(total))
            values.append(jt.values()[idx])
            lengths.append(rep)
        kjt = KeyedJaggedTensor(keys=self.features, values=torch.cat(values),
                                lengths=torch.cat(lengths).int())
        rows = Batch(dense=torch.zeros(b * c, 0), sparse=kjt, labels=torch.zeros(b * c))
        return self.ranker.model(rows).reshape(b, c)

    def evaluate(self, data: str, split: str, k: int, batch_size: int = 128,
                 max_users: int = 0) -> Dict[str, float]:
        schema = Schema.load(data)
        info = self.server.info
        reader = ParquetReader(data, split, batch_size, prefetch=0, schema=schema,
                               shuffle=False, remainder="pad",
                               transform=RetrievalBatches(info["item_feature"],
                                                          info["num_items"], 1, 0, split))
        sums = {"recall": 0.0, "funnel": 0.0, "ranker": 0.0, "retrieval": 0.0}
        users = 0
        seen_ids = set()
        all_items = torch.arange(1, info["num_items"]).unsqueeze(0)
        for batch in reader:
            ids = batch.sample_ids.tolist() if batch.sample_ids is not None else []
            keep = np.array([i not in seen_ids for i in ids] or [True] * batch.batch_size)
            seen_ids.update(ids)
            cand, _ = self.server.search(batch, k)
            target = batch.labels.unsqueeze(1)
            at = (cand == target)
            found = at.any(1).numpy()
            retr_rank = np.where(found, at.float().argmax(1).numpy(), k)
            scores = self.ranker_scores(batch, cand)
            scores = scores.masked_fill(cand == 0, -math.inf)
            # where(), not a product: padded candidates score -inf, and -inf x 0 is nan.
            t_score = torch.where(at, scores, torch.zeros_like(scores)).sum(1, keepdim=True)
            funnel_rank = np.where(found, (scores > t_score).sum(1).numpy(), k)
            full = self.ranker_scores(batch, all_items.expand(batch.batch_size, -1))
            hist_ids, hist_lengths = self.server.history(batch)
            offsets = np.concatenate(([0], np.cumsum(hist_lengths.numpy())))
            hist = hist_ids.numpy()
            for i in range(batch.batch_size):
                full[i, hist[offsets[i]:offsets[i + 1]] - 1] = -math.inf
            tgt = full.gather(1, batch.labels.unsqueeze(1) - 1)
            full.scatter_(1, batch.labels.unsqueeze(1) - 1, -math.inf)
            ranker_rank = (full > tgt).sum(1).numpy()
            keep &= batch.labels.numpy() > 0
            sums["recall"] += float(found[keep].sum())
            sums["funnel"] += float(_ndcg10(funnel_rank)[keep].sum())
            sums["ranker"] += float(_ndcg10(ranker_rank)[keep].sum())
            sums["retrieval"] += float(_ndcg10(retr_rank)[keep].sum())
            users += int(keep.sum())
            if max_users and users >= max_users:
                break
        n = max(users, 1)
        return {f"recall@{k}": sums["recall"] / n, "funnel_ndcg@10": sums["funnel"] / n,
                "ranker_ndcg@10": sums["ranker"] / n, "retrieval_ndcg@10": sums["retrieval"] / n,
                "users": float(users)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = ArgumentParser(prog="python -m trainer.funnel", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("ranking-data", help="the ranker's CTR dataset of a retrieval dataset")
    r.add_argument("--data", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--negatives", type=int, default=4)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--overwrite", action="store_true")
    e = sub.add_parser("evaluate", help="retrieve top-k, re-rank, compare with the ranker "
                                        "over all items")
    e.add_argument("--data", required=True)
    e.add_argument("--retrieval", required=True,
                   help="retrieval package (python -m trainer.export of a two_tower or mind "
                        "checkpoint)")
    e.add_argument("--ranker", required=True, help="python -m trainer.export dir of a ranker")
    e.add_argument("--split", default="test")
    e.add_argument("--k", type=int, default=200)
    e.add_argument("--max-users", type=int, default=0, help="stop after N users (0: all)")
    ns = p.parse_args(argv)
    try:
        if ns.cmd == "ranking-data":
            if ns.negatives < 1:
                raise ValueError("--negatives must be >= 1")
            meta = make_ranking_data(ns.data, ns.out, ns.negatives, ns.seed, ns.overwrite)
            print(f"wrote {ns.out}: {meta['rows']}")
        else:
            res = Funnel(ns.retrieval, ns.ranker).evaluate(ns.data, ns.split, ns.k,
                                                           max_users=ns.max_users)
            print("final " + " ".join(f"{k}={v:.6g}" for k, v in res.items()), flush=True)
    except (FileExistsError, FileNotFoundError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
