"""Raw rows → a dataset's feature columns, with the state fitted on the train split.

A :class:`Preprocessor` is everything needed to turn raw table rows (CSV/TSV/parquet) into
the parquet columns a dataset holds, so that the converter, ``trainer.predict`` and serving
apply exactly the same preprocessing. Its JSON-serialisable :meth:`Preprocessor.state` is
stored in ``meta.json["preprocess"]``.

Columns of a transformed table (``N`` rows):

* dense features: ``float32 [N]`` each, after the column's transform steps;
* sparse features: ``list<int64>`` ids in ``[0, num_embeddings)`` (id 0 = missing for
  single-valued columns; multi-valued columns drop empty tokens, so a row may have no ids);
  a ``bucketize``d dense column becomes a single-id sparse feature;
* the label (``float32 [N]``) when the raw rows have the label column;
* passthrough columns (``string [N]``, e.g. request ids), carried beside the features.

Dense transform steps (``"transform"``: one name or a list applied in order):
``none``; ``log`` (``log1p(max(x, 0))``, the historical default); ``log1p`` (``log1p(x)``,
``x > -1`` required); ``clip`` (to the spec's ``"min"``/``"max"``); ``standardize``
(``(x - mean) / std`` with the train split's mean/std); ``bucketize`` (``"buckets"`` quantile
bins with boundaries from the train split; id 0 = value was empty, ids ``1..buckets``).
``standardize`` and ``bucketize`` need statistics and must come last.

Categorical columns: ``"num_embeddings": N`` hashes each value's text (FNV-1a salted by the
column's position in the spec) into ``[1, N)``; ``"min_count": k`` instead builds a
vocabulary of the train split's values seen at least ``k`` times (id 0 = missing, id 1 = out
of vocabulary, then the vocabulary by descending count, ties by value).

Example::

    pre = Preprocessor.from_spec(spec_dict)       # unfitted: standardize/bucketize/vocab need fit
    fitter = pre.fitter()
    for raw in pre.read_raw("train.csv"):         # pa.Table of raw string columns
        fitter.update(raw)                         # (only the train split's rows)
    pre = fitter.finish()
    table = pre.transform(raw)                     # pa.Table: dense f32, sparse list<int64>, ...
    meta["preprocess"] = pre.state()
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections import Counter
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data.convert.common import (BadLines, ConvertError, bucketize, hash64, list_column,
                                 unit_interval)
from data.convert.text import LineMap, float_column, read_delimited
from data.schema import META_FILE, FeatureSpec, LabelSpec, Schema

STATE_VERSION = 1
DENSE_STEPS = ("none", "log", "log1p", "clip", "standardize", "bucketize")
STAT_STEPS = ("standardize", "bucketize")
LABEL_KINDS = ("binary", "regression")
DENSE_KEYS = ("column", "name", "transform", "fill", "min", "max", "buckets", "embedding_dim",
              "table")
CATEGORICAL_KEYS = ("column", "name", "num_embeddings", "min_count", "max_size",
                    "embedding_dim", "separator", "pooling", "table")
SPEC_KEYS = ("label", "dense", "categorical", "passthrough", "delimiter", "header", "columns",
             "valid_ratio", "test_ratio", "eval_ratio", "split_by", "seed")
# Bucketize boundaries are quantiles of at most this many train values (a deterministic
# bottom-k sample by a hash of the row; exact below it).
QUANTILE_SAMPLE = 1 << 20
DEFAULT_EMBEDDING_DIM = 16


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _as_float(col: pa.Array | pa.ChunkedArray, fill: float) -> Tuple[np.ndarray, np.ndarray]:
    """(float64 values [N], bad mask [N]) of a raw column; empty/null cells become ``fill``."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if _is_text(col.type):
        return float_column(pc.fill_null(col, ""), empty=fill)
    values = np.asarray(pc.fill_null(col.cast(pa.float64()), fill), dtype=np.float64)
    return values, ~np.isfinite(values)


