"""Every kind of bad dataset input gives an error naming the file, column, row and fix."""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.reader import DataError, ParquetReader
from data.schema import FeatureSpec, LabelSpec, Schema, SchemaError


def _schema(out_of_range: str = "error") -> Schema:
    return Schema(
        features=[FeatureSpec("d0", "dense"), FeatureSpec("d1", "dense"),
                  FeatureSpec("s0", "sparse", num_embeddings=10, embedding_dim=4,
                              out_of_range=out_of_range),
                  FeatureSpec("hist", "sequence", num_embeddings=10, embedding_dim=4, max_len=3,
                              timestamps="hist_ts")],
        labels=[LabelSpec("label")],
    )


def _columns(n: int = 8) -> Dict[str, pa.Array]:
    return {
        "d0": pa.array(np.arange(n, dtype=np.float32)),
        "d1": pa.array(np.ones(n, dtype=np.float32)),
        "s0": pa.array([[i % 10] for i in range(n)], pa.list_(pa.int64())),
        "hist": pa.array([[1, 2, 3, 4][: i % 5] for i in range(n)], pa.list_(pa.int64())),
        "hist_ts": pa.array([[10, 20, 30, 40][: i % 5] for i in range(n)], pa.list_(pa.int64())),
        "label": pa.array((np.arange(n) % 2).astype(np.float32)),
    }


def _write(tmp_path, cols: Optional[Dict[str, pa.Array]] = None, schema: Optional[Schema] = None,
           files: int = 2) -> str:
    d = tmp_path / "ds"
    (d / "train").mkdir(parents=True)
    (schema or _schema()).save(str(d))
    cols = cols if cols is not None else _columns()
    table = pa.table(cols)
    n = table.num_rows // files
    for k in range(files):
        part = table.slice(k * n, n if k < files - 1 else None)
        pq.write_table(part, d / "train" / f"part-{k:05d}.parquet", row_group_size=2)
    return str(d)


def _read_all(path: str, **kw) -> List:
    return list(ParquetReader(path, "train", 2, prefetch=0, **kw))


def test_valid_dataset_reads(tmp_path) -> None:
    batches = _read_all(_write(tmp_path))
    assert len(batches) == 4
    assert batches[0].sequence.to_dict()["hist"].lengths().tolist() == [0, 1]


def test_missing_column(tmp_path) -> None:
    cols = _columns()
    del cols["d1"]
    with pytest.raises(DataError, match=r"part-00000.parquet: missing column\(s\) \['d1'\] "
                                        r"required by schema.json"):
        _read_all(_write(tmp_path, cols))


@pytest.mark.parametrize("column,value,expected", [
    ("d0", pa.array([str(i) for i in range(8)]), "a float or integer column"),
    ("s0", pa.array(np.arange(8)), r"list<int64> \(any integer list\)"),
    ("hist_ts", pa.array([["a"]] * 8), r"list<int64>"),
    ("label", pa.array(["x"] * 8), "a float, integer or bool column"),
])
def test_wrong_type(tmp_path, column: str, value: pa.Array, expected: str) -> None:
    cols = _columns()
    cols[column] = value
    with pytest.raises(DataError, match=rf"column '{column}' has type .*, expected {expected}"):
        _read_all(_write(tmp_path, cols))


def test_negative_id(tmp_path) -> None:
    cols = _columns()
    cols["s0"] = pa.array([[1], [2], [3], [4], [5], [1, -3], [1], [1]], pa.list_(pa.int64()))
    # Row 5 overall is row 1 of the second file (4 rows per file), in its row group 0.
    with pytest.raises(DataError, match=r"part-00001.parquet, row group 0, row 1: column 's0' "
                                        r"has negative id -3; ids must lie in \[0, 10\)"):
        _read_all(_write(tmp_path, cols))


def test_null_id_inside_a_list(tmp_path) -> None:
    cols = _columns()
    cols["s0"] = pa.array([[1], [2], [3], [4], [5], [6], [None], [1]], pa.list_(pa.int64()))
    with pytest.raises(DataError, match=r"part-00001.parquet, row group 1, row 2: column 's0' "
                                        r"holds a null id"):
        _read_all(_write(tmp_path, cols))


def test_id_out_of_range_error_hash_clamp(tmp_path) -> None:
    cols = _columns()
    cols["s0"] = pa.array([[1], [2], [3], [12, 4], [5], [1], [1], [1]], pa.list_(pa.int64()))
    with pytest.raises(DataError, match=r"part-00000.parquet, row group 1, row 3: column 's0' "
                                        r"has id 12 >= num_embeddings 10 of table 's0'.*"
                                        r"out_of_range"):
        _read_all(_write(tmp_path, cols))
    for mode, expected in (("hash", 2), ("clamp", 9)):
        path = _write(tmp_path / mode, cols, _schema(mode))
        batches = _read_all(path)
        assert batches[1].sparse["s0"].values().tolist() == [3, expected, 4]
        assert Schema.load(path).feature("s0").out_of_range == mode


