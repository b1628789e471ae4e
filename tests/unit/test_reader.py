"""ParquetReader: KJTs equal a naive per-row reference; ranks are disjoint and balanced."""

from __future__ import annotations

import os
from typing import Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data.reader import DataError, ParquetReader, truncate_recent
from data.schema import FeatureSpec, LabelSpec, Schema


def _write_random_dataset(root: str, rows: int = 1000, row_group: int = 64,
                          seed: int = 0) -> Dict[str, List]:
    """Dense, two sparse (one often empty), one sequence with timestamps; returns the rows."""
    rng = np.random.default_rng(seed)
    schema = Schema(
        features=[
            FeatureSpec("d0", "dense"), FeatureSpec("d1", "dense"),
            FeatureSpec("a", "sparse", table="ta", num_embeddings=100, embedding_dim=8),
            FeatureSpec("b", "sparse", table="tb", num_embeddings=50, embedding_dim=8),
            FeatureSpec("h", "sequence", table="ti", num_embeddings=30, embedding_dim=8,
                        max_len=5, timestamps="h_ts"),
        ],
        labels=[LabelSpec("label")],
    )
    os.makedirs(os.path.join(root, "train"))
    schema.save(root)
    cols: Dict[str, List] = {"d0": [], "d1": [], "a": [], "b": [], "h": [], "h_ts": [], "label": []}
    for _ in range(rows):
        cols["d0"].append(float(rng.normal()))
        cols["d1"].append(float(rng.normal()))
        cols["a"].append([int(x) for x in rng.integers(0, 100, rng.integers(1, 4))])
        cols["b"].append([int(x) for x in rng.integers(0, 50, rng.integers(0, 3))])  # empties
        n = int(rng.integers(0, 9))
        cols["h"].append([int(x) for x in rng.integers(0, 30, n)])
        cols["h_ts"].append(sorted(int(x) for x in rng.integers(0, 10**6, n)))
        cols["label"].append(float(rng.integers(0, 2)))
    table = pa.table({
        "d0": pa.array(cols["d0"], pa.float32()), "d1": pa.array(cols["d1"], pa.float32()),
        "a": pa.array(cols["a"], pa.list_(pa.int64())), "b": pa.array(cols["b"], pa.list_(pa.int64())),
        "h": pa.array(cols["h"], pa.list_(pa.int64())),
        "h_ts": pa.array(cols["h_ts"], pa.list_(pa.int64())),
        "label": pa.array(cols["label"], pa.float32()),
    })
    half = rows // 2  # two files, so row groups span files
    pq.write_table(table.slice(0, half), os.path.join(root, "train", "part-0.parquet"),
                   row_group_size=row_group)
    pq.write_table(table.slice(half), os.path.join(root, "train", "part-1.parquet"),
                   row_group_size=row_group)
    return cols


def _naive_kjt(rows: List[List[int]], max_len: int = 0):  # type: ignore[no-untyped-def]
    lengths, values = [], []
    for r in rows:
        kept = r[-max_len:] if max_len and len(r) > max_len else r
        lengths.append(len(kept))
        values.extend(kept)
    return lengths, values


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = str(tmp_path_factory.mktemp("reader") / "ds")
    return root, _write_random_dataset(root)


def test_batches_equal_naive_reference(dataset) -> None:  # type: ignore[no-untyped-def]
    root, cols = dataset
    reader = ParquetReader(root, "train", batch_size=48, prefetch=2)
    seen = 0
    for batch in reader:
        ids = batch.sample_ids.tolist()
        assert ids == list(range(seen, seen + 48))  # unshuffled: file order
        seen += 48
        exp_lengths, exp_values = [], []
        for key in ("a", "b"):
            lengths, values = _naive_kjt([cols[key][i] for i in ids])
            exp_lengths += lengths
            exp_values += values
        assert batch.sparse.keys() == ["a", "b"]
        assert batch.sparse.lengths().tolist() == exp_lengths
        assert batch.sparse.values().tolist() == exp_values
        offsets = np.concatenate([[0], np.cumsum(exp_lengths)])
        assert batch.sparse.offsets().tolist() == offsets.tolist()
        h_len, h_val = _naive_kjt([cols["h"][i] for i in ids], max_len=5)
        assert batch.sequence.lengths().tolist() == h_len
        assert batch.sequence.values().tolist() == h_val
        _, ts_val = _naive_kjt([cols["h_ts"][i] for i in ids], max_len=5)
        assert batch.timestamps.values().tolist() == ts_val
        assert batch.timestamps.lengths().tolist() == h_len
        np.testing.assert_allclose(batch.dense[:, 0].numpy(),
                                   np.array([cols["d0"][i] for i in ids], np.float32))
        assert batch.labels.tolist() == [cols["label"][i] for i in ids]
        assert batch.dense.dtype == torch.float32 and batch.dense.shape == (48, 2)
    assert seen == (1000 // 48) * 48
    assert seen > 0


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("shuffle", [False, True])
def test_ranks_disjoint_and_balanced(dataset, world_size: int, shuffle: bool) -> None:  # type: ignore[no-untyped-def]
    root, _ = dataset
    readers = [ParquetReader(root, "train", 32, rank=r, world_size=world_size,
                             shuffle=shuffle, seed=3) for r in range(world_size)]
    counts = {len(r) for r in readers}
    assert len(counts) == 1, counts
    per_rank = []
    for r in readers:
        batches = list(r)
        assert len(batches) == len(r)  # __len__ is what __iter__ yields
        per_rank.append(set(torch.cat([b.sample_ids for b in batches]).tolist()))
    for i in range(world_size):
        for j in range(i + 1, world_size):
            assert not per_rank[i] & per_rank[j]
    # Most of the data is used: at most one batch per rank plus one row group lost.
    used = sum(len(s) for s in per_rank)
    assert used >= 1000 - world_size * (32 + 64)


def test_shuffle_is_seeded_and_changes_per_epoch(dataset) -> None:  # type: ignore[no-untyped-def]
    root, _ = dataset
    a = ParquetReader(root, "train", 32, shuffle=True, seed=1)
    b = ParquetReader(root, "train", 32, shuffle=True, seed=1)
    ids_a = torch.cat([x.sample_ids for x in a]).tolist()
    ids_b = torch.cat([x.sample_ids for x in b]).tolist()
    assert ids_a == ids_b
    assert ids_a != sorted(ids_a)
    a.set_epoch(1)
    assert torch.cat([x.sample_ids for x in a]).tolist() != ids_a


def test_truncate_recent_keeps_latest() -> None:
    lengths = np.array([0, 3, 7, 2])
    values = np.arange(12)
    new_len, new_val = truncate_recent(lengths, values, 3)
    assert new_len.tolist() == [0, 3, 3, 2]
    assert new_val.tolist() == [0, 1, 2, 7, 8, 9, 10, 11]


def test_too_few_row_groups_for_ranks(tiny_ctr: str) -> None:
    with pytest.raises(DataError, match="row group"):
        ParquetReader(tiny_ctr, "eval", 16, rank=0, world_size=64)


def test_missing_column_is_named(tmp_path) -> None:  # type: ignore[no-untyped-def]
    root = str(tmp_path / "ds")
    _write_random_dataset(root, rows=100)
    schema = Schema.load(root)
    schema.features.append(FeatureSpec("zzz", "dense"))
    schema.save(root)
    with pytest.raises(DataError, match=r"part-0\.parquet: missing column\(s\) \['zzz'\]"):
        ParquetReader(root, "train", 16)
