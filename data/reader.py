"""Parquet → ``Batch`` reader, sharded across ranks.

Row groups of all parquet files of a split are dealt round-robin to ranks (after a seeded
shuffle of their order when ``shuffle``), so ranks read disjoint rows. Every rank computes
the batch count of every rank from the parquet footers alone and yields the minimum, so all
ranks run the same number of steps — a rank with one batch more would hang the collectives.

Batches are built with vectorised numpy from Arrow list offsets: a KJT's ``lengths`` are the
differences of the offsets and its ``values`` one slice of the flat child array per feature.
A background thread decodes and builds the next batches while the trainer computes.

Example::

    reader = ParquetReader("datasets/synthetic_ctr_demo", "train", batch_size=4096,
                           rank=0, world_size=2, shuffle=True, seed=0)
    for batch in reader:       # Batch(dense [4096, 4], sparse KJT, labels [4096])
        ...
    reader.set_epoch(1)        # new row-group order and in-group permutation
"""

from __future__ import annotations

import glob
import os
import queue
import threading
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data.batch import Batch
from data.schema import Schema


class DataError(ValueError):
    """Bad dataset input; the message names the file/column and what was expected."""


@dataclass(frozen=True)
class RowGroup:
    path: str
    index: int
    num_rows: int
    first_row: int  # global id of the row group's first row within the split


def split_files(dataset_dir: str, split: str) -> List[str]:
    files = sorted(glob.glob(os.path.join(dataset_dir, split, "*.parquet")))
    if not files:
        raise DataError(
            f"no parquet files in {os.path.join(dataset_dir, split)}; a dataset directory "
            f"holds <split>/*.parquet (splits: train, eval) beside schema.json"
        )
    return files


def list_row_groups(files: Sequence[str], schema: Schema) -> List[RowGroup]:
    groups: List[RowGroup] = []
    first_row = 0
    needed = schema.columns()
    for path in files:
        try:
            pf = pq.ParquetFile(path)
            md = pf.metadata
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path}: not a readable parquet file ({e})") from None
        names = set(pf.schema_arrow.names)
        missing = [c for c in needed if c not in names]
        if missing:
            raise DataError(
                f"{path}: missing column(s) {missing} required by schema.json "
                f"(file has {sorted(names)})"
            )
        for i in range(md.num_row_groups):
            n = md.row_group(i).num_rows
            groups.append(RowGroup(path, i, n, first_row))
            first_row += n
    return groups


def assign_row_groups(groups: Sequence[RowGroup], world_size: int, epoch: int,
                      shuffle: bool, seed: int) -> List[List[RowGroup]]:
    """Deal row groups round-robin to ranks (in a seeded order per epoch when shuffling)."""
    order = np.arange(len(groups))
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(len(groups))
    return [[groups[i] for i in order[r::world_size]] for r in range(world_size)]


def jagged_from_list_column(col: pa.ChunkedArray | pa.Array) -> Tuple[np.ndarray, np.ndarray]:
    """(lengths [N], values [sum lengths]) of a ``list<int64>`` column, without Python loops."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    offsets = arr.offsets.to_numpy()
    values = arr.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
    return np.diff(offsets).astype(np.int64), values.astype(np.int64, copy=False)


def truncate_recent(lengths: np.ndarray, values: np.ndarray, max_len: int
                    ) -> Tuple[np.ndarray, np.ndarray]:
    """Keep the last ``max_len`` values of every row (rows are oldest → newest)."""
    if lengths.size == 0 or lengths.max(initial=0) <= max_len:
        return lengths, values
    ends = np.cumsum(lengths)
    new_lengths = np.minimum(lengths, max_len)
    starts = ends - new_lengths
    new_offsets = np.concatenate(([0], np.cumsum(new_lengths)))
    idx = np.repeat(starts - new_offsets[:-1], new_lengths) + np.arange(new_offsets[-1])
    return new_lengths, values[idx]


def _kjt(keys: List[str], parts: List[Tuple[np.ndarray, np.ndarray]]) -> KeyedJaggedTensor:
    lengths = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    values = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)),
        lengths=torch.from_numpy(np.ascontiguousarray(lengths, dtype=np.int32)),
    )


def table_to_batch(table: pa.Table, schema: Schema, sample_ids: np.ndarray) -> Batch:
    """Build a ``Batch`` from an Arrow table holding exactly the batch's rows."""
    n = table.num_rows
    if schema.dense_features:
        dense = np.stack(
            [table.column(f.name).to_numpy().astype(np.float32, copy=False)
             for f in schema.dense_features], axis=1)
    else:
        dense = np.zeros((n, 0), dtype=np.float32)
    sparse = _kjt([f.name for f in schema.sparse_features],
                  [jagged_from_list_column(table.column(f.name))
                   for f in schema.sparse_features])
    sequence = timestamps = None
    if schema.sequence_features:
        seq_parts, ts_parts = [], []
        for f in schema.sequence_features:
            lengths, values = jagged_from_list_column(table.column(f.name))
            if f.timestamps:
                ts_lengths, ts = jagged_from_list_column(table.column(f.timestamps))
                if not np.array_equal(ts_lengths, lengths):
                    raise DataError(f"column {f.timestamps!r}: lengths differ from {f.name!r}")
                _, ts = truncate_recent(lengths, ts, f.max_len)
            else:
                ts = None
            lengths, values = truncate_recent(lengths, values, f.max_len)
            seq_parts.append((lengths, values))
            ts_parts.append((lengths, ts if ts is not None else np.zeros_like(values)))
        keys = [f.name for f in schema.sequence_features]
        sequence = _kjt(keys, seq_parts)
        timestamps = _kjt(keys, ts_parts)
    labels = np.stack([table.column(lab.name).to_numpy().astype(np.float32, copy=False)
                       for lab in schema.labels], axis=1) if schema.labels else np.zeros((n, 0))
    label_t = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32))
    if label_t.shape[1] == 1:
        label_t = label_t[:, 0]
    return Batch(
        dense=torch.from_numpy(np.ascontiguousarray(dense)),
        sparse=sparse,
        labels=label_t.contiguous(),
        sequence=sequence,
        timestamps=timestamps,
        sample_ids=torch.from_numpy(np.ascontiguousarray(sample_ids, dtype=np.int64)),
    )


