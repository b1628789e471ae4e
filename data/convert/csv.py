"""Any CSV / TSV / parquet table + a JSON spec → CTR-style dataset with train/valid/test.

The spec (``--spec spec.json``) names the columns to use::

    {
      "delimiter": ",",              # text inputs only (default ","; "\\t" for TSV)
      "header": true,                # text: first line holds the column names
      "columns": ["c1", "c2"],       # text without header: the column names
      "label": {"column": "clicked", "kind": "binary"},   # "name" renames it
      "dense": [{"column": "age", "transform": "standardize", "fill": 0.0},
                {"column": "price", "transform": ["log1p", "bucketize"], "buckets": 16}],
      "categorical": [
        {"column": "site", "num_embeddings": 100000, "embedding_dim": 16},
        {"column": "city", "min_count": 5},
        {"column": "tags", "separator": "|", "num_embeddings": 5000, "pooling": "mean"}
      ],
      "passthrough": ["req_id"],
      "valid_ratio": 0.1, "test_ratio": 0.1, "seed": 0
    }

Transforms, hashing and vocabularies are :mod:`data.preprocess` (the same code scores rows
at predict time); statistics (mean/std, quantiles, vocabularies) come from the train split
only and are stored in ``meta.json["preprocess"]``.

Splits: each row goes to ``test`` with probability ``test_ratio`` and to ``valid`` with
probability ``valid_ratio`` by a seeded hash of its position (``--valid-ratio``,
``--test-ratio``, ``--seed`` override the spec), or with ``--split-by COLUMN`` in time order:
the rows with the largest values of COLUMN (numbers, or text such as ISO dates compared as
text; ties broken by position) form the last ``test_ratio`` fraction, the ones before them
``valid``. A spec's ``eval_ratio`` (older specs) means ``test_ratio`` with no valid split.

``--no-label`` (or a spec without a label) converts rows for scoring only; ``--like DATASET``
reuses that dataset's preprocessing (hash salts, vocabularies, statistics) instead of a spec,
writing every row to ``--split`` (default ``test``).

Row groups (the unit dealt to ranks) default to a size chosen per split from its row count so
that up to 8 ranks get even shares (see :class:`data.convert.common.ShardWriter`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data.convert.common import (DIM_MULTIPLE, BadLines, ConvertError, DatasetWriter, Progress,
                                 check_inputs, unit_interval)
from data.convert.text import LineMap, float_column, report_bad_rows
from data.preprocess import Preprocessor
from data.schema import META_FILE

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", help="JSON spec of the columns (see the module doc of "
                                  "data/convert/csv.py); not with --like")
    p.add_argument("--valid-ratio", type=float, default=None,
                   help="fraction of rows for the valid split (default: spec's, else 0.1)")
    p.add_argument("--test-ratio", type=float, default=None,
                   help="fraction of rows for the test split (default: spec's, else 0.1)")
    p.add_argument("--split-by", default=None, metavar="COLUMN",
                   help="split in time order by COLUMN: the last rows go to valid, then test")
    p.add_argument("--seed", type=int, default=None, help="seed of the random split (default 0)")
    p.add_argument("--no-label", action="store_true",
                   help="rows have no label: convert for scoring only (with --like or a spec)")
    p.add_argument("--like", default=None, metavar="DATASET",
                   help="reuse DATASET's preprocessing (vocabularies, hash salts, statistics)")
    p.add_argument("--split", default="test",
                   help="with --like: the split directory the rows go to (default test)")


def _load_spec(path: str) -> Dict[str, Any]:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise ConvertError(f"--spec {path}: cannot read JSON ({e})") from None


def _split_options(spec: Dict[str, Any], args: argparse.Namespace, where: str
                   ) -> Tuple[float, float, Optional[str], int]:
    valid = getattr(args, "valid_ratio", None)
    test = getattr(args, "test_ratio", None)
    if "eval_ratio" in spec:
        if "valid_ratio" in spec or "test_ratio" in spec:
            raise ConvertError(f"{where}: 'eval_ratio' (older specs: the test fraction) "
                               f"cannot be combined with 'valid_ratio'/'test_ratio'; use those")
        spec_valid, spec_test = 0.0, spec["eval_ratio"]
    else:
        spec_valid, spec_test = spec.get("valid_ratio", 0.1), spec.get("test_ratio", 0.1)
    valid = float(spec_valid if valid is None else valid)
    test = float(spec_test if test is None else test)
    for name, v in (("valid ratio", valid), ("test ratio", test)):
        if not 0.0 <= v < 1.0:
            raise ConvertError(f"{where}: {name} must be in [0, 1), got {v}")
    if valid + test >= 1.0:
        raise ConvertError(f"{where}: valid ratio {valid} + test ratio {test} leave no train "
                           f"rows; their sum must be < 1")
    split_by = getattr(args, "split_by", None) or spec.get("split_by")
    seed = getattr(args, "seed", None)
    seed = int(spec.get("seed", 0) if seed is None else seed)
    return valid, test, split_by, seed


def _check_widths(pre: Preprocessor, where: str) -> None:
    """Widths must be multiples of 4 (fbgemm); mixed widths are reported (DeepFM, AutoInt and
    the other interaction models need one width)."""
    feats = pre.schema().sparse_features
    bad = [(f.name, f.embedding_dim) for f in feats if f.embedding_dim % DIM_MULTIPLE]
    if bad:
        raise ConvertError(f"{where}: embedding_dim of {bad} is not a multiple of "
                           f"{DIM_MULTIPLE} (fbgemm's embedding kernels need it); e.g. use "
                           f"{[(n, -(-d // DIM_MULTIPLE) * DIM_MULTIPLE) for n, d in bad]}")
    widths = sorted({f.embedding_dim for f in feats})
    if len(widths) > 1:
        logger.warning("%s: mixed embedding widths %s (%s); models that interact embeddings "
                       "(deepfm, dcn_v2, autoint, interformer) need one width — set every "
                       "'embedding_dim' to one value for them", where, widths,
                       ", ".join(f"{f.name}={f.embedding_dim}" for f in feats))


def _rows_in(pre: Preprocessor, inputs: Sequence[str], bad_lines: BadLines,
             columns: List[str], required: List[str], progress: Optional[Progress] = None
             ) -> Iterator[Tuple[int, int, pa.RecordBatch, Optional[LineMap], str]]:
    """(global row id of the batch's first row, first row in file, batch, line map, path)."""
    for fi, path in enumerate(inputs):
        for first_row, batch, line_map in pre.read_batches(path, bad_lines, progress, columns,
                                                           required):
            yield (fi << 40) + first_row, first_row, batch, line_map, path


def _time_order_codes(pre: Preprocessor, inputs: Sequence[str], column: str, valid: float,
                      test: float, skip: int) -> Dict[int, np.ndarray]:
    """Per input file: split code (0 train, 1 valid, 2 test) of every row, from the global
    order of ``column`` (ties by position). Holds one value per row in memory."""
    values: List[Any] = []
    ids: List[np.ndarray] = []
    numeric = True
    for gid, _, batch, _, path in _rows_in(pre, inputs, BadLines(skip), [column], [column]):
        col = batch.column(column)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            x, bad = float_column(col, empty=np.nan)
            if numeric and bad.any():
                numeric = False
            values.append((x, np.asarray(col.to_numpy(zero_copy_only=False), dtype=object)))
        else:
            x = np.asarray(pc.fill_null(col.cast(pa.float64()), np.nan), dtype=np.float64)
            values.append((x, None))
        ids.append(gid + np.arange(batch.num_rows, dtype=np.int64))
    if not ids:
        return {}
    row_ids = np.concatenate(ids)
    if numeric:
        key = np.concatenate([v[0] for v in values])
        if np.isnan(key).any():
            raise ConvertError(f"--split-by {column}: empty value in {int(np.isnan(key).sum())} "
                               f"row(s); every row needs a time to be ordered by")
    else:
        texts = [v[1] if v[1] is not None else v[0].astype(str) for v in values]
        key = np.concatenate(texts).astype(str)
        logger.info("--split-by %s: values are not all numbers; ordering them as text "
                    "(right for ISO dates such as 2026-12-02T10:00)", column)
    order = np.lexsort((row_ids, key))
    n = order.size
    n_test = int(round(n * test))
    n_valid = int(round(n * valid))
    codes = np.zeros(n, dtype=np.int8)
    codes[order[n - n_test:]] = 2
    codes[order[n - n_test - n_valid:n - n_test]] = 1
    out: Dict[int, np.ndarray] = {}
    files = row_ids >> 40
    for fi in np.unique(files).tolist():
        sel = files == fi
        local = row_ids[sel] & ((1 << 40) - 1)
        arr = np.zeros(int(local.max()) + 1, dtype=np.int8)
        arr[local] = codes[sel]
        out[fi] = arr
    return out


def convert(inputs: Sequence[str], out: str, args: argparse.Namespace) -> Dict[str, Any]:
    inputs = check_inputs(inputs)
    like = getattr(args, "like", None)
    no_label = bool(getattr(args, "no_label", False))
    if like:
        if args.spec:
            raise ConvertError("--like and --spec are exclusive: --like reuses DATASET's "
                               "spec and statistics")
        pre = Preprocessor.from_dataset(like)
        spec: Dict[str, Any] = {}
        where = f"--like {like}"
    else:
        if not args.spec:
            raise ConvertError("give --spec SPEC.json (or --like DATASET to reuse a converted "
                               "dataset's preprocessing)")
        spec = _load_spec(args.spec)
        where = f"--spec {args.spec}"
        pre = Preprocessor.from_spec(spec, where, require_label=not no_label)
    if no_label:
        pre = pre.without_label()
    labelled = pre.label is not None
    bad_lines = BadLines(args.skip_bad_lines)
    if like:
        valid, test, split_by, seed = 0.0, 0.0, None, 0
    else:
        valid, test, split_by, seed = _split_options(spec, args, where)
    if not labelled and not like:
        # Rows for scoring only: one split, no statistics can be fitted on unlabelled rows
        # without leaking; fitting them here is allowed only for stateless specs.
        if not pre.fitted:
            raise ConvertError(f"{where}: standardize/bucketize/min_count need a training "
                               f"dataset's statistics for unlabelled rows; convert with "
                               f"--like TRAINING_DATASET instead of --spec")
        valid, test, split_by = 0.0, 0.0, None
    columns = pre.raw_columns() + ([split_by] if split_by and split_by not in
                                   pre.raw_columns() else [])
    required = pre.feature_columns() + ([pre.label["column"]] if labelled else []) + \
        ([split_by] if split_by else [])

    codes_by_file: Dict[int, np.ndarray] = {}
    if split_by:
        codes_by_file = _time_order_codes(pre, inputs, split_by, valid, test, args.skip_bad_lines)

    def split_codes(gid: int, n: int) -> np.ndarray:
        if split_by:
            fi, first = gid >> 40, gid & ((1 << 40) - 1)
            return codes_by_file[fi][first:first + n]
        u = unit_interval(seed, gid + np.arange(n, dtype=np.int64))
        c = np.zeros(n, dtype=np.int8)
        c[u < test + valid] = 1
        c[u < test] = 2  # the same rows as the older eval_ratio split when valid is 0
        return c

    # Pass 1 (only when a transform or vocabulary needs them): train-split statistics.
    if not pre.fitted:
        fitter = pre.fitter()
        for gid, _, batch, _, _ in _rows_in(pre, inputs, BadLines(args.skip_bad_lines),
                                            columns, required):
            c = split_codes(gid, batch.num_rows)
            train = pa.array(c == 0)
            fitter.update(pa.Table.from_batches([batch]).filter(train),
                          (gid + np.arange(batch.num_rows, dtype=np.int64))[c == 0])
        pre = fitter.finish()
    _check_widths(pre, where)
    schema = pre.schema()
    out_split = getattr(args, "split", "test") if like or not labelled else None
    with DatasetWriter(out, args.overwrite, args.rows_per_file, args.row_group_rows,
                       args.compression) as writer:
        progress = Progress(inputs, args.progress, desc="csv")
        for gid, first_row, batch, line_map, path in _rows_in(pre, inputs, bad_lines, columns,
                                                               required, progress):
            n = batch.num_rows
            table, problems = pre.transform_checked(batch)
            bad_any = np.zeros(n, dtype=bool)
            for b, _ in problems:
                bad_any |= b

            def problem(i: int) -> str:
                for b, msg in problems:
                    if b[i]:
                        return msg
                return "malformed"

            if bad_any.any():
                if line_map is None:  # parquet input: rows, not lines
                    for i in np.flatnonzero(bad_any).tolist():
                        bad_lines.add(path, None, f"row {first_row + i}: {problem(i)}")
                    keep = ~bad_any
                else:
                    keep = report_bad_rows(path, bad_any, first_row, line_map, batch,
                                           problem, bad_lines)
            else:
                keep = np.ones(n, dtype=bool)
            if out_split is not None:
                writer.write(out_split, table.filter(pa.array(keep)))
                continue
            c = split_codes(gid, n)
            for code, split in enumerate(SPLITS):
                writer.write(split, table.filter(pa.array(keep & (c == code))))
        progress.close()
        meta = {
            "converter": "csv",
            "inputs": list(inputs),
            "args": {k: v for k, v in vars(args).items() if k not in ("inputs", "func")},
            "spec": spec if not like else _like_spec(like),
            "splits": {"valid_ratio": valid, "test_ratio": test, "split_by": split_by,
                       "seed": seed} if out_split is None else {"only": out_split},
            "preprocess": pre.state(),
            "bad_lines_skipped": bad_lines.count,
        }
        if like:
            meta["like"] = os.path.abspath(like)
        return writer.finish(schema, meta)


def _like_spec(dataset: str) -> Any:
    with open(os.path.join(dataset, META_FILE)) as fh:
        return json.load(fh).get("spec")
