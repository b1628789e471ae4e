"""Synthetic CTR data whose strongest signal lives in a user behaviour sequence.

``python -m data.synth ctr_seq --out DIR [--preset ci] [--seed 0] ...`` writes the same layout
as ``ctr`` (``train/``, ``eval/``, ``schema.json``, ``meta.json`` with the oracle).

Features of a row:

* dense ``d0 … d{Dd-1}``;
* sparse ``user`` (table ``user``), ``item`` (the candidate, table ``item``) and ``item_cat``
  (the candidate's category, table ``category``);
* sequences ``hist_item`` (table ``hist_item``) and ``hist_cat`` (table ``hist_cat``) of the
  user's past items and their categories, oldest first, 0..``max_len`` long (empty ones
  occur), with event times ``hist_ts`` (increasing).

The planted click model::

    logit = bias + w_user[user] + w_item[item] + dense · β
          + α · Σ_j 1[cat_j = cat(item)] · decay^(n − 1 − j)     (sequence signal)

over the history positions j = 0 … n−1 (n−1 = most recent). A model that sees only the
pooled features (user, item, item_cat, dense) cannot know how often and how recently the user
met the candidate's category, so it is capped well below the oracle; a sequence-aware model
can reach it. The history draws the candidate's category with probability ``match_prob`` at
every position (other positions: a Zipf-random item), so matches are common but carry no
label information on their own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import pyarrow as pa

from data.schema import FeatureSpec, LabelSpec, Schema
from data.convert.common import list_column
from data.synth.common import ZipfSampler, write_planted_dataset

logger = logging.getLogger(__name__)


@dataclass
class SeqCTRSynthArgs:
    """Arguments of the sequence-signal CTR generator (see the module docstring)."""

    train_rows: int = 200_000
    eval_rows: int = 50_000
    num_dense: int = 2
    num_users: int = 1000
    num_items: int = 2000
    num_categories: int = 16
    max_len: int = 20
    embedding_dim: int = 16
    #: probability that a history position has the candidate's category.
    match_prob: float = 0.15
    #: weight α of the sequence term and its per-step decay towards older positions.
    seq_scale: float = 1.5
    decay: float = 0.7
    first_order_scale: float = 0.4
    dense_scale: float = 0.3
    bias: float = -1.5
    zipf: float = 1.05
    rows_per_file: int = 100_000
    row_group_rows: int = 8192
    seed: int = 0


SEQ_PRESETS: Dict[str, Dict[str, object]] = {
    "demo": dict(train_rows=1_000_000, eval_rows=100_000, rows_per_file=500_000),
    "ci": dict(train_rows=150_000, eval_rows=30_000, num_users=500, num_items=1000,
               rows_per_file=75_000, row_group_rows=4096),
    "tiny": dict(train_rows=2048, eval_rows=512, num_users=50, num_items=100,
                 num_categories=8, max_len=8, rows_per_file=1024, row_group_rows=256),
}


def seq_ctr_schema(args: SeqCTRSynthArgs) -> Schema:
    d = args.embedding_dim
    feats = [FeatureSpec(f"d{j}", "dense") for j in range(args.num_dense)]
    feats += [
        FeatureSpec("user", "sparse", table="user", num_embeddings=args.num_users,
                    embedding_dim=d),
        FeatureSpec("item", "sparse", table="item", num_embeddings=args.num_items,
                    embedding_dim=d),
        FeatureSpec("item_cat", "sparse", table="category",
                    num_embeddings=args.num_categories, embedding_dim=d),
        FeatureSpec("hist_item", "sequence", table="hist_item", num_embeddings=args.num_items,
                    embedding_dim=d, max_len=args.max_len, timestamps="hist_ts"),
        FeatureSpec("hist_cat", "sequence", table="hist_cat",
                    num_embeddings=args.num_categories, embedding_dim=d, max_len=args.max_len),
    ]
    return Schema(features=feats, labels=[LabelSpec("label", "binary")])


@dataclass
class PlantedSeqCTR:
    args: SeqCTRSynthArgs
    users: ZipfSampler
    items: ZipfSampler
    item_cat: np.ndarray  # [num_items] category of every item
    cat_items: List[np.ndarray]  # items of each category
    w_user: np.ndarray
    w_item: np.ndarray
    beta: np.ndarray

    @classmethod
    def draw(cls, args: SeqCTRSynthArgs) -> "PlantedSeqCTR":
        rng = np.random.default_rng(args.seed)
        item_cat = rng.integers(0, args.num_categories, size=args.num_items)
        # Every category needs at least one item to draw matching history items from.
        item_cat[: args.num_categories] = np.arange(args.num_categories)
        return cls(
            args=args,
            users=ZipfSampler(args.num_users, args.zipf, rng),
            items=ZipfSampler(args.num_items, args.zipf, rng),
            item_cat=item_cat,
            cat_items=[np.flatnonzero(item_cat == c) for c in range(args.num_categories)],
            w_user=rng.normal(0.0, args.first_order_scale, size=args.num_users),
            w_item=rng.normal(0.0, args.first_order_scale, size=args.num_items),
            beta=rng.normal(0.0, args.dense_scale, size=args.num_dense),
        )

    def sample(self, rows: int, rng: np.random.Generator) -> Tuple[Dict[str, pa.Array],
                                                                   np.ndarray, np.ndarray]:
        """Arrow columns of ``rows`` rows, their planted probabilities and labels."""
        a = self.args
        dense = rng.normal(0.0, 1.0, size=(rows, a.num_dense)).astype(np.float32)
        user = self.users(rows, rng)
        item = self.items(rows, rng)
        cand_cat = self.item_cat[item]
        lengths = rng.integers(0, a.max_len + 1, size=rows)
        offsets = np.zeros(rows + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        total = int(offsets[-1])
        row_of = np.repeat(np.arange(rows), lengths)
        pos = np.arange(total) - offsets[row_of]  # 0 = oldest
        from_end = lengths[row_of] - 1 - pos  # 0 = most recent
        hist_item = self.items(total, rng)
        match = rng.random(total) < a.match_prob
        # Matching positions: a random item of the candidate's category.
        for c in np.unique(cand_cat[row_of[match]]):
            where = np.flatnonzero(match & (cand_cat[row_of] == c))
            pool = self.cat_items[c]
            hist_item[where] = pool[rng.integers(0, pool.size, size=where.size)]
        hist_cat = self.item_cat[hist_item]
        hit = (hist_cat == cand_cat[row_of]).astype(np.float64)
        seq_term = np.bincount(row_of, weights=hit * np.power(a.decay, from_end),
                               minlength=rows)
        gaps = rng.integers(60, 86_400, size=total)
        start = rng.integers(1_600_000_000, 1_700_000_000, size=rows)
        ts = start[row_of] + np.cumsum(gaps) - np.repeat(
            np.concatenate(([0], np.cumsum(gaps)))[offsets[:-1]], lengths)
        logit = (a.bias + self.w_user[user] + self.w_item[item] + dense.astype(np.float64)
                 @ self.beta + a.seq_scale * seq_term)
        probs = 1.0 / (1.0 + np.exp(-logit))
        labels = (rng.random(rows) < probs).astype(np.float32)
        one = np.arange(rows + 1, dtype=np.int64)
        cols: Dict[str, pa.Array] = {f"d{j}": pa.array(dense[:, j]) for j in range(a.num_dense)}
        cols.update(user=list_column(one, user), item=list_column(one, item),
                    item_cat=list_column(one, cand_cat), hist_item=list_column(offsets, hist_item),
                    hist_cat=list_column(offsets, hist_cat), hist_ts=list_column(offsets, ts),
                    label=pa.array(labels))
        return cols, probs, labels


def generate_ctr_seq(out: str, args: SeqCTRSynthArgs, overwrite: bool = False,
                     progress: bool = True) -> Dict[str, object]:
    """Write the dataset to ``out`` (atomically: a temp dir renamed at the end); returns meta."""
    if not 0.0 <= args.match_prob <= 1.0:
        raise ValueError(f"--match-prob {args.match_prob} must lie in [0, 1]")
    planted = PlantedSeqCTR.draw(args)

    def sample(n: int, rng: np.random.Generator) -> Tuple[pa.Table, np.ndarray, np.ndarray]:
        cols, probs, labels = planted.sample(n, rng)
        return pa.table(cols), probs, labels

    return write_planted_dataset(out, "data.synth ctr_seq", args, seq_ctr_schema(args),
                                 sample, overwrite, progress)
