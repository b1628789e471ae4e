"""Any CSV / TSV / parquet table + a JSON spec → CTR-style dataset.

The spec (``--spec spec.json``) names the columns to use::

    {
      "delimiter": ",",              # text inputs only (default ","; "\\t" for TSV)
      "header": true,                # text: first line holds the column names
      "columns": ["c1", "c2"],       # text without header: the column names
      "label": {"column": "clicked", "kind": "binary"},   # "name" renames it
      "dense": [{"column": "price", "transform": "log", "fill": 0.0}],
      "categorical": [
        {"column": "site", "num_embeddings": 100000, "embedding_dim": 16},
        {"column": "tags", "separator": "|", "num_embeddings": 5000, "pooling": "mean"}
      ],
      "eval_ratio": 0.1, "seed": 0
    }

Dense: float32, ``fill`` for empty cells, ``transform`` ``none`` or ``log``
(``log(1 + max(x, 0))``). Categorical: each value's text is hashed (FNV-1a, salted by the
column's position) into ``[1, num_embeddings)``; id 0 is "missing" for single-valued columns;
multi-valued columns (``separator``) drop empty tokens, so a row may have no ids. Labels:
``binary`` must be 0/1, ``regression`` any finite number. Rows go to ``eval`` with
probability ``eval_ratio`` (in (0, 1)) by a seeded hash of their position.

Text follows RFC-4180 quoting: ``"a,b"`` is the one value ``a,b`` (hashed without its
quotes), ``""`` inside quotes is one ``"``, and a quoted value may span lines. Null cells
of parquet inputs are missing values: 0 for dense (``fill``), id 0 for categoricals, no ids
for multi-valued ones. Spec keys of the wrong JSON type fail naming the spec file and key.
"""

from __future__ import annotations

import argparse
import csv as pycsv
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data.convert.common import (BadLines, ConvertError, DatasetWriter, Progress, bucketize,
                                 check_inputs, hash64, list_column, unit_interval)
from data.convert.text import LineMap, float_column, read_delimited, report_bad_rows
from data.schema import FeatureSpec, LabelSpec, Schema


@dataclass
class DenseColumn:
    column: str
    transform: str = "none"
    fill: float = 0.0
    name: Optional[str] = None


@dataclass
class CategoricalColumn:
    column: str
    num_embeddings: int
    embedding_dim: int = 16
    separator: Optional[str] = None
    pooling: str = "sum"
    table: Optional[str] = None
    name: Optional[str] = None


@dataclass
class Spec:
    label: Dict[str, Any]
    dense: List[DenseColumn] = field(default_factory=list)
    categorical: List[CategoricalColumn] = field(default_factory=list)
    delimiter: str = ","
    header: bool = True
    columns: Optional[List[str]] = None
    eval_ratio: float = 0.1
    seed: int = 0

    @classmethod
    def load(cls, path: str) -> "Spec":
        try:
            with open(path) as fh:
                d = json.load(fh)
        except (OSError, json.JSONDecodeError) as e:
            raise ConvertError(f"--spec {path}: cannot read JSON ({e})") from None
        try:
            spec = cls(**{k: v for k, v in d.items() if k not in ("dense", "categorical")},
                       dense=[DenseColumn(**x) for x in d.get("dense", [])],
                       categorical=[CategoricalColumn(**x) for x in d.get("categorical", [])])
        except TypeError as e:
            raise ConvertError(f"--spec {path}: {e}; valid keys: label, dense, categorical, "
                               f"delimiter, header, columns, eval_ratio, seed (dense: column, "
                               f"transform, fill, name; categorical: column, num_embeddings, "
                               f"embedding_dim, separator, pooling, table, name)") from None
        if "column" not in spec.label:
            raise ConvertError(f"--spec {path}: label needs a 'column'")
        _check_spec_types(spec, path)
        for dcol in spec.dense:
            if dcol.transform not in ("none", "log"):
                raise ConvertError(f"--spec {path}: dense column {dcol.column!r}: transform "
                                   f"{dcol.transform!r} is not one of ['none', 'log']")
        return spec

    def schema(self) -> Schema:
        feats = [FeatureSpec(d.name or d.column, "dense") for d in self.dense]
        feats += [FeatureSpec(c.name or c.column, "sparse", table=c.table,
                              num_embeddings=c.num_embeddings, embedding_dim=c.embedding_dim,
                              pooling=c.pooling) for c in self.categorical]
        return Schema(features=feats, labels=[LabelSpec(self.label.get("name", self.label["column"]),
                                                        self.label.get("kind", "binary"))])

    def used_columns(self) -> List[str]:
        return [self.label["column"]] + [d.column for d in self.dense] + \
            [c.column for c in self.categorical]


