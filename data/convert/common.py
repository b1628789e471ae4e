"""Shared pieces of the converters: stable hashing, the atomic dataset writer, text input.

* :func:`hash64` maps an Arrow string column to uint64 with FNV-1a over the UTF-8 bytes and
  a splitmix64 finaliser, vectorised over character positions (no per-row Python). It is the
  same on every machine and Python run — unlike ``hash()``, which is salted per process.
* :class:`DatasetWriter` writes ``<out>.tmp-<pid>/<split>/part-*.parquet`` with fixed-size
  row groups, then ``schema.json`` and ``meta.json``, and renames the temporary directory to
  ``out`` only when everything succeeded; a crash leaves no half dataset that looks whole.
* :class:`BadLines` counts malformed text lines against ``--skip-bad-lines N`` and raises
  :class:`ConvertError` naming the file and line when the budget is exceeded.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.io import AtomicDirectory, write_json_atomic
from data.marker import DATASET_MARKER
from data.schema import META_FILE, Schema

logger = logging.getLogger(__name__)

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


class ConvertError(ValueError):
    """Bad converter input or arguments; the message names the file, line and the fix."""


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Bijective 64-bit mixer, so ``h % n`` uses all bits of ``h`` (FNV's low bits are weak)."""
    x = x.astype(np.uint64, copy=True)
    x += np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash64(strings: pa.Array | pa.ChunkedArray, salt: int = 0) -> np.ndarray:
    """uint64 [N] stable hash of every string of ``strings`` (nulls hash like ``""``).

    ``salt`` gives independent hash functions (e.g. one per feature sharing a table).
    """
    if isinstance(strings, pa.ChunkedArray):
        strings = strings.combine_chunks() if strings.num_chunks != 1 else strings.chunk(0)
    if not (pa.types.is_string(strings.type) or pa.types.is_large_string(strings.type)
            or pa.types.is_binary(strings.type) or pa.types.is_large_binary(strings.type)):
        strings = strings.cast(pa.string())
    n = len(strings)
    off_dtype = np.int64 if pa.types.is_large_string(strings.type) or \
        pa.types.is_large_binary(strings.type) else np.int32
    bufs = strings.buffers()
    offsets = np.frombuffer(bufs[1], dtype=off_dtype)[strings.offset:strings.offset + n + 1]
    offsets = offsets.astype(np.int64)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else \
        np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    if strings.null_count:
        valid = np.asarray(strings.is_valid())
        lengths = np.where(valid, lengths, 0)
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64) ^ _splitmix64(np.array([salt], np.uint64))[0]
    if n == 0:
        return h
    max_len = int(lengths.max())
    if max_len > 0 and int(lengths.min()) == max_len and not strings.null_count:
        # Fixed width (e.g. Criteo's 8 hex chars): a 2-D view, one vector op per position.
        mat = data[offsets[0]:offsets[-1]].reshape(n, max_len).astype(np.uint64)
        for j in range(max_len):
            h = (h ^ mat[:, j]) * _FNV_PRIME
    else:
        starts = offsets[:-1]
        for j in range(max_len):
            active = np.flatnonzero(lengths > j)
            h[active] = (h[active] ^ data[starts[active] + j].astype(np.uint64)) * _FNV_PRIME
    return _splitmix64(h)


def bucketize(h: np.ndarray, num_embeddings: int, missing: Optional[np.ndarray] = None
              ) -> np.ndarray:
    """int64 ids in ``[1, num_embeddings)`` from hashes; id 0 is reserved for missing values."""
    if num_embeddings < 2:
        raise ConvertError(f"num_embeddings must be >= 2 (id 0 is 'missing'), got {num_embeddings}")
    ids = (h % np.uint64(num_embeddings - 1)).astype(np.int64) + 1
    if missing is not None:
        ids[missing] = 0
    return ids


def unit_interval(seed: int, row_ids: np.ndarray) -> np.ndarray:
    """float64 [N] in [0, 1) drawn from (seed, row id): the same row always gets the same
    draw, whatever the chunking — used to split rows into train/eval/test by ratio."""
    x = _splitmix64(row_ids.astype(np.uint64) ^ _splitmix64(np.array([seed], np.uint64))[0])
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def list_column(offsets: np.ndarray, values: np.ndarray) -> pa.Array:
    """``list<int64>`` column from row offsets [N+1] and flat values (64-bit offsets when
    the values outgrow int32)."""
    values = pa.array(np.ascontiguousarray(values, dtype=np.int64))
    if offsets[-1] >= 2 ** 31:
        return pa.LargeListArray.from_arrays(pa.array(offsets.astype(np.int64)), values)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)


def single_id_column(ids: np.ndarray) -> pa.Array:
    """``list<int64>`` column with exactly one id per row."""
    return list_column(np.arange(ids.size + 1, dtype=np.int64), ids)


# Automatic row groups: a split is dealt to ranks by row group, so a small split needs at
# least this many (even shares for 1, 2, 4, 8 ranks; at most one group apart for 3, 5, 6, 7).
AUTO_RANKS = 8
AUTO_MAX_GROUP_ROWS = 65_536


