"""Synthetic datasets with a planted model and a known oracle.

``python -m data.synth ctr --out DIR [--preset demo] [--seed 0] ...`` writes a CTR dataset:
``DIR/train/part-*.parquet``, ``DIR/eval/part-*.parquet``, ``schema.json`` and ``meta.json``.
``python -m data.synth ctr_seq ...`` writes CTR data with a behaviour-sequence signal
(:mod:`data.synth.ctr_seq`); ``python -m data.synth ctr2 ...`` two-task click / conversion data
(:mod:`data.synth.ctr2`); ``python -m data.synth seq ...`` next-item sequences with an
oracle HR@10 (:mod:`data.synth.next_item`).

The planted click model (all parameters drawn from ``--seed``)::

    logit = bias + Σ_f Σ_{id ∈ row_f} w_f[id]                 (first order, per-id weights)
          + Σ_{f<g ∈ I} <Σ_{id ∈ row_f} v_f[id], Σ_{id ∈ row_g} v_g[id]>   (pairwise fields)
          + dense · β + γ · dense_0 · dense_1                  (dense effects)
    label ~ Bernoulli(sigmoid(logit))

Ids are Zipf-distributed (a shuffled rank → id map, so hot ids are spread over the table).
``I`` is a subset of the sparse fields; the other fields carry first-order signal only.
The oracle AUC — the AUC of the planted probabilities on the eval split — is the best any
model can reach and is stored in ``meta.json`` with the oracle log-loss.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa

from data.convert.common import list_column
from data.schema import FeatureSpec, LabelSpec, Schema
from data.synth.common import ZipfSampler, segment_sum, write_planted_dataset

logger = logging.getLogger(__name__)


@dataclass
class CTRSynthArgs:
    """Arguments of the synthetic CTR generator (see the module docstring)."""

    train_rows: int = 200_000
    eval_rows: int = 50_000
    num_dense: int = 4
    # One entry per sparse feature: table size. Features beyond ``len(multi_hot)`` are
    # single-id; ``multi_hot[i]`` is the maximum number of ids of feature i (0..max, so
    # empty rows occur).
    num_embeddings: List[int] = field(default_factory=lambda: [1000, 2000, 500, 5000, 100, 3000])
    multi_hot: List[int] = field(default_factory=lambda: [0, 0, 0, 0, 3, 0])
    embedding_dim: int = 16
    interacting_fields: int = 4
    latent_dim: int = 4
    zipf: float = 1.05
    first_order_scale: float = 0.6
    interaction_scale: float = 0.9
    dense_scale: float = 0.5
    bias: float = -1.0
    rows_per_file: int = 100_000
    row_group_rows: int = 8192
    seed: int = 0


PRESETS: Dict[str, Dict[str, object]] = {
    # `make demo`: big enough that the learned AUC gets close to the oracle, small enough to
    # generate in seconds and train in a few minutes on 2 cores.
    "demo": dict(train_rows=2_000_000, eval_rows=100_000,
                 num_embeddings=[1000, 2000, 500, 2000, 100, 1500, 800, 2000],
                 multi_hot=[0, 0, 0, 0, 3, 0, 0, 2], zipf=1.2, rows_per_file=500_000),
    # CI-sized: learnable within about a minute on 2 gloo ranks.
    "ci": dict(train_rows=300_000, eval_rows=50_000,
               num_embeddings=[300, 500, 200, 1000, 50, 400],
               multi_hot=[0, 0, 0, 0, 3, 0], rows_per_file=100_000, row_group_rows=4096),
    # Unit tests: tiny.
    "tiny": dict(train_rows=4096, eval_rows=1024, num_embeddings=[50, 80, 20, 100],
                 multi_hot=[0, 3, 0, 0], rows_per_file=2048, row_group_rows=512),
}


@dataclass
class PlantedCTR:
    """Parameters of the planted click model."""

    args: CTRSynthArgs
    samplers: List[ZipfSampler]
    w: List[np.ndarray]  # per feature: [n] first-order weights
    v: List[Optional[np.ndarray]]  # per feature: [n, k] latent vectors (None: no interaction)
    beta: np.ndarray  # [num_dense]
    gamma: float

    @classmethod
    def draw(cls, args: CTRSynthArgs) -> "PlantedCTR":
        rng = np.random.default_rng(args.seed)
        samplers, w, v = [], [], []
        for i, n in enumerate(args.num_embeddings):
            samplers.append(ZipfSampler(n, args.zipf, rng))
            w.append(rng.normal(0.0, args.first_order_scale, size=n))
            if i < args.interacting_fields:
                v.append(rng.normal(0.0, args.interaction_scale / np.sqrt(args.latent_dim),
                                    size=(n, args.latent_dim)))
            else:
                v.append(None)
        beta = rng.normal(0.0, args.dense_scale, size=args.num_dense)
        return cls(args, samplers, w, v, beta, gamma=args.dense_scale)

    def sample(self, rows: int, rng: np.random.Generator
               ) -> Tuple[np.ndarray, List[Tuple[np.ndarray, np.ndarray]], np.ndarray, np.ndarray]:
        """Returns dense [rows, Dd], per-feature (offsets [rows+1], ids), probs and labels."""
        a = self.args
        dense = rng.normal(0.0, 1.0, size=(rows, a.num_dense)).astype(np.float32)
        logit = np.full(rows, a.bias, dtype=np.float64)
        if a.num_dense:
            logit += dense.astype(np.float64) @ self.beta
        if a.num_dense >= 2:
            logit += self.gamma * dense[:, 0].astype(np.float64) * dense[:, 1]
        sparse: List[Tuple[np.ndarray, np.ndarray]] = []
        pooled_v: List[np.ndarray] = []
        for i in range(len(a.num_embeddings)):
            max_ids = a.multi_hot[i] if i < len(a.multi_hot) else 0
            if max_ids > 0:
                lengths = rng.integers(0, max_ids + 1, size=rows)
            else:
                lengths = np.ones(rows, dtype=np.int64)
            offsets = np.zeros(rows + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            ids = self.samplers[i](int(offsets[-1]), rng)
            sparse.append((offsets, ids))
            # Sum over the row's ids, vectorised with a segment sum (reduceat on a
            # zero-padded array handles empty rows).
            logit += segment_sum(self.w[i][ids], offsets)
            if self.v[i] is not None:
                pooled_v.append(segment_sum(self.v[i][ids], offsets))
        for x in range(len(pooled_v)):
            for y in range(x + 1, len(pooled_v)):
                logit += np.einsum("bk,bk->b", pooled_v[x], pooled_v[y])
        probs = 1.0 / (1.0 + np.exp(-logit))
        labels = (rng.random(rows) < probs).astype(np.float32)
        return dense, sparse, probs, labels


def ctr_schema(args: CTRSynthArgs) -> Schema:
    feats = [FeatureSpec(f"d{j}", "dense") for j in range(args.num_dense)]
    for i, n in enumerate(args.num_embeddings):
        feats.append(FeatureSpec(f"s{i}", "sparse", table=f"t{i}", num_embeddings=n,
                                 embedding_dim=args.embedding_dim, pooling="sum"))
    return Schema(features=feats, labels=[LabelSpec("label", "binary")])


def part_table(schema: Schema, dense: np.ndarray,
               sparse: Sequence[Tuple[np.ndarray, np.ndarray]], labels: np.ndarray) -> pa.Table:
    cols: Dict[str, pa.Array] = {}
    for j, f in enumerate(schema.dense_features):
        cols[f.name] = pa.array(dense[:, j])
    for f, (offsets, ids) in zip(schema.sparse_features, sparse):
        cols[f.name] = list_column(offsets, ids)
    cols[schema.labels[0].name] = pa.array(labels)
    return pa.table(cols)


def generate_ctr(out: str, args: CTRSynthArgs, overwrite: bool = False,
                 progress: bool = True) -> Dict[str, object]:
    """Write the dataset to ``out`` (atomically: a temp dir renamed at the end); returns meta."""
    if len(args.multi_hot) > len(args.num_embeddings):
        raise ValueError("--multi-hot has more entries than --num-embeddings")
    schema = ctr_schema(args)
    planted = PlantedCTR.draw(args)

    def sample(n: int, rng: np.random.Generator) -> Tuple[pa.Table, np.ndarray, np.ndarray]:
        dense, sparse, probs, labels = planted.sample(n, rng)
        return part_table(schema, dense, sparse, labels), probs, labels

    return write_planted_dataset(out, "data.synth ctr", args, schema, sample, overwrite,
                                 progress)