_INT = (int,)
_NUM = (int, float)
_STR = (str,)
_OPT_STR = (str, type(None))
# JSON types of the spec's keys: a wrong type fails naming the spec file, the entry and the
# key (a num_embeddings of "1000" used to crash inside the hashing with a bare TypeError).
_SPEC_TYPES = {"delimiter": _STR, "header": (bool,), "columns": (list, type(None)),
               "eval_ratio": _NUM, "seed": _INT, "label": (dict,)}
_DENSE_TYPES = {"column": _STR, "transform": _STR, "fill": _NUM, "name": _OPT_STR}
_CAT_TYPES = {"column": _STR, "num_embeddings": _INT, "embedding_dim": _INT,
              "separator": _OPT_STR, "pooling": _STR, "table": _OPT_STR, "name": _OPT_STR}
_LABEL_TYPES = {"column": _STR, "kind": _STR, "name": _STR}
_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
          list: "a list", dict: "an object", type(None): "null"}


def _check_types(obj: Any, types: Dict[str, Tuple[type, ...]], where: str) -> None:
    for key, allowed in types.items():
        v = getattr(obj, key) if not isinstance(obj, dict) else obj.get(key, None)
        if isinstance(obj, dict) and key not in obj:
            continue
        if isinstance(v, bool) and bool not in allowed:  # JSON true is not a count
            ok = False
        else:
            ok = isinstance(v, allowed)
        if not ok:
            words = " or ".join(dict.fromkeys(_WORDS[t] for t in allowed))
            raise ConvertError(f"{where}: key {key!r} must be {words}, got {json.dumps(v)}")


def _check_spec_types(spec: Spec, path: str) -> None:
    """Type and range checks of a loaded spec; errors name ``path``, the entry and the key."""
    _check_types(spec, _SPEC_TYPES, f"--spec {path}")
    _check_types(spec.label, _LABEL_TYPES, f"--spec {path}: label")
    for i, d in enumerate(spec.dense):
        _check_types(d, _DENSE_TYPES, f"--spec {path}: dense #{i} {d.column!r}")
    for i, c in enumerate(spec.categorical):
        where = f"--spec {path}: categorical #{i} {c.column!r}"
        _check_types(c, _CAT_TYPES, where)
        if c.num_embeddings < 2:
            raise ConvertError(f"{where}: key 'num_embeddings' must be >= 2 (id 0 is "
                               f"'missing'), got {c.num_embeddings}")
    if not 0.0 < spec.eval_ratio < 1.0:
        raise ConvertError(f"--spec {path}: key 'eval_ratio' must lie in (0, 1), got "
                           f"{spec.eval_ratio}: 0 leaves no eval split and 1 no train split")
    if len(spec.delimiter) != 1:
        raise ConvertError(f"--spec {path}: key 'delimiter' must be one character, got "
                           f"{spec.delimiter!r}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", required=True, help="JSON spec of the columns (see module doc)")


def _batches(path: str, spec: Spec, bad_lines: BadLines, progress: Progress
             ) -> Iterator[Tuple[int, pa.RecordBatch, Optional[LineMap]]]:
    if path.endswith(".parquet"):
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise ConvertError(f"{path}: not a readable parquet file ({e})") from None
        missing = [c for c in spec.used_columns() if c not in pf.schema_arrow.names]
        if missing:
            raise ConvertError(f"{path}: column(s) {missing} named in the spec are missing "
                               f"(file has {pf.schema_arrow.names})")
        row = 0
        batches = pf.iter_batches(batch_size=65_536, columns=spec.used_columns())
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except (pa.ArrowInvalid, OSError) as e:
                raise ConvertError(f"{path}: row {row}: cannot read on ({e}); a truncated or "
                                   f"corrupt parquet file?") from None
            yield row, batch, None
            row += batch.num_rows
        progress.update(os.path.getsize(path))
        return
    names = spec.columns
    if spec.header:
        with open(path, "rb") as fh:
            first = fh.readline().decode("utf-8", "replace").rstrip("\r\n")
        # RFC-4180: a quoted header name may hold the delimiter or doubled quotes.
        names = next(pycsv.reader([first], delimiter=spec.delimiter, quotechar='"',
                                  doublequote=True), [])
    if not names:
        raise ConvertError(f"{path}: no column names; set \"header\": true or \"columns\"")
    missing = [c for c in spec.used_columns() if c not in names]
    if missing:
        raise ConvertError(f"{path}: column(s) {missing} named in the spec are missing "
                           f"(columns: {names})")
    yield from read_delimited(path, names, spec.delimiter, bad_lines, header=spec.header,
                              progress=progress, quoted=True)


