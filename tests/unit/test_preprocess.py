"""data.preprocess and the csv converter's splits: statistics come from the train split only,
splits are complete, disjoint and (by time) ordered, ``--like`` reuses a training dataset's
state for unlabelled rows with their ids, and row groups fit up to 8 ranks."""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List

import numpy as np
import pyarrow.parquet as pq
import pytest

from data.convert.__main__ import main as convert_main
from data.convert.common import ConvertError, auto_row_group_rows
from data.preprocess import Preprocessor
from data.schema import Schema, load_meta
from tests.own_data import write_mixed_csv, write_spec


def run(*argv: str) -> None:
    assert convert_main([*argv, "--no-progress"]) == 0


def read(out: str, split: str) -> Dict[str, list]:
    return pq.read_table(os.path.join(out, split)).to_pydict()


def _spec(tmp_path, spec: Dict[str, Any]) -> str:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return str(path)


def test_statistics_from_the_train_split_only(tmp_path) -> None:
    # Time-split: the last 20% of rows (test) are shifted far up; their values must not
    # move the mean/std, the quantile boundaries or the vocabulary.
    n = 500
    rng = np.random.default_rng(0)
    x = rng.normal(10.0, 2.0, n)
    x[400:] += 1000.0
    cat = np.where(np.arange(n) < 400, rng.integers(0, 3, n), 7).astype(str)
    rows = ["y,ts,x,c,id"] + [f"{i % 2},{i},{x[i]:.6f},v{cat[i]},r{i}" for i in range(n)]
    f = tmp_path / "x.csv"
    f.write_text("\n".join(rows) + "\n")
    spec = {"label": {"column": "y"},
            "dense": [{"column": "x", "transform": "standardize"},
                      {"column": "x", "name": "xb", "transform": "bucketize", "buckets": 4}],
            "categorical": [{"column": "c", "min_count": 2}], "passthrough": ["id"]}
    out = str(tmp_path / "ds")
    run("csv", str(f), "--out", out, "--spec", _spec(tmp_path, spec), "--split-by", "ts",
        "--valid-ratio", "0", "--test-ratio", "0.2")
    train_x = np.array([float(f"{v:.6f}") for v in x[:400]])
    pre = load_meta(out)["preprocess"]
    std = pre["dense"][0]
    assert std["mean"] == pytest.approx(train_x.mean(), rel=1e-12)
    assert std["std"] == pytest.approx(train_x.std(), rel=1e-12)
    assert pre["dense"][1]["boundaries"] == pytest.approx(
        np.quantile(train_x, [0.25, 0.5, 0.75]).tolist(), rel=1e-12)
    assert sorted(pre["categorical"][0]["vocab"]) == ["v0", "v1", "v2"]  # not test's v7
    test = read(out, "test")
    assert test["id"] == [f"r{i}" for i in range(400, 500)]  # the latest rows
    expect = (np.array([float(f"{v:.6f}") for v in x[400:]]) - std["mean"]) / std["std"]
    np.testing.assert_allclose(test["x"], expect.astype(np.float32), rtol=1e-6)
    assert all(v == [4] for v in test["xb"])  # above every train boundary: the last bucket
    assert all(v == [1] for v in test["c"])  # unseen in train: out-of-vocabulary id 1
    train = read(out, "train")
    assert abs(np.mean(train["x"])) < 1e-5 and abs(np.std(train["x"]) - 1) < 1e-5
    assert Schema.load(out).feature("xb").num_embeddings == 5  # 0 empty, 1..4 buckets
    assert Schema.load(out).feature("c").num_embeddings == 5  # 0 missing, 1 unseen, 3 values


def test_random_splits_complete_disjoint_and_time_split_ordered(tmp_path) -> None:
    write_mixed_csv(str(tmp_path / "x.csv"), rows=600)
    write_spec(str(tmp_path / "spec.json"))
    out = str(tmp_path / "ds")
    run("csv", str(tmp_path / "x.csv"), "--out", out, "--spec", str(tmp_path / "spec.json"),
        "--valid-ratio", "0.15", "--test-ratio", "0.25", "--seed", "3")
    ids = {s: read(out, s)["req_id"] for s in ("train", "valid", "test")}
    every = [i for s in ids.values() for i in s]
    assert sorted(every) == [f"r{i:06d}" for i in range(600)]  # complete and disjoint
    assert 0.08 < len(ids["valid"]) / 600 < 0.22 and 0.18 < len(ids["test"]) / 600 < 0.32
    # The same seed gives the same split; the old eval_ratio means "test" with no valid.
    out2 = str(tmp_path / "ds2")
    run("csv", str(tmp_path / "x.csv"), "--out", out2, "--spec", str(tmp_path / "spec.json"),
        "--valid-ratio", "0.15", "--test-ratio", "0.25", "--seed", "3")
    assert read(out2, "test")["req_id"] == ids["test"]
    # By time: every train row is older than every valid row, which is older than test.
    out3 = str(tmp_path / "ds3")
    run("csv", str(tmp_path / "x.csv"), "--out", out3, "--spec", str(tmp_path / "spec.json"),
        "--split-by", "ts")
    order = {s: [int(r[1:]) for r in read(out3, s)["req_id"]] for s in ("train", "valid", "test")}
    assert max(order["train"]) < min(order["valid"]) and max(order["valid"]) < min(order["test"])
    assert (len(order["valid"]), len(order["test"])) == (60, 60)
    with pytest.raises(ConvertError, match=r"'eval_ratio' .* cannot be combined"):
        from data.convert import csv as csv_conv
        spec = json.load(open(tmp_path / "spec.json"))
        spec.update(eval_ratio=0.1, test_ratio=0.1)
        csv_conv.convert([str(tmp_path / "x.csv")], str(tmp_path / "o"),
                         _ns(["--spec", _spec(tmp_path, spec)]))


