"""Synthetic datasets with a planted model and a known oracle.

``python -m data.synth ctr --out DIR [--preset demo] [--seed 0] ...`` writes a CTR dataset:
``DIR/train/part-*.parquet``, ``DIR/eval/part-*.parquet``, ``schema.json`` and ``meta.json``.
``python -m data.synth ctr_seq ...`` writes CTR data with a behaviour-sequence signal
(:mod:`data.synth_seq`); ``python -m data.synth ctr2 ...`` two-task click / conversion data
(:mod:`data.synth_multitask`); ``python -m data.synth seq ...`` next-item sequences with an
oracle HR@10 (:mod:`data.synth_nextitem`).

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

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.cli import ArgumentParser
from data.io import write_json_atomic
from data.marker import DATASET_MARKER, replace_refusal, write_marker
from data.metrics import log_loss, roc_auc
from data.schema import FeatureSpec, LabelSpec, Schema

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


class ZipfSampler:
    """Draws ids in ``[0, n)`` with P(rank r) ∝ (r + 1)^-a, ranks mapped to ids by a fixed
    random permutation."""

    def __init__(self, n: int, a: float, rng: np.random.Generator) -> None:
        p = 1.0 / np.power(np.arange(1, n + 1, dtype=np.float64), a)
        self.cdf = np.cumsum(p / p.sum())
        self.perm = rng.permutation(n).astype(np.int64)

    def __call__(self, size: int, rng: np.random.Generator) -> np.ndarray:
        ranks = np.searchsorted(self.cdf, rng.random(size), side="right")
        return self.perm[np.minimum(ranks, self.perm.size - 1)]


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
            logit += _segment_sum(self.w[i][ids], offsets)
            if self.v[i] is not None:
                pooled_v.append(_segment_sum(self.v[i][ids], offsets))
        for x in range(len(pooled_v)):
            for y in range(x + 1, len(pooled_v)):
                logit += np.einsum("bk,bk->b", pooled_v[x], pooled_v[y])
        probs = 1.0 / (1.0 + np.exp(-logit))
        labels = (rng.random(rows) < probs).astype(np.float32)
        return dense, sparse, probs, labels


def _segment_sum(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Sum of ``values[offsets[r]:offsets[r+1]]`` per row r (0 for empty rows)."""
    rows = offsets.size - 1
    out_shape = (rows,) + values.shape[1:]
    if values.shape[0] == 0:
        return np.zeros(out_shape, dtype=np.float64)
    csum = np.concatenate([np.zeros((1,) + values.shape[1:]), np.cumsum(values, axis=0)])
    return csum[offsets[1:]] - csum[offsets[:-1]]


def ctr_schema(args: CTRSynthArgs) -> Schema:
    feats = [FeatureSpec(f"d{j}", "dense") for j in range(args.num_dense)]
    for i, n in enumerate(args.num_embeddings):
        feats.append(FeatureSpec(f"s{i}", "sparse", table=f"t{i}", num_embeddings=n,
                                 embedding_dim=args.embedding_dim, pooling="sum"))
    return Schema(features=feats, labels=[LabelSpec("label", "binary")])


def list_array(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    """``list<int64>`` Arrow array from row offsets and flat values (no per-row Python)."""
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                    pa.array(values.astype(np.int64)))


def _part_table(schema: Schema, dense: np.ndarray,
                sparse: Sequence[Tuple[np.ndarray, np.ndarray]], labels: np.ndarray) -> pa.Table:
    cols: Dict[str, pa.Array] = {}
    for j, f in enumerate(schema.dense_features):
        cols[f.name] = pa.array(dense[:, j])
    for f, (offsets, ids) in zip(schema.sparse_features, sparse):
        cols[f.name] = list_array(offsets, ids)
    cols[schema.labels[0].name] = pa.array(labels)
    return pa.table(cols)


SampleFn = Callable[[int, np.random.Generator], Tuple[pa.Table, np.ndarray, np.ndarray]]


