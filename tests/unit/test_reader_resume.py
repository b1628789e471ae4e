"""Remainder handling, shuffle windows and exact resume of the reader (checked by sample ids)."""

from __future__ import annotations

import itertools
from typing import List

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.reader import DataError, ParquetReader
from data.schema import FeatureSpec, LabelSpec, Schema

ROWS_PER_FILE = [37, 50, 13]  # row groups of 10 rows: 4 + 5 + 2 = 11 groups, 100 rows


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("resume") / "ds"
    (d / "train").mkdir(parents=True)
    Schema(features=[FeatureSpec("x", "dense"),
                     FeatureSpec("s", "sparse", num_embeddings=1000, embedding_dim=4),
                     FeatureSpec("q", "sequence", num_embeddings=1000, embedding_dim=4,
                                 max_len=4, timestamps="q_ts")],
           labels=[LabelSpec("label")]).save(str(d))
    start = 0
    for k, n in enumerate(ROWS_PER_FILE):
        rows = np.arange(start, start + n)
        # Row r: dense r, sparse ids [r, r] for odd rows ([r] for even), sequence of r % 6 ids.
        lengths = rows % 6
        pq.write_table(pa.table({
            "x": pa.array(rows.astype(np.float32)),
            "s": pa.array([[int(r)] * (1 + int(r) % 2) for r in rows], pa.list_(pa.int64())),
            "q": pa.array([list(range(int(r), int(r) + int(m))) for r, m in zip(rows, lengths)],
                          pa.list_(pa.int64())),
            "q_ts": pa.array([list(range(int(m))) for m in lengths], pa.list_(pa.int64())),
            "label": pa.array((rows % 2).astype(np.float32)),
        }), d / "train" / f"part-{k:05d}.parquet", row_group_size=10)
        start += n
    return str(d)


def ids_of(batches) -> List[List[int]]:
    out = []
    for b in batches:
        ids = b.sample_ids.tolist()
        # Every field follows its row through shuffles and slices.
        assert b.dense[:, 0].tolist() == [float(i) for i in ids]
        s = b.sparse["s"]
        assert s.lengths().tolist() == [1 + i % 2 for i in ids]
        assert s.values().tolist() == [i for i in ids for _ in range(1 + i % 2)]
        q = b.sequence["q"]
        exp = [list(range(i, i + i % 6))[-4:] for i in ids]
        assert q.values().tolist() == [v for e in exp for v in e]
        assert b.timestamps["q"].values().tolist() == [v - i for i, e in zip(ids, exp) for v in e]
        out.append(ids)
    return out


CONFIGS = [
    dict(shuffle=False, shuffle_buffer_rows=0, remainder="drop"),
    dict(shuffle=True, shuffle_buffer_rows=0, remainder="drop"),
    dict(shuffle=True, shuffle_buffer_rows=25, remainder="drop"),
    dict(shuffle=True, shuffle_buffer_rows=25, remainder="pad"),
    dict(shuffle=False, shuffle_buffer_rows=0, remainder="pad"),
]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_continues_exactly(dataset: str, cfg: dict, prefetch: int) -> None:
    for rank in range(2):
        def reader() -> ParquetReader:
            return ParquetReader(dataset, "train", 8, rank=rank, world_size=2, seed=5,
                                 prefetch=prefetch, **cfg)

        full = reader()
        full.set_epoch(1)
        expected = ids_of(full)
        assert len(expected) == len(full) > 3
        for stop_at in (0, 1, 3, len(expected)):
            first = reader()
            first.set_epoch(1)
            got = ids_of(itertools.islice(iter(first), stop_at))
            state = first.state_dict()
            assert (state["epoch"], state["batch"]) == (1, stop_at)
            resumed = reader()
            resumed.load_state_dict(state)
            got += ids_of(resumed)
            assert got == expected, (rank, stop_at)
            # The next epoch starts from its beginning.
            resumed.set_epoch(2)
            assert resumed.state_dict()["batch"] == 0
            assert len(ids_of(resumed)) == len(resumed)