def auto_row_group_rows(rows: int) -> int:
    """Row-group size for a split of ``rows`` rows: ``AUTO_RANKS`` groups (or a multiple)
    of at most ``AUTO_MAX_GROUP_ROWS`` rows each."""
    groups = AUTO_RANKS * max(1, -(-rows // (AUTO_RANKS * AUTO_MAX_GROUP_ROWS)))
    return max(1, -(-rows // groups))


class ShardWriter:
    """Appends Arrow tables to ``<dir>/part-NNNNN.parquet`` files with row groups of exactly
    ``row_group_rows`` rows (the last one may be shorter) and at most ``rows_per_file`` rows
    per file. Row groups are the unit the reader deals to ranks, so fixed sizes keep ranks
    balanced whatever chunk sizes the converter produced.

    ``row_group_rows=None`` chooses the size from the split's row count
    (:func:`auto_row_group_rows`): rows are held until ``AUTO_RANKS * AUTO_MAX_GROUP_ROWS``
    have arrived (then groups of ``AUTO_MAX_GROUP_ROWS`` already give every rank a share) or
    the split ends."""

    def __init__(self, directory: str, rows_per_file: int, row_group_rows: Optional[int],
                 compression: str = "lz4") -> None:
        os.makedirs(directory, exist_ok=True)
        self.compression = compression
        self.directory = directory
        self.auto = row_group_rows is None
        self.row_group_rows = AUTO_MAX_GROUP_ROWS if row_group_rows is None else row_group_rows
        self.rows_per_file = rows_per_file
        self.files: List[str] = []
        self.rows = 0
        self._writer: Optional[pq.ParquetWriter] = None
        self._file_rows = 0
        self._pending: List[pa.Table] = []
        self._pending_rows = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self.auto and self.rows == 0 and \
                self._pending_rows < AUTO_RANKS * AUTO_MAX_GROUP_ROWS:
            return
        if self._pending_rows >= self.row_group_rows:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self._pending:
            return
        if final and self.auto and self.rows == 0:
            self.row_group_rows = auto_row_group_rows(self._pending_rows)
        table = pa.concat_tables(self._pending).combine_chunks()
        self._pending, self._pending_rows = [], 0
        start = 0
        while table.num_rows - start >= self.row_group_rows or (final and start < table.num_rows):
            n = min(self.row_group_rows, table.num_rows - start)
            self._write_group(table.slice(start, n))
            start += n
        if start < table.num_rows:
            rest = table.slice(start)
            self._pending, self._pending_rows = [rest], rest.num_rows

    def _write_group(self, group: pa.Table) -> None:
        if self._writer is None or (self._file_rows + group.num_rows
                                    > max(self.rows_per_file, self.row_group_rows)):
            self._close_file()
            name = f"part-{len(self.files):05d}.parquet"
            self.files.append(name)
            self._writer = pq.ParquetWriter(os.path.join(self.directory, name), group.schema,
                                            compression=self.compression)
        self._writer.write_table(group, row_group_size=group.num_rows)
        self._file_rows += group.num_rows
        self.rows += group.num_rows

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._file_rows = 0

    def write_file(self, table: pa.Table) -> str:
        """``table`` as a file of its own, after anything pending: row groups of
        ``row_group_rows`` from its first row (the last may be shorter). Generators that draw
        one part at a time use it, so each part keeps its own row groups. Returns the file
        name (the last one, if ``table`` outgrew ``rows_per_file``)."""
        self._flush(final=True)
        self._close_file()
        for start in range(0, table.num_rows, self.row_group_rows):
            self._write_group(table.slice(start, self.row_group_rows))
        self._close_file()
        return self.files[-1]

    def close(self) -> None:
        self._flush(final=True)
        self._close_file()


class DatasetWriter:
    """A dataset directory built in ``<out>.tmp-<pid>`` and renamed to ``out`` on success.

    Example::

        with DatasetWriter("datasets/x", overwrite=False) as w:
            w.write("train", table)      # any number of tables, any sizes
            w.finish(schema, {"converter": "criteo", "args": {...}})
    """

    def __init__(self, out: str, overwrite: bool = False, rows_per_file: int = 1_000_000,
                 row_group_rows: Optional[int] = 65_536, compression: str = "lz4") -> None:
        if (row_group_rows is not None and row_group_rows <= 0) or rows_per_file <= 0:
            raise ConvertError("--row-group-rows and --rows-per-file must be > 0")
        try:
            self._dir = AtomicDirectory(out, overwrite, marker=DATASET_MARKER, what="dataset")
        except FileExistsError as e:
            raise ConvertError(str(e)) from None
        self.out = self._dir.out
        self.tmp = self._dir.path
        self.rows_per_file = rows_per_file
        self.row_group_rows = row_group_rows
        # lz4 decodes about twice as fast as snappy at the same size (measured with
        # bench.loader's Criteo-like data), and decode is the loader's largest cost.
        self.compression = compression
        self.splits: Dict[str, ShardWriter] = {}
        self.t0 = time.time()

    def __enter__(self) -> "DatasetWriter":
        self._dir.__enter__()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        for w in self.splits.values():
            if w._writer is not None:
                w._writer.close()
        self._dir.__exit__(exc_type, exc, tb)

    def split(self, name: str) -> ShardWriter:
        if name not in self.splits:
            self.splits[name] = ShardWriter(os.path.join(self.tmp, name), self.rows_per_file,
                                            self.row_group_rows, self.compression)
        return self.splits[name]

    def write(self, split: str, table: pa.Table) -> None:
        """Append ``table`` to ``split`` (splits without rows are never created)."""
        if table.num_rows:
            self.split(split).write(table)

    def finish(self, schema: Schema, meta: Dict[str, Any]) -> Dict[str, Any]:
        """Close all shards, write schema.json + meta.json, rename into place; returns meta."""
        for w in self.splits.values():
            w.close()
        empty = [name for name, w in self.splits.items() if w.rows == 0]
        if empty or not self.splits:
            raise ConvertError(f"split(s) {empty or ['train']} received no rows; check the "
                               f"inputs and the split options (--eval-ratio, --eval-files)")
        meta = dict(meta)
        meta["rows"] = {name: w.rows for name, w in self.splits.items()}
        meta["files"] = {name: [f"{name}/{f}" for f in w.files] for name, w in self.splits.items()}
        sizes = {name: w.row_group_rows for name, w in self.splits.items()}
        # One number when every split uses the same size (as before); per split otherwise.
        meta["row_group_rows"] = (self.row_group_rows if self.row_group_rows is not None
                                  and len(set(sizes.values())) <= 1 else sizes)
        meta["compression"] = self.compression
        meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        meta["seconds"] = round(time.time() - self.t0, 3)
        schema.save(self.tmp)
        write_json_atomic(os.path.join(self.tmp, META_FILE), meta)
        self._dir.tool = str(meta.get("converter") or meta.get("generator") or "shardrec")
        self._dir.commit()
        logger.info("wrote %s: %s", self.out,
                    ", ".join(f"{k} {v} rows" for k, v in meta["rows"].items()))
        return meta


class BadLines:
    """Budget of malformed lines (``--skip-bad-lines N``); raises once it is exceeded."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.examples: List[str] = []

    def add(self, path: str, line: Optional[int], problem: str, text: str = "") -> None:
        where = f"{path}:{line}" if line is not None else path
        msg = f"{where}: {problem}" + (f" (line: {text[:120]!r})" if text else "")
        self.count += 1
        if self.count > self.limit:
            hint = ("fix the line or pass --skip-bad-lines N to drop up to N malformed lines"
                    if self.limit == 0 else
                    f"more than --skip-bad-lines {self.limit} malformed lines")
            raise ConvertError(f"{msg}; {hint}")
        if len(self.examples) < 5:
            self.examples.append(msg)
        logger.warning("skipping malformed line %s", msg)


class Progress:
    """Bytes-read progress over all input files on stderr (tqdm when interactive)."""

    def __init__(self, paths: Sequence[str], enabled: bool = True, desc: str = "") -> None:
        total = sum(os.path.getsize(p) for p in paths)
        self.bar = None
        self._last_log = 0.0
        self.total = total
        self.done = 0
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr,
                            disable=not sys.stderr.isatty())

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if not sys.stderr.isatty() and time.time() - self._last_log > 10:
                self._last_log = time.time()
                logger.info("%.1f%% of %.1f MB read", 100.0 * self.done / max(self.total, 1),
                            self.total / 1e6)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def parse_int_list(text: str, count: int, what: str) -> List[int]:
    """``"1000"`` → ``[1000] * count``; ``"10,20,..."`` must have ``count`` entries."""
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ConvertError(f"{what}: expected an integer or {count} comma-separated integers, "
                           f"got {text!r}") from None
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise ConvertError(f"{what}: expected 1 or {count} values, got {len(values)}")
    return values


# fbgemm's embedding kernels need table widths that are multiples of 4.
DIM_MULTIPLE = 4
DEFAULT_SEQ_EMBEDDING_DIM = 48  # HSTU/SASRec use 50 on ML-1M; the nearest width fbgemm takes


def check_embedding_dim(dim: int, what: str = "--embedding-dim") -> None:
    if dim <= 0 or dim % DIM_MULTIPLE:
        near = max(DIM_MULTIPLE, -(-dim // DIM_MULTIPLE) * DIM_MULTIPLE)
        raise ConvertError(f"{what} {dim}: embedding widths must be positive multiples of "
                           f"{DIM_MULTIPLE} (fbgemm's embedding kernels need it); use {near}")


def check_inputs(paths: Iterable[str]) -> List[str]:
    out = []
    for p in paths:
        if not os.path.isfile(p):
            raise ConvertError(f"input {p} does not exist or is not a file")
        out.append(p)
    if not out:
        raise ConvertError("no input files given")
    return out


def iter_with_rows(it: Iterator[pa.RecordBatch]) -> Iterator[Tuple[int, pa.RecordBatch]]:
    """(index of the batch's first row within the file, batch) pairs."""
    row = 0
    for batch in it:
        yield row, batch
        row += batch.num_rows