def write_planted_dataset(out: str, generator: str, args: Any, schema: Schema,
                          sample: SampleFn, overwrite: bool = False,
                          progress: bool = True,
                          task_names: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Write ``train``/``eval`` parquet parts drawn by ``sample(rows, rng)`` (→ table, planted
    probabilities, labels), ``schema.json`` and ``meta.json`` with the oracle metrics, into
    a temp dir renamed to ``out`` at the end. ``args`` (a dataclass) needs ``seed``,
    ``train_rows``, ``eval_rows``, ``rows_per_file`` and ``row_group_rows``.

    With ``task_names`` (T names), ``sample`` returns probabilities and labels of shape
    ``[rows, T]`` and the oracle holds ``auc_<task>`` / ``logloss_<task>`` / ``rate_<task>``
    per task (eval split) besides ``auc`` / ``logloss`` of the first task."""
    out = os.path.abspath(out)
    refusal = replace_refusal(out, overwrite, DATASET_MARKER, "dataset")
    if refusal:
        raise FileExistsError(refusal)
    t0 = time.time()
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    oracle: Dict[str, float] = {}
    files: Dict[str, List[str]] = {}
    for split, rows, split_seed in (("train", args.train_rows, 1), ("eval", args.eval_rows, 2)):
        os.makedirs(os.path.join(tmp, split))
        rng = np.random.default_rng([args.seed, split_seed])
        probs_all, labels_all = [], []
        files[split] = []
        for part, start in enumerate(range(0, rows, args.rows_per_file)):
            n = min(args.rows_per_file, rows - start)
            table, probs, labels = sample(n, rng)
            name = os.path.join(split, f"part-{part:05d}.parquet")
            pq.write_table(table, os.path.join(tmp, name), row_group_size=args.row_group_rows)
            files[split].append(name)
            probs_all.append(probs)
            labels_all.append(labels)
            if progress:
                logger.info("%s: wrote %s (%d rows)", split, name, n)
        p, y = np.concatenate(probs_all), np.concatenate(labels_all)
        if task_names:
            for k, task in enumerate(task_names):
                oracle[f"{split}_auc_{task}"] = roc_auc(p[:, k], y[:, k])
                oracle[f"{split}_logloss_{task}"] = log_loss(p[:, k], y[:, k])
                oracle[f"{split}_rate_{task}"] = float(y[:, k].mean())
                if split == "eval":
                    oracle[f"auc_{task}"] = oracle[f"eval_auc_{task}"]
                    oracle[f"logloss_{task}"] = oracle[f"eval_logloss_{task}"]
            p, y = p[:, 0], y[:, 0]
        oracle[f"{split}_auc"] = roc_auc(p, y)
        oracle[f"{split}_logloss"] = log_loss(p, y)
        oracle[f"{split}_ctr"] = float(y.mean())
    meta = {
        "generator": generator,
        "args": dataclasses.asdict(args),
        "rows": {"train": args.train_rows, "eval": args.eval_rows},
        "files": files,
        "oracle": {"auc": oracle["eval_auc"], "logloss": oracle["eval_logloss"], **oracle},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    schema.save(tmp)
    write_json_atomic(os.path.join(tmp, "meta.json"), meta)
    write_marker(tmp, DATASET_MARKER, generator)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    logger.info("dataset %s: %d train / %d eval rows, oracle eval AUC %.4f (%.1fs)", out,
                args.train_rows, args.eval_rows, oracle["eval_auc"], time.time() - t0)
    return meta


def generate_ctr(out: str, args: CTRSynthArgs, overwrite: bool = False,
                 progress: bool = True) -> Dict[str, object]:
    """Write the dataset to ``out`` (atomically: a temp dir renamed at the end); returns meta."""
    if len(args.multi_hot) > len(args.num_embeddings):
        raise ValueError("--multi-hot has more entries than --num-embeddings")
    schema = ctr_schema(args)
    planted = PlantedCTR.draw(args)

    def sample(n: int, rng: np.random.Generator) -> Tuple[pa.Table, np.ndarray, np.ndarray]:
        dense, sparse, probs, labels = planted.sample(n, rng)
        return _part_table(schema, dense, sparse, labels), probs, labels

    return write_planted_dataset(out, "data.synth ctr", args, schema, sample, overwrite,
                                 progress)


def _int_list(s: str) -> List[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}")


@dataclass(frozen=True)
class _Generator:
    """One ``python -m data.synth KIND`` subcommand: its argument dataclass (every field
    becomes a ``--flag``), named presets, writer, and the oracle keys it prints."""

    help: str
    args_cls: Type[Any]
    presets: Dict[str, Dict[str, object]]
    generate: Callable[..., Dict[str, object]]
    printed: Callable[[Dict[str, Any]], Dict[str, Any]]


def _generators() -> Dict[str, _Generator]:
    # Imported here: those modules import this one (planted-dataset writer, samplers).
    from data.synth_multitask import CTR2_PRESETS, MultiTaskSynthArgs, generate_ctr2
    from data.synth_nextitem import NEXT_ITEM_PRESETS, NextItemSynthArgs, generate_next_item
    from data.synth_retrieval import RETRIEVAL_PRESETS, RetrievalSynthArgs, generate_retrieval
    from data.synth_seq import SEQ_PRESETS, SeqCTRSynthArgs, generate_ctr_seq

    def auc(oracle: Dict[str, Any]) -> Dict[str, Any]:
        return {"oracle_auc": oracle["auc"]}

    return {
        "ctr": _Generator("CTR dataset from a planted FM-like click model", CTRSynthArgs,
                          PRESETS, generate_ctr, auc),
        "ctr2": _Generator("two-task dataset: click, and conversion only after a click "
                           "(CTCVR = CTR x CVR; data.synth_multitask); presets: the ctr sizes "
                           "and the ESMM setting esmm_ci", MultiTaskSynthArgs,
                           {**PRESETS, **CTR2_PRESETS}, generate_ctr2,
                           lambda o: {k: v for k, v in o.items() if k.startswith("auc_")}),
        "ctr_seq": _Generator("CTR dataset whose main signal is in a behaviour sequence "
                              "(data.synth_seq)", SeqCTRSynthArgs, SEQ_PRESETS,
                              generate_ctr_seq, auc),
        "seq": _Generator("next-item sessions from a planted cluster Markov chain with an "
                          "oracle HR@10 (data.synth_nextitem)", NextItemSynthArgs,
                          NEXT_ITEM_PRESETS, generate_next_item,
                          lambda o: {"oracle_hr@10": o["hr@10"],
                                     "oracle_ndcg@10": o["ndcg@10"],
                                     "time_blind_oracle_hr@10": o["time_blind_hr@10"]}),
        "retrieval": _Generator("user/item retrieval rows from planted user (multi-interest) "
                                "and item vectors with an oracle recall@K "
                                "(data.synth_retrieval)", RetrievalSynthArgs,
                                RETRIEVAL_PRESETS, generate_retrieval,
                                lambda o: {"oracle_recall@50": o["recall@50"],
                                           "oracle_ndcg@10": o["ndcg@10"]}),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = ArgumentParser(prog="python -m data.synth",
                            description="Generate synthetic datasets with an oracle.")
    sub = parser.add_subparsers(dest="kind", required=True)
    generators = _generators()
    for kind, gen in generators.items():
        p = sub.add_parser(kind, help=gen.help)
        p.add_argument("--out", required=True, help="dataset directory to create")
        p.add_argument("--preset", choices=sorted(gen.presets), help="start from a named size")
        p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
        defaults = gen.args_cls()
        for f in dataclasses.fields(gen.args_cls):
            default = getattr(defaults, f.name)
            flag = "--" + f.name.replace("_", "-")
            if isinstance(default, (list, tuple)):
                p.add_argument(flag, type=_int_list, default=None,
                               help=f"comma-separated ints (default {default})")
            else:
                p.add_argument(flag, type=type(default), default=None, help=f"default {default}")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    gen = generators[ns.kind]
    kwargs: Dict[str, object] = dict(gen.presets[ns.preset]) if ns.preset else {}
    kwargs.update({f.name: getattr(ns, f.name) for f in dataclasses.fields(gen.args_cls)
                   if getattr(ns, f.name) is not None})
    try:
        meta = gen.generate(ns.out, gen.args_cls(**kwargs), overwrite=ns.overwrite)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": ns.out, **gen.printed(meta["oracle"])}))  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