def _as_text(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if not _is_text(col.type):
        col = col.cast(pa.string())
    return pc.fill_null(col, "")


def _steps(transform: Any, where: str) -> List[str]:
    steps = [transform] if isinstance(transform, str) else list(transform or ["none"])
    bad = [s for s in steps if s not in DENSE_STEPS]
    if bad:
        raise ConvertError(f"{where}: transform {bad} not one of {list(DENSE_STEPS)}")
    stat = [i for i, s in enumerate(steps) if s in STAT_STEPS]
    if stat and (len(stat) > 1 or stat[0] != len(steps) - 1):
        raise ConvertError(f"{where}: 'standardize'/'bucketize' must be the last transform "
                           f"step and appear once, got {steps}")
    return [s for s in steps if s != "none"]


class Preprocessor:
    """Raw table → dataset columns (see the module docstring). Build with :meth:`from_spec`
    (then fit), :meth:`from_state` or :meth:`from_dataset`."""

    def __init__(self, state: Dict[str, Any]) -> None:
        self._state = state
        self.label: Optional[Dict[str, Any]] = state.get("label")
        self.dense: List[Dict[str, Any]] = state["dense"]
        self.categorical: List[Dict[str, Any]] = state["categorical"]
        self.passthrough: List[str] = list(state.get("passthrough", []))
        self.delimiter: str = state.get("delimiter", ",")
        self.header: bool = bool(state.get("header", True))
        self.columns: Optional[List[str]] = state.get("columns")

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: Dict[str, Any], where: str = "spec",
                  require_label: bool = True) -> "Preprocessor":
        """Unfitted preprocessor from a converter spec dict (validated; errors name the key)."""
        if not isinstance(spec, dict):
            raise ConvertError(f"{where}: expected a JSON object")
        unknown = sorted(set(spec) - set(SPEC_KEYS))
        if unknown:
            raise ConvertError(f"{where}: unknown key(s) {unknown}; valid keys: {list(SPEC_KEYS)}")
        label = spec.get("label")
        if label is not None:
            if isinstance(label, str):
                label = {"column": label}
            if not isinstance(label, dict) or "column" not in label:
                raise ConvertError(f"{where}: label needs a 'column' (e.g. "
                                   f"{{\"column\": \"clicked\", \"kind\": \"binary\"}})")
            bad = sorted(set(label) - {"column", "name", "kind"})
            if bad:
                raise ConvertError(f"{where}: label: unknown key(s) {bad}; valid: column, "
                                   f"name, kind")
            label = {"column": label["column"], "name": label.get("name", label["column"]),
                     "kind": label.get("kind", "binary")}
            if label["kind"] not in LABEL_KINDS:
                raise ConvertError(f"{where}: label kind {label['kind']!r} not one of "
                                   f"{list(LABEL_KINDS)}")
        elif require_label:
            raise ConvertError(f"{where}: no 'label'; add {{\"label\": {{\"column\": ...}}}} "
                               f"or pass --no-label to convert rows for scoring only")
        dense = []
        for i, d in enumerate(spec.get("dense", [])):
            w = f"{where}: dense[{i}]"
            d = {"column": d} if isinstance(d, str) else dict(d)
            bad = sorted(set(d) - set(DENSE_KEYS))
            if bad or "column" not in d:
                raise ConvertError(f"{w}: unknown key(s) {bad} or no 'column'; valid keys: "
                                   f"{list(DENSE_KEYS)}")
            steps = _steps(d.get("transform", "none"), f"{w} ({d['column']!r})")
            entry: Dict[str, Any] = {"column": d["column"], "name": d.get("name", d["column"]),
                                     "steps": steps, "fill": float(d.get("fill", 0.0))}
            if "clip" in steps:
                if "min" not in d and "max" not in d:
                    raise ConvertError(f"{w} ({d['column']!r}): transform 'clip' needs 'min' "
                                       f"and/or 'max'")
                entry["min"] = None if d.get("min") is None else float(d["min"])
                entry["max"] = None if d.get("max") is None else float(d["max"])
            if steps and steps[-1] == "bucketize":
                buckets = int(d.get("buckets", 10))
                if buckets < 2:
                    raise ConvertError(f"{w} ({d['column']!r}): 'buckets' must be >= 2")
                entry["buckets"] = buckets
                entry["embedding_dim"] = int(d.get("embedding_dim", DEFAULT_EMBEDDING_DIM))
                entry["table"] = d.get("table")
            dense.append(entry)
        cats = []
        for i, c in enumerate(spec.get("categorical", [])):
            w = f"{where}: categorical[{i}]"
            c = {"column": c} if isinstance(c, str) else dict(c)
            bad = sorted(set(c) - set(CATEGORICAL_KEYS))
            if bad or "column" not in c:
                raise ConvertError(f"{w}: unknown key(s) {bad} or no 'column'; valid keys: "
                                   f"{list(CATEGORICAL_KEYS)}")
            has_n, has_min = "num_embeddings" in c, "min_count" in c
            if has_n == has_min:
                raise ConvertError(f"{w} ({c['column']!r}): give exactly one of "
                                   f"'num_embeddings' (hash buckets) or 'min_count' "
                                   f"(vocabulary of values seen >= min_count times in train)")
            entry = {"column": c["column"], "name": c.get("name", c["column"]), "salt": i,
                     "embedding_dim": int(c.get("embedding_dim", DEFAULT_EMBEDDING_DIM)),
                     "separator": c.get("separator"), "pooling": c.get("pooling", "sum"),
                     "table": c.get("table")}
            if has_n:
                entry["num_embeddings"] = int(c["num_embeddings"])
                if entry["num_embeddings"] < 2:
                    raise ConvertError(f"{w} ({c['column']!r}): num_embeddings must be >= 2 "
                                       f"(id 0 is 'missing')")
            else:
                entry["min_count"] = int(c["min_count"])
                entry["max_size"] = None if c.get("max_size") is None else int(c["max_size"])
                if entry["min_count"] < 1:
                    raise ConvertError(f"{w} ({c['column']!r}): min_count must be >= 1")
            cats.append(entry)
        passthrough = spec.get("passthrough", [])
        if isinstance(passthrough, str) or not all(isinstance(p, str) for p in passthrough):
            raise ConvertError(f"{where}: passthrough must be a list of column names")
        names = [d["name"] for d in dense] + [c["name"] for c in cats] + list(passthrough)
        if label is not None:
            names.append(label["name"])
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConvertError(f"{where}: output column name(s) {dup} used twice (features, "
                               f"label and passthrough need distinct names; set 'name')")
        state = {"version": STATE_VERSION, "label": label, "dense": dense, "categorical": cats,
                 "passthrough": list(passthrough), "delimiter": spec.get("delimiter", ","),
                 "header": bool(spec.get("header", True)), "columns": spec.get("columns"),
                 "fitted": not any(_needs_fit(d) for d in dense + cats)}
        return cls(state)

    @classmethod
    def from_state(cls, state: Dict[str, Any]) -> "Preprocessor":
        """From :meth:`state` output (e.g. ``meta.json["preprocess"]``)."""
        version = state.get("version") if isinstance(state, dict) else None
        if version != STATE_VERSION:
            raise ConvertError(f"preprocessing state version {version} is not "
                               f"{STATE_VERSION}; reconvert the dataset")
        return cls(copy.deepcopy(state))

    @classmethod
    def from_dataset(cls, dataset_dir: str) -> "Preprocessor":
        """The preprocessor a dataset was converted with (``meta.json["preprocess"]``)."""
        path = os.path.join(dataset_dir, META_FILE)
        try:
            with open(path) as fh:
                meta = json.load(fh)
        except (OSError, json.JSONDecodeError) as e:
            raise ConvertError(f"{path}: cannot read ({e})") from None
        if "preprocess" not in meta:
            raise ConvertError(f"{path}: no 'preprocess' entry — only datasets made by "
                               f"'python -m data.convert csv' carry one; reconvert with it")
        return cls.from_state(meta["preprocess"])

    def state(self) -> Dict[str, Any]:
        """JSON-serialisable state (stored in ``meta.json["preprocess"]``)."""
        return copy.deepcopy(self._state)

    # -- description ----------------------------------------------------------------------------
    @property
    def fitted(self) -> bool:
        return bool(self._state.get("fitted"))

    def without_label(self) -> "Preprocessor":
        state = self.state()
        state["label"] = None
        return Preprocessor(state)

    def raw_columns(self) -> List[str]:
        """Raw input columns needed: features, then the label and passthrough (optional for
        :meth:`transform`)."""
        cols = [d["column"] for d in self.dense] + [c["column"] for c in self.categorical]
        if self.label is not None:
            cols.append(self.label["column"])
        cols += self.passthrough
        return list(dict.fromkeys(cols))

    def feature_columns(self) -> List[str]:
        return list(dict.fromkeys([d["column"] for d in self.dense]
                                  + [c["column"] for c in self.categorical]))

    def schema(self) -> Schema:
        """Feature schema of the transformed columns (label only when the state has one)."""
        if not self.fitted:
            raise ConvertError("preprocessor is not fitted (standardize/bucketize/min_count "
                               "need the train split's statistics)")
        feats = [FeatureSpec(d["name"], "dense") for d in self.dense
                 if not d["steps"] or d["steps"][-1] != "bucketize"]
        for c in self.categorical:
            feats.append(FeatureSpec(c["name"], "sparse", table=c.get("table"),
                                     num_embeddings=_num_embeddings(c),
                                     embedding_dim=c["embedding_dim"], pooling=c["pooling"]))
        for d in self.dense:
            if d["steps"] and d["steps"][-1] == "bucketize":
                feats.append(FeatureSpec(d["name"], "sparse", table=d.get("table"),
                                         num_embeddings=len(d["boundaries"]) + 2,
                                         embedding_dim=d["embedding_dim"]))
        labels = [] if self.label is None else [LabelSpec(self.label["name"], self.label["kind"])]
        return Schema(features=feats, labels=labels)

    # -- reading --------------------------------------------------------------------------------
    def read_batches(self, path: str, bad_lines: BadLines, progress: Any = None,
                     columns: Optional[Sequence[str]] = None,
                     required: Optional[Sequence[str]] = None
                     ) -> Iterator[Tuple[int, pa.RecordBatch, Optional[LineMap]]]:
        """``(first row, batch, line map or None)`` over ``path``; text files are read as
        string columns, parquet files as stored. ``required`` columns must be present
        (default: the features); the batches hold ``columns`` that exist (default: all
        :meth:`raw_columns`)."""
        wanted = list(columns) if columns is not None else self.raw_columns()
        required = list(required) if required is not None else self.feature_columns()
        if path.endswith(".parquet"):
            try:
                pf = pq.ParquetFile(path)
            except (pa.ArrowInvalid, OSError) as e:
                raise ConvertError(f"{path}: not a readable parquet file ({e})") from None
            names = pf.schema_arrow.names
            missing = [c for c in required if c not in names]
            if missing:
                raise ConvertError(f"{path}: column(s) {missing} named in the spec are missing "
                                   f"(file has {names})")
            row = 0
            for batch in pf.iter_batches(batch_size=65_536,
                                         columns=[c for c in wanted if c in names]):
                yield row, batch, None
                row += batch.num_rows
            if progress is not None:
                progress.update(os.path.getsize(path))
            return
        names = self.columns
        if self.header:
            with open(path, "rb") as fh:
                first = fh.readline().decode("utf-8", "replace").rstrip("\r\n")
            names = [n.strip('"') for n in first.split(self.delimiter)]
        if not names:
            raise ConvertError(f"{path}: no column names; set \"header\": true or \"columns\"")
        missing = [c for c in required if c not in names]
        if missing:
            raise ConvertError(f"{path}: column(s) {missing} named in the spec are missing "
                               f"(columns: {names})")
        for row, batch, line_map in read_delimited(path, names, self.delimiter, bad_lines,
                                                   header=self.header, progress=progress):
            keep = [c for c in wanted if c in names]
            yield row, batch.select(keep) if hasattr(batch, "select") else \
                pa.RecordBatch.from_arrays([batch.column(c) for c in keep], names=keep), line_map

    def read_raw(self, path: str, chunk_rows: int = 65536) -> Iterator[pa.Table]:
        """Raw tables of at most ``chunk_rows`` rows from a CSV/TSV/parquet file (bounded
        memory); a malformed line raises :class:`ConvertError` naming ``path:line``."""
        for _, batch, _ in self.read_batches(path, BadLines(0)):
            table = pa.Table.from_batches([batch])
            for start in range(0, table.num_rows, chunk_rows):
                yield table.slice(start, chunk_rows)

    # -- fitting and transforming ---------------------------------------------------------------
    def fitter(self) -> "Fitter":
        return Fitter(self)

    def transform(self, raw: pa.Table | pa.RecordBatch) -> pa.Table:
        """Dataset columns of ``raw`` (see the module docstring). The label and passthrough
        columns are produced when present in ``raw``. A bad value raises naming the column
        and the row (0-based within ``raw``)."""
        table, problems = self.transform_checked(raw)
        for bad, msg in problems:
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ConvertError(f"row {i}: {msg}")
        return table

    def transform_checked(self, raw: pa.Table | pa.RecordBatch
                          ) -> Tuple[pa.Table, List[Tuple[np.ndarray, str]]]:
        """(columns, [(bad-row mask, problem)]) — the converter drops/report bad rows itself."""
        if not self.fitted:
            raise ConvertError("preprocessor is not fitted (standardize/bucketize/min_count "
                               "need the train split's statistics)")
        names = raw.schema.names
        missing = [c for c in self.feature_columns() if c not in names]
        if missing:
            raise ConvertError(f"raw rows lack column(s) {missing} (have {names})")
        cols: Dict[str, pa.Array] = {}
        problems: List[Tuple[np.ndarray, str]] = []
        bucketized: Dict[str, pa.Array] = {}
        for d in self.dense:
            x, bad = _as_float(raw.column(d["column"]), d["fill"])
            empty = _empty_mask(raw.column(d["column"]))
            steps = d["steps"]
            if "log1p" in steps:
                bad = bad | (x <= -1.0)
            x = _apply_steps(x, d)
            problems.append((bad, f"column {d['column']!r} (dense): expected a finite number "
                                  f"or empty" + (" > -1 (log1p)" if "log1p" in steps else "")))
            if steps and steps[-1] == "bucketize":
                ids = np.searchsorted(np.asarray(d["boundaries"], np.float64), x,
                                      side="right").astype(np.int64) + 1
                ids[empty] = 0
                bucketized[d["name"]] = list_column(np.arange(ids.size + 1), ids)
            else:
                cols[d["name"]] = pa.array(x.astype(np.float32))
        for c in self.categorical:
            cols[c["name"]] = _categorical(raw.column(c["column"]), c)
        cols.update(bucketized)
        if self.label is not None and self.label["column"] in names:
            y, bad = _as_float(raw.column(self.label["column"]), np.nan)
            if self.label["kind"] == "binary":
                bad = bad | ((y != 0) & (y != 1))
            problems.append((bad, f"column {self.label['column']!r} (label): expected "
                             + ("0 or 1" if self.label["kind"] == "binary" else
                                "a finite number")))
            cols[self.label["name"]] = pa.array(np.where(bad, 0.0, y).astype(np.float32))
        for p in self.passthrough:
            if p in names:
                cols[p] = _as_text(raw.column(p))
        return pa.table(cols), problems