class ParquetReader:
    """Iterates ``Batch``es of one split for one rank (see the module docstring).

    Args:
        dataset_dir: directory with ``schema.json`` and ``<split>/*.parquet``.
        split: ``train`` or ``eval`` (any subdirectory name).
        batch_size: rows per batch on this rank.
        rank, world_size: this rank and the number of ranks sharing the split.
        shuffle: shuffle row-group order and rows within a row group, per epoch.
        seed: shuffle seed (the same on all ranks).
        prefetch: batches built ahead in a background thread (0: build inline).
    """

    def __init__(self, dataset_dir: str, split: str, batch_size: int, rank: int = 0,
                 world_size: int = 1, shuffle: bool = False, seed: int = 0, prefetch: int = 4,
                 schema: Optional[Schema] = None) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.dataset_dir = dataset_dir
        self.split = split
        self.schema = schema or Schema.load(dataset_dir)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.prefetch = prefetch
        self.epoch = 0
        self.row_groups = list_row_groups(split_files(dataset_dir, split), self.schema)
        if len(self.row_groups) < world_size:
            raise DataError(
                f"{os.path.join(dataset_dir, split)} has {len(self.row_groups)} row group(s) "
                f"for {world_size} ranks; every rank needs at least one — write the dataset "
                f"with smaller row groups (e.g. --row-group-rows) or use fewer ranks"
            )
        self._columns = self.schema.columns()

    @property
    def num_rows(self) -> int:
        return sum(g.num_rows for g in self.row_groups)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _assignment(self) -> List[List[RowGroup]]:
        return assign_row_groups(self.row_groups, self.world_size, self.epoch, self.shuffle,
                                 self.seed)

    def __len__(self) -> int:
        """Batches per rank this epoch: the minimum over ranks, so all ranks agree."""
        return min(sum(g.num_rows for g in groups) // self.batch_size
                   for groups in self._assignment())

    def _batches(self, groups: List[RowGroup], num_batches: int,
                 stop: threading.Event) -> Iterator[Batch]:
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, 7])
        pending: List[pa.Table] = []
        pending_ids: List[np.ndarray] = []
        pending_rows = 0
        emitted = 0
        files: dict = {}
        for g in groups:
            if emitted >= num_batches or stop.is_set():
                break
            pf = files.get(g.path)
            if pf is None:
                pf = files[g.path] = pq.ParquetFile(g.path)
            try:
                t = pf.read_row_group(g.index, columns=self._columns)
            except (pa.ArrowInvalid, OSError) as e:
                raise DataError(f"{g.path}: row group {g.index} unreadable ({e})") from None
            ids = g.first_row + np.arange(g.num_rows, dtype=np.int64)
            if self.shuffle:
                perm = rng.permutation(g.num_rows)
                t = t.take(pa.array(perm))
                ids = ids[perm]
            pending.append(t)
            pending_ids.append(ids)
            pending_rows += g.num_rows
            while pending_rows >= self.batch_size and emitted < num_batches:
                table = pa.concat_tables(pending) if len(pending) > 1 else pending[0]
                all_ids = np.concatenate(pending_ids) if len(pending_ids) > 1 else pending_ids[0]
                yield table_to_batch(table.slice(0, self.batch_size), self.schema,
                                     all_ids[: self.batch_size])
                emitted += 1
                rest = table.slice(self.batch_size)
                pending, pending_ids = [rest], [all_ids[self.batch_size:]]
                pending_rows = rest.num_rows

    def __iter__(self) -> Iterator[Batch]:
        assignment = self._assignment()
        num_batches = min(sum(g.num_rows for g in gs) // self.batch_size for gs in assignment)
        groups = assignment[self.rank]
        stop = threading.Event()
        if self.prefetch <= 0:
            yield from self._batches(groups, num_batches, stop)
            return
        yield from _prefetched(self._batches(groups, num_batches, stop), self.prefetch, stop)


_DONE = object()


def _prefetched(it: Iterator[Batch], depth: int, stop: threading.Event) -> Iterator[Batch]:
    """Run ``it`` in a daemon thread, ``depth`` items ahead; re-raise its errors here."""
    q: "queue.Queue[object]" = queue.Queue(maxsize=depth)

    def work() -> None:
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_DONE)
        except BaseException as e:  # surfaced in the consumer
            q.put(e)

    thread = threading.Thread(target=work, name="parquet-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