def _as_float(col: pa.Array, fill: float) -> Tuple[np.ndarray, np.ndarray]:
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return float_column(col, empty=fill)
    values = np.asarray(pc.fill_null(col.cast(pa.float64()), fill), dtype=np.float64)
    return values, ~np.isfinite(values)


def _categorical(col: pa.Array, c: CategoricalColumn, salt: int) -> pa.Array:
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = col.cast(pa.string())
    col = pc.fill_null(col, "")
    if c.separator is None:
        missing = np.asarray(pc.equal(col, ""), dtype=bool)
        ids = bucketize(hash64(col, salt), c.num_embeddings, missing)
        return list_column(np.arange(ids.size + 1), ids)
    tokens = pc.split_pattern(col, c.separator)
    flat = pc.list_flatten(tokens)
    parent = np.asarray(pc.list_parent_indices(tokens), dtype=np.int64)
    keep = np.asarray(pc.not_equal(flat, ""), dtype=bool)
    ids = bucketize(hash64(flat.filter(pa.array(keep)), salt), c.num_embeddings)
    lengths = np.bincount(parent[keep], minlength=len(col))
    return list_column(np.concatenate(([0], np.cumsum(lengths))), ids)


def convert(inputs: Sequence[str], out: str, args: argparse.Namespace) -> Dict[str, Any]:
    inputs = check_inputs(inputs)
    spec = Spec.load(args.spec)
    schema = spec.schema()
    label_kind = spec.label.get("kind", "binary")
    bad_lines = BadLines(args.skip_bad_lines)
    with DatasetWriter(out, args.overwrite, args.rows_per_file, args.row_group_rows,
                       args.compression) as writer:
        progress = Progress(inputs, args.progress, desc="csv")
        for fi, path in enumerate(inputs):
            for first_row, batch, line_map in _batches(path, spec, bad_lines, progress):
                n = batch.num_rows
                cols: Dict[str, pa.Array] = {}
                problems: List[Tuple[np.ndarray, str]] = []
                label, bad_label = _as_float(batch.column(spec.label["column"]), np.nan)
                if label_kind == "binary":
                    bad_label |= (label != 0) & (label != 1)
                problems.append((bad_label, f"column {spec.label['column']!r} (label): expected "
                                 + ("0 or 1" if label_kind == "binary" else "a finite number")))
                for d in spec.dense:
                    x, bad = _as_float(batch.column(d.column), d.fill)
                    if d.transform == "log":
                        x = np.log1p(np.maximum(x, 0.0))
                    cols[d.name or d.column] = pa.array(x.astype(np.float32))
                    problems.append((bad, f"column {d.column!r} (dense): expected a finite "
                                          f"number or empty"))
                for j, c in enumerate(spec.categorical):
                    cols[c.name or c.column] = _categorical(batch.column(c.column), c, j)
                cols[schema.labels[0].name] = pa.array(label.astype(np.float32))
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
                table = pa.table(cols)
                rows = (np.int64(fi) << np.int64(40)) + first_row + np.arange(n, dtype=np.int64)
                to_eval = unit_interval(spec.seed, rows) < spec.eval_ratio
                writer.write("train", table.filter(pa.array(keep & ~to_eval)))
                writer.write("eval", table.filter(pa.array(keep & to_eval)))
        progress.close()
        meta = {
            "converter": "csv",
            "inputs": list(inputs),
            "args": {k: v for k, v in vars(args).items() if k not in ("inputs", "func")},
            "spec": _read_json(args.spec),
            "bad_lines_skipped": bad_lines.count,
        }
        return writer.finish(schema, meta)


def _read_json(path: str) -> Any:
    with open(path) as fh:
        return json.load(fh)