def _needs_fit(entry: Dict[str, Any]) -> bool:
    if "steps" in entry:
        return bool(entry["steps"]) and entry["steps"][-1] in STAT_STEPS
    return "min_count" in entry


def _num_embeddings(c: Dict[str, Any]) -> int:
    if "num_embeddings" in c:
        return int(c["num_embeddings"])
    return len(c["vocab"]) + 2


def _empty_mask(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if _is_text(col.type):
        return np.asarray(pc.equal(pc.utf8_trim_whitespace(pc.fill_null(col, "")), ""),
                          dtype=bool)
    return np.asarray(col.is_null(), dtype=bool)


def _apply_steps(x: np.ndarray, d: Dict[str, Any], upto_stat: bool = False) -> np.ndarray:
    """The transform steps of dense entry ``d`` on float64 values (the statistic step only
    when fitted and not ``upto_stat``; bucketize is applied by the caller)."""
    for s in d["steps"]:
        if s == "log":
            x = np.log1p(np.maximum(x, 0.0))
        elif s == "log1p":
            x = np.log1p(np.maximum(x, -1.0 + 1e-12))  # bad rows (<= -1) are reported
        elif s == "clip":
            x = np.clip(x, -np.inf if d["min"] is None else d["min"],
                        np.inf if d["max"] is None else d["max"])
        elif s == "standardize" and not upto_stat:
            x = (x - d["mean"]) / d["std"]
    return x


def _categorical(col: pa.Array | pa.ChunkedArray, c: Dict[str, Any]) -> pa.Array:
    col = _as_text(col)
    sep = c.get("separator")
    if sep is None:
        missing = np.asarray(pc.equal(col, ""), dtype=bool)
        ids = _ids(col, c, missing)
        return list_column(np.arange(ids.size + 1), ids)
    tokens = pc.split_pattern(col, sep)
    flat = pc.list_flatten(tokens)
    parent = np.asarray(pc.list_parent_indices(tokens), dtype=np.int64)
    keep = np.asarray(pc.not_equal(flat, ""), dtype=bool)
    ids = _ids(flat.filter(pa.array(keep)), c, None)
    lengths = np.bincount(parent[keep], minlength=len(col))
    return list_column(np.concatenate(([0], np.cumsum(lengths))), ids)


def _ids(values: pa.Array, c: Dict[str, Any], missing: Optional[np.ndarray]) -> np.ndarray:
    if "num_embeddings" in c:
        return bucketize(hash64(values, c["salt"]), c["num_embeddings"], missing)
    vocab = pa.array(c["vocab"], pa.string())
    idx = pc.index_in(values, value_set=vocab)
    ids = np.asarray(pc.fill_null(idx, -1), dtype=np.int64) + 2  # unseen → 1
    if missing is not None:
        ids[missing] = 0
    return ids


class Fitter:
    """Accumulates train-split statistics (mean/std, quantiles, value counts) over raw
    tables, then :meth:`finish` returns the fitted :class:`Preprocessor`."""

    def __init__(self, pre: Preprocessor) -> None:
        self.pre = pre
        self.sums: Dict[int, np.ndarray] = {}  # dense idx → [count, sum, sum of squares]
        self.samples: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}  # idx → (keys, values)
        self.threshold: Dict[int, int] = {}
        self.counts: Dict[int, Counter] = {}
        self.rows = 0

    def update(self, raw: pa.Table | pa.RecordBatch, row_ids: Optional[np.ndarray] = None
               ) -> None:
        """Add train rows; ``row_ids`` (int64 [N], global row numbers) seed the quantile
        sample so it does not depend on chunking."""
        n = raw.num_rows
        if row_ids is None:
            row_ids = self.rows + np.arange(n, dtype=np.int64)
        self.rows += n
        for i, d in enumerate(self.pre.dense):
            if not _needs_fit(d):
                continue
            x, bad = _as_float(raw.column(d["column"]), d["fill"])
            x = _apply_steps(x, d, upto_stat=True)
            ok = ~bad & np.isfinite(x)
            if d["steps"][-1] == "standardize":
                acc = self.sums.setdefault(i, np.zeros(3))
                xs = x[ok]
                acc += (xs.size, xs.sum(), np.square(xs).sum())
            else:
                ok &= ~_empty_mask(raw.column(d["column"]))
                keys = unit_interval(1_000_003 + i, row_ids[ok])
                keys_old, vals_old = self.samples.get(i, (np.zeros(0), np.zeros(0)))
                keys = np.concatenate([keys_old, keys])
                vals = np.concatenate([vals_old, x[ok]])
                if keys.size > QUANTILE_SAMPLE:  # keep the bottom-k keys: a uniform sample
                    sel = np.argpartition(keys, QUANTILE_SAMPLE)[:QUANTILE_SAMPLE]
                    keys, vals = keys[sel], vals[sel]
                self.samples[i] = (keys, vals)
        for j, c in enumerate(self.pre.categorical):
            if "min_count" not in c:
                continue
            col = _as_text(raw.column(c["column"]))
            if c.get("separator") is not None:
                col = pc.list_flatten(pc.split_pattern(col, c["separator"]))
            col = col.filter(pc.not_equal(col, ""))
            vc = pc.value_counts(col)
            counter = self.counts.setdefault(j, Counter())
            for v, k in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()):
                counter[v] += k

    def finish(self) -> Preprocessor:
        state = self.pre.state()
        for i, d in enumerate(state["dense"]):
            if not _needs_fit(d):
                continue
            where = f"dense column {d['column']!r}"
            if d["steps"][-1] == "standardize":
                cnt, s, ss = self.sums.get(i, np.zeros(3))
                if cnt == 0:
                    raise ConvertError(f"{where}: no valid train value to standardize with")
                mean = s / cnt
                var = max(ss / cnt - mean * mean, 0.0)
                std = math.sqrt(var)
                # A constant column: std 0 would divide by zero; 1 keeps it at 0 after centring.
                d["mean"], d["std"] = float(mean), float(std if std > 1e-12 else 1.0)
            else:
                _, vals = self.samples.get(i, (np.zeros(0), np.zeros(0)))
                if vals.size == 0:
                    raise ConvertError(f"{where}: no non-empty train value to bucketize")
                qs = np.quantile(vals, np.arange(1, d["buckets"]) / d["buckets"])
                # Ties (e.g. many zeros) collapse quantiles; unique boundaries, fewer buckets.
                d["boundaries"] = [float(b) for b in np.unique(qs)]
        for j, c in enumerate(state["categorical"]):
            if "min_count" not in c:
                continue
            counter = self.counts.get(j, Counter())
            kept = sorted(((k, v) for v, k in counter.items() if k >= c["min_count"]),
                          key=lambda kv: (-kv[0], kv[1]))
            if c.get("max_size") is not None:
                kept = kept[:max(c["max_size"] - 2, 0)]
            c["vocab"] = [v for _, v in kept]
        state["fitted"] = True
        return Preprocessor(state)
