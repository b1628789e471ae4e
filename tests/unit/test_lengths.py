"""Length-aware batches: the balanced partition against brute force, the sampling
distributions against their closed forms, and the reader's balanced, sampled batches (same
rows, same counts per rank, suffixes only, exact resume)."""

from __future__ import annotations

import itertools
from typing import Iterable, List, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.batch import Batch
from data.lengths import LengthSampling, balanced_batches, keep_suffix
from data.reader import ParquetReader
from data.schema import FeatureSpec, LabelSpec, Schema

MAX_LEN = 400


@pytest.fixture(scope="module")
def long_tailed(tmp_path_factory: pytest.TempPathFactory) -> str:
    """240 rows in row groups of 20; row r's history is ids r·1000 … r·1000 + L − 1 with
    heavy-tailed L (1 … 400), timestamps 0 … L − 1."""
    d = tmp_path_factory.mktemp("lengths") / "ds"
    (d / "train").mkdir(parents=True)
    Schema(features=[FeatureSpec("q", "sequence", num_embeddings=10 ** 6, embedding_dim=4,
                                 max_len=MAX_LEN, timestamps="q_ts")],
           labels=[LabelSpec("label")]).save(str(d))
    rng = np.random.default_rng(0)
    rows = np.arange(240)
    lengths = np.minimum(1 + (rng.pareto(1.2, rows.size) * 20).astype(int), MAX_LEN)
    pq.write_table(pa.table({
        "q": pa.array([list(range(r * 1000, r * 1000 + n)) for r, n in zip(rows, lengths)],
                      pa.list_(pa.int64())),
        "q_ts": pa.array([list(range(n)) for n in lengths], pa.list_(pa.int64())),
        "label": pa.array(np.zeros(rows.size, np.float32)),
    }), d / "train" / "part-00000.parquet", row_group_size=20)
    return str(d)


def test_balanced_batches_against_brute_force() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        costs = rng.integers(1, 100, 8) ** 2
        got = balanced_batches(costs, 2)
        assert sorted(np.concatenate(got).tolist()) == list(range(8))
        assert [p.size for p in got] == [4, 4]
        best = min(max(costs[list(s)].sum(), costs.sum() - costs[list(s)].sum())
                   for s in itertools.combinations(range(8), 4))
        # Greedy LPT is within one row's cost of the optimum.
        assert max(costs[p].sum() for p in got) <= best + costs.max()
    costs = rng.pareto(1.0, 4096).astype(np.int64) + 1
    loads = [costs[p].sum() for p in balanced_batches(costs, 8)]
    assert max(loads) - min(loads) <= costs.max()


def test_sampling_distributions() -> None:
    rng = np.random.default_rng(2)
    lengths = np.repeat([5, 40, 100, 400], 20000)
    hstu = LengthSampling("hstu", alpha=1.0).sample(lengths, 400, rng)  # threshold 20
    for n in (5,):
        assert (hstu[lengths == n] == n).all()
    for n in (40, 100, 400):
        kept = hstu[lengths == n]
        assert set(np.unique(kept).tolist()) <= {20, n}
        assert (kept == 20).mean() == pytest.approx(1 - 400 / n ** 2, abs=0.01)
    uni = LengthSampling("uniform", min_len=30).sample(lengths, 400, rng)
    assert (uni[lengths == 5] == 5).all()
    big = uni[lengths == 400]
    assert big.min() == 30 and big.max() == 400
    assert big.mean() == pytest.approx(215, abs=2)
    offsets = np.array([0, 3, 3, 7])
    o, v = keep_suffix(offsets, np.arange(7), np.array([2, 5, 1]))
    assert o.tolist() == [0, 2, 2, 3] and v.tolist() == [1, 2, 6]
    with pytest.raises(ValueError, match="alpha"):
        LengthSampling("hstu", alpha=3.0)


def _read(reader: Iterable[Batch]) -> List[Tuple[List[int], List[List[int]]]]:
    """(sample ids, histories) per batch; every history is a suffix of its row's and its
    timestamps are aligned with it."""
    out = []
    for b in reader:
        ids = b.sample_ids.tolist()
        q, ts = b.sequence["q"], b.timestamps["q"]
        hist = [h.tolist() for h in q.values().split(q.lengths().tolist())]
        times = [t.tolist() for t in ts.values().split(ts.lengths().tolist())]
        for r, h, t in zip(ids, hist, times):
            if h:
                first = h[0] - r * 1000
                assert h == list(range(h[0], h[0] + len(h))) and h[0] >= r * 1000
                assert t == list(range(first, first + len(h)))
        out.append((ids, hist))
    return out


def test_reader_balanced_sampled_batches_resume_exactly(long_tailed: str) -> None:
    def reader(rank: int, **kw: object) -> ParquetReader:
        r = ParquetReader(long_tailed, "train", 10, rank=rank, world_size=2, shuffle=True,
                          seed=3, prefetch=0, **kw)  # type: ignore[arg-type]
        r.set_epoch(1)
        return r

    spread = {}
    for rank in range(2):
        plain = _read(reader(rank))
        kw = dict(balance_batches=4, balance_cost="attention",
                  length_sampling=LengthSampling("hstu", alpha=1.6))
        full = reader(rank, **kw)
        assert len(full) == len(reader(1 - rank, **kw)) == len(plain) == 12
        balanced = _read(full)
        assert all(len(ids) == 10 for ids, _ in balanced)
        # The same rows, dealt within each superbatch of 4 batches.
        for s in range(0, 12, 4):
            assert sorted(i for ids, _ in balanced[s:s + 4] for i in ids) == \
                sorted(i for ids, _ in plain[s:s + 4] for i in ids)
        # Attention cost per batch: far less spread than the plain batches'.
        for name, batches in (("plain", plain), ("balanced", balanced)):
            cost = np.array([sum(len(h) ** 2 for h in hist) for _, hist in batches])
            spread[name, rank] = cost.max() / cost.mean()
        assert spread["balanced", rank] < spread["plain", rank]
        for stop_at in (1, 5, 12):
            first = reader(rank, **kw)
            assert _read(itertools.islice(iter(first), stop_at)) == balanced[:stop_at]
            resumed = reader(rank, **kw)
            resumed.load_state_dict(first.state_dict())
            assert _read(resumed) == balanced[stop_at:], (rank, stop_at)


def test_resume_refuses_other_length_settings(long_tailed: str) -> None:
    """A saved position names rows only under the same balancing and sampling."""
    from data.reader import DataError

    def reader(**kw: object) -> ParquetReader:
        return ParquetReader(long_tailed, "train", 10, prefetch=0, **kw)  # type: ignore[arg-type]

    state = reader(balance_batches=4).state_dict()
    with pytest.raises(DataError, match="balance_batches"):
        reader().load_state_dict(state)
    state = reader(length_sampling=LengthSampling("uniform")).state_dict()
    with pytest.raises(DataError, match="length_sampling"):
        reader(length_sampling=LengthSampling("hstu")).load_state_dict(state)