def test_sequence_id_out_of_range(tmp_path) -> None:
    cols = _columns()
    cols["hist"] = pa.array([[], [1], [1, 2], [1, 2, 99], [], [], [], []], pa.list_(pa.int64()))
    with pytest.raises(DataError, match=r"row 3: column 'hist' has id 99 >= num_embeddings 10"):
        _read_all(_write(tmp_path, cols))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_dense(tmp_path, bad: float) -> None:
    cols = _columns()
    d1 = np.ones(8, dtype=np.float32)
    d1[6] = bad
    cols["d1"] = pa.array(d1)
    with pytest.raises(DataError, match=rf"part-00001.parquet, row group 1, row 2: dense column "
                                        rf"'d1' is {bad}; dense features must be finite"):
        _read_all(_write(tmp_path, cols))


def test_label_outside_allowed_set(tmp_path) -> None:
    cols = _columns()
    cols["label"] = pa.array(np.array([0, 1, 0, 1, 0, 2, 0, 1], dtype=np.float32))
    with pytest.raises(DataError, match=r"part-00001.parquet, row group 0, row 1: label 'label' "
                                        r"is 2.0; a binary label must be in \{0, 1\}"):
        _read_all(_write(tmp_path, cols))
    schema = Schema(features=_schema().features, labels=[LabelSpec("label", "regression")])
    assert len(_read_all(_write(tmp_path / "r", cols, schema))) == 4


def test_empty_zero_row_and_truncated_files(tmp_path) -> None:
    path = _write(tmp_path)
    extra = os.path.join(path, "train", "part-00009.parquet")
    open(extra, "wb").close()
    with pytest.raises(DataError, match=r"part-00009.parquet: empty file \(0 bytes\)"):
        _read_all(path)
    pq.write_table(pa.table(_columns()).slice(0, 0), extra)
    with pytest.raises(DataError, match=r"part-00009.parquet: zero rows; remove the file"):
        _read_all(path)
    data = open(os.path.join(path, "train", "part-00000.parquet"), "rb").read()
    with open(extra, "wb") as fh:
        fh.write(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"part-00009.parquet: not a readable parquet file — "
                                        r"truncated or corrupt\?"):
        _read_all(path)


def test_corrupt_row_group_data(tmp_path) -> None:
    path = _write(tmp_path)
    f = os.path.join(path, "train", "part-00000.parquet")
    data = bytearray(open(f, "rb").read())
    # Footer intact, page bytes garbled: caught when the row group is decoded.
    for k in range(4, 24):
        data[k] = 0xFF
    open(f, "wb").write(bytes(data))
    with pytest.raises(DataError, match=r"part-00000.parquet: row group \d unreadable"):
        _read_all(path)


def test_schema_missing_inconsistent_and_meta_rows(tmp_path) -> None:
    path = _write(tmp_path)
    os.remove(os.path.join(path, "schema.json"))
    with pytest.raises(SchemaError, match=r"schema.json not found: a dataset directory needs "
                                          r"schema.json"):
        ParquetReader(path, "train", 2)
    d = _schema().to_dict()
    d["features"][3]["table"] = "s0"  # sequence feature sharing a sparse table
    with open(os.path.join(path, "schema.json"), "w") as fh:
        json.dump(d, fh)
    with pytest.raises(SchemaError, match=r"features 's0' and 'hist' share table 's0' but "
                                          r"disagree on kind"):
        ParquetReader(path, "train", 2)
    _schema().save(path)
    with open(os.path.join(path, "meta.json"), "w") as fh:
        json.dump({"rows": {"train": 9}}, fh)
    with pytest.raises(DataError, match=r"parquet footers hold 8 rows but meta.json says 9"):
        ParquetReader(path, "train", 2)


def test_timestamps_out_of_order_and_misaligned(tmp_path) -> None:
    cols = _columns()
    cols["hist_ts"] = pa.array([[], [10], [10, 20], [10, 30, 20], [], [], [], []],
                               pa.list_(pa.int64()))
    with pytest.raises(DataError, match=r"part-00000.parquet, row group 1, row 3: column "
                                        r"'hist_ts': timestamps not in order within the sequence "
                                        r"\(position 2: 20 after 30\)"):
        _read_all(_write(tmp_path, cols))
    cols["hist_ts"] = pa.array([[], [10], [10], [], [], [], [], []], pa.list_(pa.int64()))
    with pytest.raises(DataError, match=r"row 2: column 'hist_ts' has 1 timestamps but 'hist' "
                                        r"has 2 ids"):
        _read_all(_write(tmp_path / "b", cols))


def test_column_projection(tmp_path) -> None:
    path = _write(tmp_path)
    batch = _read_all(path, columns=["d1", "hist", "label"])[0]
    assert batch.dense.shape == (2, 1) and batch.sparse.keys() == []
    assert batch.sequence.keys() == ["hist"] and batch.timestamps is not None
    with pytest.raises(DataError, match=r"unknown column\(s\) \['nope'\] in the projection"):
        ParquetReader(path, "train", 2, columns=["nope"])