def _ns(argv: List[str]) -> Any:
    from data.convert.__main__ import build_parser

    return build_parser().parse_args(["csv", "in", "--out", "o", "--no-progress", *argv])


def test_like_unlabelled_rows_reuse_state_and_carry_ids(tmp_path) -> None:
    write_mixed_csv(str(tmp_path / "x.csv"), rows=400)
    write_spec(str(tmp_path / "spec.json"))
    out = str(tmp_path / "ds")
    run("csv", str(tmp_path / "x.csv"), "--out", out, "--spec", str(tmp_path / "spec.json"))
    # The same rows without their label, converted like the training set: same features.
    write_mixed_csv(str(tmp_path / "new.csv"), rows=400, labelled=False)
    new = str(tmp_path / "new")
    run("csv", str(tmp_path / "new.csv"), "--out", new, "--like", out, "--no-label")
    scored = read(new, "test")
    assert "click" not in scored and not Schema.load(new).labels
    assert scored["req_id"] == [f"r{i:06d}" for i in range(400)]
    by_id = {}
    for s in ("train", "valid", "test"):
        t = read(out, s)
        for k, rid in enumerate(t["req_id"]):
            by_id[rid] = {c: t[c][k] for c in t if c != "click"}
    for k in range(0, 400, 37):
        row = {c: scored[c][k] for c in scored}
        assert row == by_id[row["req_id"]]
    # The Preprocessor a server would use gives the same columns from the raw rows.
    pre = Preprocessor.from_dataset(out)
    raw = next(iter(pre.read_raw(str(tmp_path / "new.csv"))))
    assert pre.transform(raw).to_pydict() == {c: scored[c] for c in pre.transform(raw).column_names}
    # A spec with statistics cannot convert unlabelled rows on its own (it would fit them).
    with pytest.raises(ConvertError, match="--like TRAINING_DATASET"):
        from data.convert import csv as csv_conv
        csv_conv.convert([str(tmp_path / "new.csv")], str(tmp_path / "o"),
                         _ns(["--spec", str(tmp_path / "spec.json"), "--no-label"]))


def test_row_groups_fit_eight_ranks_and_widths_are_checked(tmp_path, caplog) -> None:
    assert auto_row_group_rows(1798) == 225 and auto_row_group_rows(7) == 1
    assert auto_row_group_rows(10_000_000) == 62_500  # 160 groups: still a multiple of 8
    write_mixed_csv(str(tmp_path / "x.csv"), rows=300)
    write_spec(str(tmp_path / "spec.json"))
    out = str(tmp_path / "ds")
    with caplog.at_level(logging.WARNING):
        spec = json.load(open(tmp_path / "spec.json"))
        spec["categorical"][0]["embedding_dim"] = 8
        run("csv", str(tmp_path / "x.csv"), "--out", out, "--spec", _spec(tmp_path, spec))
    assert "mixed embedding widths [8, 16]" in caplog.text
    for split in ("train", "valid", "test"):
        groups = [pq.ParquetFile(os.path.join(out, split, f)).metadata.num_row_groups
                  for f in os.listdir(os.path.join(out, split))]
        assert sum(groups) == 8, (split, groups)
    spec["categorical"][0]["embedding_dim"] = 10
    from data.convert import csv as csv_conv
    with pytest.raises(ConvertError, match=r"embedding_dim of \[\('city', 10\)\] is not a "
                                           r"multiple of 4.*\('city', 12\)"):
        csv_conv.convert([str(tmp_path / "x.csv")], str(tmp_path / "o"),
                         _ns(["--spec", _spec(tmp_path, spec)]))
    with pytest.raises(ConvertError, match=r"--embedding-dim 50: .* use 52"):
        from data.convert.common import check_embedding_dim
        check_embedding_dim(50)
