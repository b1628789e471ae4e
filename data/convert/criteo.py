"""Criteo Kaggle / Terabyte TSV → dataset directory.

Input lines: ``label \\t I1..I13 \\t C1..C26`` (integers, then 8-hex-digit categoricals;
empty fields are missing). Files may be plain or ``.gz``. Output rows:

* ``I1..I13``: float32 dense, ``log(1 + max(x, 0))`` with missing → 0;
* ``C1..C26``: ``list<int64>`` with one id each. Hash mode (default): FNV-1a of the text into
  ``[1, num_embeddings)``; vocabulary mode (``--min-count N``): a first pass counts every
  value of the training rows and values seen ``>= N`` times get ids ``1..V`` (so
  ``num_embeddings = V + 1``); rare values map to 0, like missing ones. The vocabulary's
  64-bit keys and counts are saved to ``vocab.npz`` so new data can be mapped the same way;
* ``label``: float32 0/1.

Splits: ``--eval-files K`` / ``--test-files K`` send the last input files (the last days) to
``eval`` / ``test``; otherwise ``--eval-ratio`` / ``--test-ratio`` pick rows by a seeded hash
of their position, the same in both passes.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data.convert.common import (BadLines, ConvertError, DatasetWriter, Progress, bucketize,
                                 check_embedding_dim, check_inputs, hash64, parse_int_list,
                                 single_id_column, unit_interval)
from data.convert.text import integer_column, read_delimited, report_bad_rows
from data.schema import FeatureSpec, LabelSpec, Schema

logger = logging.getLogger(__name__)

NUM_DENSE = 13
NUM_CAT = 26
DENSE = [f"I{i}" for i in range(1, NUM_DENSE + 1)]
CATEGORICAL = [f"C{i}" for i in range(1, NUM_CAT + 1)]
COLUMNS = ["label"] + DENSE + CATEGORICAL


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-embeddings", default="1000000",
                   help="hash buckets per categorical: one integer or 26 comma-separated "
                        "(default 1000000; id 0 = missing)")
    p.add_argument("--min-count", type=int, default=0,
                   help="build a vocabulary in a first pass and keep values seen at least this "
                        "often (0: hash instead)")
    p.add_argument("--embedding-dim", type=int, default=16)
    p.add_argument("--eval-files", type=int, default=0,
                   help="the last K input files become the eval split")
    p.add_argument("--test-files", type=int, default=0,
                   help="the K input files before the eval files become the test split")
    p.add_argument("--eval-ratio", type=float, default=0.1,
                   help="fraction of rows sent to eval when --eval-files is 0 (default 0.1)")
    p.add_argument("--test-ratio", type=float, default=0.0,
                   help="fraction of rows sent to test when --test-files is 0")
    p.add_argument("--seed", type=int, default=0, help="seed of the ratio split")


def _file_splits(inputs: List[str], args: argparse.Namespace) -> List[Optional[str]]:
    """Split of every input file, or None where rows are split by ratio."""
    k_eval, k_test = args.eval_files, args.test_files
    if k_eval == 0 and k_test == 0:
        return [None] * len(inputs)
    if k_eval + k_test >= len(inputs):
        raise ConvertError(f"--eval-files {k_eval} + --test-files {k_test} leave no training "
                           f"file among {len(inputs)} input(s)")
    n = len(inputs)
    out: List[Optional[str]] = ["train"] * (n - k_eval - k_test)
    return out + ["test"] * k_test + ["eval"] * k_eval


def _row_splits(file_split: Optional[str], file_index: int, first_row: int, n: int,
                args: argparse.Namespace) -> np.ndarray:
    """Split code per row: 0 train, 1 eval, 2 test."""
    if file_split is not None:
        return np.full(n, {"train": 0, "eval": 1, "test": 2}[file_split], dtype=np.int8)
    rows = (np.int64(file_index) << np.int64(40)) + first_row + np.arange(n, dtype=np.int64)
    u = unit_interval(args.seed, rows)
    codes = np.zeros(n, dtype=np.int8)
    codes[u < args.eval_ratio] = 1
    codes[(u >= args.eval_ratio) & (u < args.eval_ratio + args.test_ratio)] = 2
    return codes


def _parse(path: str, batch: pa.RecordBatch, first_row: int, line_map: Any,
           bad_lines: BadLines) -> Tuple[np.ndarray, np.ndarray, List[pa.Array], np.ndarray]:
    """(labels [N], dense [N, 13] float32, categorical string columns, keep mask [N])."""
    label, bad_label = integer_column(batch.column(0), empty=-1)
    bad_label |= (label != 0) & (label != 1)
    bad = bad_label.copy()
    dense = np.empty((batch.num_rows, NUM_DENSE), dtype=np.float32)
    bad_dense = np.zeros(batch.num_rows, dtype=np.int64) - 1
    for j in range(NUM_DENSE):
        x, b = integer_column(batch.column(1 + j), empty=0)
        dense[:, j] = np.log1p(np.maximum(x, 0).astype(np.float64))
        bad_dense = np.where((bad_dense < 0) & b, j, bad_dense)
        bad |= b

    def problem(i: int) -> str:
        if bad_label[i]:
            return f"column 1 (label): expected 0 or 1, got {batch.column(0)[i].as_py()!r}"
        j = int(bad_dense[i])
        return (f"column {j + 2} ({DENSE[j]}): expected an integer or empty, "
                f"got {batch.column(1 + j)[i].as_py()!r}")

    keep = report_bad_rows(path, bad, first_row, line_map, batch, problem, bad_lines)
    cats = [batch.column(1 + NUM_DENSE + j) for j in range(NUM_CAT)]
    return label.astype(np.float32), dense, cats, keep


class Vocabulary:
    """Per-feature counts of 64-bit value hashes. Each chunk is reduced to its distinct keys
    and counts; those are merged into the running table only once they outgrow it, so the
    total sorting work stays proportional to the input (not chunks × vocabulary)."""

    def __init__(self, num_features: int) -> None:
        self.keys = [np.zeros(0, np.uint64) for _ in range(num_features)]
        self.counts = [np.zeros(0, np.int64) for _ in range(num_features)]
        self._pending: List[List[Tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(num_features)]
        self._pending_size = [0] * num_features

    def add(self, j: int, h: np.ndarray) -> None:
        keys, counts = np.unique(h, return_counts=True)
        self._pending[j].append((keys, counts.astype(np.int64)))
        self._pending_size[j] += keys.size
        if self._pending_size[j] > max(self.keys[j].size, 1 << 20):
            self._merge(j)

    def _merge(self, j: int) -> None:
        if not self._pending[j]:
            return
        keys = np.concatenate([self.keys[j]] + [k for k, _ in self._pending[j]])
        counts = np.concatenate([self.counts[j]] + [c for _, c in self._pending[j]])
        uniq, inverse = np.unique(keys, return_inverse=True)
        self.keys[j] = uniq
        self.counts[j] = np.bincount(inverse, weights=counts, minlength=uniq.size).astype(np.int64)
        self._pending[j], self._pending_size[j] = [], 0

    def freeze(self, min_count: int) -> None:
        for j in range(len(self.keys)):
            self._merge(j)
            keep = self.counts[j] >= min_count
            self.keys[j], self.counts[j] = self.keys[j][keep], self.counts[j][keep]

    def lookup(self, j: int, h: np.ndarray) -> np.ndarray:
        """ids in ``[1, V]`` for known values, 0 for values not in the vocabulary."""
        keys = self.keys[j]
        if keys.size == 0:
            return np.zeros(h.size, np.int64)
        pos = np.minimum(np.searchsorted(keys, h), keys.size - 1)
        return np.where(keys[pos] == h, pos + 1, 0).astype(np.int64)


def convert(inputs: Sequence[str], out: str, args: argparse.Namespace) -> Dict[str, Any]:
    inputs = check_inputs(inputs)
    check_embedding_dim(args.embedding_dim)
    file_splits = _file_splits(list(inputs), args)
    buckets = parse_int_list(args.num_embeddings, NUM_CAT, "--num-embeddings")
    bad_lines = BadLines(args.skip_bad_lines)
    vocab: Optional[Vocabulary] = None
    if args.min_count > 0:
        # First pass: count training values. Bad lines are counted again in pass two, so the
        # budget of this pass is separate.
        vocab = Vocabulary(NUM_CAT)
        first_pass_bad = BadLines(args.skip_bad_lines)
        progress = Progress(inputs, args.progress, desc="criteo vocabulary")
        for fi, path in enumerate(inputs):
            if file_splits[fi] not in (None, "train"):
                continue
            for first_row, batch, line_map in read_delimited(
                    path, COLUMNS, "\t", first_pass_bad, progress=progress):
                _, _, cats, keep = _parse(path, batch, first_row, line_map, first_pass_bad)
                train = keep & (_row_splits(file_splits[fi], fi, first_row, batch.num_rows,
                                            args) == 0)
                for j, col in enumerate(cats):
                    h = hash64(col, salt=j)
                    vocab.add(j, h[train & _nonempty(col)])
        progress.close()
        vocab.freeze(args.min_count)
        buckets = [k.size + 1 for k in vocab.keys]
    schema = Schema(
        features=[FeatureSpec(name, "dense") for name in DENSE]
        + [FeatureSpec(name, "sparse", num_embeddings=max(buckets[j], 1),
                       embedding_dim=args.embedding_dim)
           for j, name in enumerate(CATEGORICAL)],
        labels=[LabelSpec("label", "binary")],
    )
    with DatasetWriter(out, args.overwrite, args.rows_per_file, args.row_group_rows,
                       args.compression) as writer:
        progress = Progress(inputs, args.progress, desc="criteo")
        for fi, path in enumerate(inputs):
            for first_row, batch, line_map in read_delimited(path, COLUMNS, "\t", bad_lines,
                                                             progress=progress):
                label, dense, cats, keep = _parse(path, batch, first_row, line_map, bad_lines)
                cols: Dict[str, pa.Array] = {}
                for j, name in enumerate(DENSE):
                    cols[name] = pa.array(dense[:, j])
                for j, (name, col) in enumerate(zip(CATEGORICAL, cats)):
                    h = hash64(col, salt=j)
                    missing = ~_nonempty(col)
                    if vocab is not None:
                        ids = vocab.lookup(j, h)
                        ids[missing] = 0
                    else:
                        ids = bucketize(h, buckets[j], missing)
                    cols[name] = single_id_column(ids)
                cols["label"] = pa.array(label)
                table = pa.table(cols)
                codes = _row_splits(file_splits[fi], fi, first_row, batch.num_rows, args)
                for code, split in enumerate(("train", "eval", "test")):
                    mask = keep & (codes == code)
                    if mask.any():
                        writer.write(split, table.filter(pa.array(mask)))
        progress.close()
        if vocab is not None:
            np.savez(f"{writer.tmp}/vocab.npz",
                     **{f"{name}_keys": vocab.keys[j] for j, name in enumerate(CATEGORICAL)},
                     **{f"{name}_counts": vocab.counts[j] for j, name in enumerate(CATEGORICAL)})
        meta = {
            "converter": "criteo",
            "inputs": list(inputs),
            "args": {k: v for k, v in vars(args).items() if k not in ("inputs", "func")},
            "categorical_encoding": "vocabulary" if vocab is not None else "hash",
            "bad_lines_skipped": bad_lines.count,
        }
        return writer.finish(schema, meta)


def _nonempty(col: pa.Array) -> np.ndarray:
    return np.asarray(pc.not_equal(col, ""), dtype=bool)