def test_drop_and_pad_remainder_across_ranks(dataset: str) -> None:
    per_rank = {}
    for remainder in ("drop", "pad"):
        readers = [ParquetReader(dataset, "train", 8, rank=r, world_size=2, prefetch=0,
                                 remainder=remainder) for r in range(2)]
        lens = {len(r) for r in readers}
        assert len(lens) == 1
        per_rank[remainder] = [sum(ids_of(r), []) for r in readers]
    # Row groups alternate: rank 0 gets 6 groups (37 + ... rows), rank 1 the other 5.
    rows0 = len(set(per_rank["pad"][0]))
    rows1 = len(set(per_rank["pad"][1]))
    assert rows0 + rows1 == 100 and not set(per_rank["pad"][0]) & set(per_rank["pad"][1])
    assert len(per_rank["drop"][0]) == len(per_rank["drop"][1]) == 8 * (min(rows0, rows1) // 8)
    n_pad = 8 * -(-max(rows0, rows1) // 8)
    assert len(per_rank["pad"][0]) == len(per_rank["pad"][1]) == n_pad
    # Padding wraps around to the rank's own first rows.
    short = 0 if rows0 < rows1 else 1
    seq = per_rank["pad"][short]
    k = min(rows0, rows1)
    assert seq[k:] == seq[: n_pad - k]


def test_shuffle_buffer_mixes_row_groups_and_changes_per_epoch(dataset: str) -> None:
    r = ParquetReader(dataset, "train", 10, shuffle=True, shuffle_buffer_rows=40, prefetch=0,
                      seed=1)
    e0 = ids_of(r)
    r.set_epoch(1)
    e1 = ids_of(r)
    assert e0 != e1 and sorted(sum(e0, [])) == sorted(sum(e1, [])) == list(range(100))
    # Within a 40-row window (several 10-row groups), a batch draws from more than one group.
    assert any(len({i // 10 for i in batch}) > 1 for batch in e0)
    same_seed = ParquetReader(dataset, "train", 10, shuffle=True, shuffle_buffer_rows=40,
                              prefetch=0, seed=1)
    assert ids_of(same_seed) == e0


def test_load_state_dict_rejects_other_settings(dataset: str) -> None:
    state = ParquetReader(dataset, "train", 8, prefetch=0).state_dict()
    other = ParquetReader(dataset, "train", 4, prefetch=0)
    with pytest.raises(DataError, match=r"saved batch_size=8 but this run has batch_size=4"):
        other.load_state_dict(state)


def test_no_full_batch_is_an_error(dataset: str) -> None:
    # 2 ranks: about 50 rows each; batch 64 fits on neither; the error names the largest
    # batch that fits on both.
    with pytest.raises(DataError, match=r"batch size 64 is larger than a rank's rows \(rows "
                                        r"per rank: \[53, 47\]\); the largest batch size "
                                        r"that fits is 47 \(e.g. --data.batch_size=47\)"):
        ParquetReader(dataset, "train", 64, rank=0, world_size=2)
    assert len(ParquetReader(dataset, "train", 64, rank=0, world_size=2, remainder="pad")) == 1


def test_state_dict_at_an_earlier_batch_for_in_flight_pipelines(dataset: str) -> None:
    full = ids_of(ParquetReader(dataset, "train", 8, shuffle=True, prefetch=2))
    r = ParquetReader(dataset, "train", 8, shuffle=True, prefetch=2)
    it = iter(r)
    for _ in range(5):  # a pipeline pulled 5 batches but trained on only 3
        next(it)
    state = r.state_dict(batch=3)
    resumed = ParquetReader(dataset, "train", 8, shuffle=True, prefetch=2)
    resumed.load_state_dict(state)
    assert ids_of(resumed) == full[3:]
    with pytest.raises(ValueError, match=r"batch 6 is not in \[0, 5\]"):
        r.state_dict(batch=6)
