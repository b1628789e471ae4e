"""A matrix of bad inputs: each must fail with a named error, never a bare traceback or a
silent default.

Every case asserts the exception type (or the CLI's exit code 2) AND that the message names
the offender: the config key, the file and line, the file/row/column, the schema entry and
key, or the checkpoint file. Groups: config keys, ``schema.json``, ``meta.json``, dataset
files (the reader), the CTR task's labels, the four converters (criteo, movielens, seqtxt,
csv), ``--overwrite`` and checkpoint files. Single process, tiny inputs (the whole file runs
in a few seconds).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import re
import typing
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.convert.__main__ import main as convert_main
from data.convert.common import bucketize, hash64
from data.reader import DataError, ParquetReader
from data.schema import Schema, SchemaError, load_meta, load_schema
from trainer.checkpoint import CheckpointError, Checkpointer, MARKER
from trainer.config import SECTIONS, ConfigError, load_config
from trainer.config_ranges import CHECKED_ELSEWHERE, RANGES

# -- config keys ----------------------------------------------------------------------------
# (override, the key the message must name). Every numeric key of every section is here
# (test_every_numeric_key_has_a_range checks that RANGES covers them all).
CONFIG_CASES: List[Tuple[str, str]] = [
    ("--training.dense_lr=-1", "training.dense_lr"),
    ("--training.sparse_lr=-1", "training.sparse_lr"),
    ("--training.sparse_lr=0", "training.sparse_lr"),
    ("--training.dense_weight_decay=-0.1", "training.dense_weight_decay"),
    ("--training.sparse_weight_decay=-0.1", "training.sparse_weight_decay"),
    ("--training.sparse_eps=0", "training.sparse_eps"),
    ("--training.eval_every=-1", "training.eval_every"),
    ("--training.eval_batches=-1", "training.eval_batches"),
    ("--training.early_stop_patience=-1", "training.early_stop_patience"),
    ("--data.length_sampling_alpha=3", "data.length_sampling_alpha"),
    ("--data.length_sampling_min_len=0", "data.length_sampling_min_len"),
    ("--data.balance_batches=-1", "data.balance_batches"),
    ("--training.seed=-1", "training.seed"),
    ("--training.fail_rank=-1", "training.fail_rank"),
    ("--training.steps=-1", "training.steps"),
    ("--training.log_every=0", "training.log_every"),
    ("--training.epochs=0", "training.epochs"),
    ("--training.fail_at=step", "training.fail_at"),
    ("--training.dense_optimizer=lbfgs", "training.dense_optimizer"),
    ("--training.dense_lr=nan", "training.dense_lr"),
    ("--data.prefetch=-1", "data.prefetch"),
    ("--data.shuffle_buffer_rows=-5", "data.shuffle_buffer_rows"),
    ("--data.batch_size=0", "data.batch_size"),
    ("--data.eval_batch_size=-1", "data.eval_batch_size"),
    ("--data.batch_size=many", "data.batch_size"),
    ("--data.remainder=keep", "data.remainder"),
    ("--metrics.window_batches=0", "metrics.window_batches"),
    ("--checkpoint.every_steps=-1", "checkpoint.every_steps"),
    ("--checkpoint.every_minutes=-1", "checkpoint.every_minutes"),
    ("--checkpoint.keep_last=0", "checkpoint.keep_last"),
    ("--dist.cpu_threads=-1", "dist.cpu_threads"),
    ("--dist.timeout_s=0", "dist.timeout_s"),
    ("--dist.device=bogus", "dist.device"),
    ("--dist.backend=mpi", "dist.backend"),
    ("--sharding.storage_reservation=1.5", "sharding.storage_reservation"),
    ("--sharding.hbm_gb=0", "sharding.hbm_gb"),
    ("--sharding.ddr_gb=-1", "sharding.ddr_gb"),
    ("--sharding.intra_host_bw_gbps=0", "sharding.intra_host_bw_gbps"),
    ("--sharding.inter_host_bw_gbps=-2", "sharding.inter_host_bw_gbps"),
    ("--sharding.cache_load_factor=2", "sharding.cache_load_factor"),
    ("--sharding.pooling_factor=0", "sharding.pooling_factor"),
    ("--sharding.min_partition=6", "sharding.min_partition"),
    ("--sharding.tables.t0.lr=-1", "sharding.tables.t0.lr"),
    ("--training.no_such_key=1", "training.no_such_key"),
]


@pytest.mark.parametrize("override,key", CONFIG_CASES, ids=[c[0][2:] for c in CONFIG_CASES])
def test_bad_config_value_names_the_key(override: str, key: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override, "--training.steps=5" if "steps" not in override
                           and "epochs" not in override else "--training.seed=0",
                           f"--data.path={tmp_path / 'none'}"])
    assert key in str(info.value)


def test_every_numeric_key_has_a_range() -> None:
    numeric = set()
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            if typing.get_origin(tp) not in (None, typing.Union):
                continue  # tables and lists (dense_lr_scale is checked entry by entry)
            if any(a in (int, float) for a in typing.get_args(tp) or (tp,)):
                numeric.add(f"{section}.{f.name}")
    missing = sorted(numeric - set(RANGES) - CHECKED_ELSEWHERE)
    assert not missing, f"numeric config keys without a range check: {missing}"
    # ... and every key is exercised by a bad value above.
    tested = {key for _, key in CONFIG_CASES}
    assert numeric <= tested, sorted(numeric - tested)


def test_trainer_cli_exits_2_naming_every_bad_key(capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.__main__ import main

    assert main(["--training.dense_lr=-1", "--dist.timeout_s=0", "--dist.device=bogus"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for key in ("training.dense_lr", "dist.timeout_s", "dist.device"):
        assert key in err


# -- schema.json ----------------------------------------------------------------------------
def _feature(**kw: Any) -> Dict[str, Any]:
    return {"name": "user", "kind": "sparse", "num_embeddings": 50, "embedding_dim": 8, **kw}


SCHEMA_CASES: List[Tuple[str, Any, str]] = [
    ("num_embeddings_string", {"features": [_feature(num_embeddings="50")]},
     r"feature #0 'user': key 'num_embeddings' must be an integer, got a string"),
    ("num_embeddings_float", {"features": [_feature(num_embeddings=50.5)]},
     r"feature #0 'user': key 'num_embeddings' must be an integer, got a number \(50.5\)"),
    ("num_embeddings_bool", {"features": [_feature(num_embeddings=True)]},
     r"'user': key 'num_embeddings' must be an integer"),
    ("num_embeddings_zero", {"features": [_feature(num_embeddings=0)]},
     r"'user'.*num_embeddings must be > 0"),
    ("embedding_dim_string", {"features": [_feature(embedding_dim="8")]},
     r"'user': key 'embedding_dim' must be an integer"),
    ("max_len_float", {"features": [_feature(kind="sequence", max_len=2.5)]},
     r"'user': key 'max_len' must be an integer"),
    ("name_not_string", {"features": [_feature(name=5)]},
     r"feature #0: key 'name' must be a string"),
    ("unknown_feature_key", {"features": [_feature(vocab=3)]}, r"'user': unknown key 'vocab'"),
    ("feature_not_object", {"features": ["user"]}, r"feature #0: expected an object"),
    ("features_not_list", {"features": {"user": 1}}, r"key 'features' must be a list"),
    ("labels_not_list", {"features": [_feature()], "labels": "click"},
     r"key 'labels' must be a list"),
    ("label_kind_number", {"features": [_feature()], "labels": [{"name": "y", "kind": 1}]},
     r"label #0 'y': key 'kind' must be a string"),
    ("label_eval_only_string", {"features": [_feature()],
                                "labels": [{"name": "y", "eval_only": "yes"}]},
     r"label #0 'y': key 'eval_only' must be true or false"),
    ("label_kind_unknown", {"features": [_feature()], "labels": [{"name": "y", "kind": "ordinal"}]},
     r"label #0 'y': kind 'ordinal'"),
    ("top_level_list", [_feature()], r"expected a JSON object"),
]


@pytest.mark.parametrize("name,content,pattern", SCHEMA_CASES, ids=[c[0] for c in SCHEMA_CASES])
def test_bad_schema_names_file_feature_and_key(name: str, content: Any, pattern: str,
                                               tmp_path: Path) -> None:
    (tmp_path / "schema.json").write_text(json.dumps(content))
    with pytest.raises(SchemaError) as info:
        load_schema(str(tmp_path))
    msg = str(info.value)
    assert str(tmp_path / "schema.json") in msg
    assert re.search(pattern, msg), msg


def test_corrupt_schema_json_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "schema.json").write_text('{"features": [')
    with pytest.raises(SchemaError, match=re.escape(str(tmp_path / "schema.json")) + ": not valid"):
        load_schema(str(tmp_path))


# -- meta.json ------------------------------------------------------------------------------
META_CASES: List[Tuple[str, bytes, str]] = [
    ("truncated", b'{"rows": {"train": 1', r"not valid JSON"),
    ("binary_garbage", b"\xff\xfe\x00garbage", r"not valid JSON"),
    ("top_level_list", b"[1, 2]", r"expected a JSON object"),
    ("rows_string", b'{"rows": "100"}', r"key 'rows' must be an object"),
    ("rows_count_string", b'{"rows": {"train": "100"}}', r"key 'rows.train' must be"),
    ("rows_count_negative", b'{"rows": {"eval": -1}}', r"key 'rows.eval' must be"),
    ("oracle_string", b'{"oracle": "good"}', r"key 'oracle' must be an object"),
    ("oracle_auc_string", b'{"oracle": {"auc": "0.8"}}', r"key 'oracle.auc' must be a number"),
    ("files_list", b'{"files": ["train/a.parquet"]}', r"key 'files' must be an object"),
    ("preprocess_list", b'{"preprocess": []}', r"key 'preprocess' must be an object"),
]


@pytest.mark.parametrize("name,content,pattern", META_CASES, ids=[c[0] for c in META_CASES])
def test_bad_meta_names_file_and_key(name: str, content: bytes, pattern: str,
                                     tmp_path: Path) -> None:
    (tmp_path / "meta.json").write_bytes(content)
    with pytest.raises(SchemaError) as info:
        load_meta(str(tmp_path))
    msg = str(info.value)
    assert str(tmp_path / "meta.json") in msg and re.search(pattern, msg), msg


# -- dataset files (the reader) -------------------------------------------------------------
def _good_columns(n: int = 8) -> Dict[str, pa.Array]:
    return {
        "d0": pa.array(np.arange(n, dtype=np.float32)),
        "user": pa.array([[i % 5] for i in range(n)], type=pa.list_(pa.int64())),
        "click": pa.array(np.arange(n) % 2, type=pa.float32()),
    }


def _dataset(root: Path, label_kind: str = "binary", train: Dict[str, pa.Array] | None = None,
             evaluation: Dict[str, pa.Array] | None = None) -> str:
    Schema.from_dict({"features": [{"name": "d0", "kind": "dense"}, _feature(num_embeddings=5)],
                      "labels": [{"name": "click", "kind": label_kind}]}).save(str(root))
    for split, cols in (("train", train), ("eval", evaluation)):
        os.makedirs(root / split, exist_ok=True)
        pq.write_table(pa.table(cols or _good_columns()), root / split / "part-00000.parquet",
                       row_group_size=4)
    return str(root)


def _with(**cols: Any) -> Dict[str, pa.Array]:
    out = _good_columns()
    out.update(cols)
    return out


def _read_all(path: str, split: str) -> None:
    for _ in ParquetReader(path, split, batch_size=2, prefetch=0):
        pass


READER_CASES: List[Tuple[str, Callable[[Path], Tuple[str, Callable[[], None]]], str]] = [
    # (id, build → (dataset, action), pattern naming file/row/column)
    ("eval_label_2_found_up_front",
     lambda p: (d := _dataset(p, evaluation=_with(click=pa.array([0, 1, 2, 0, 1, 0, 1, 0],
                                                                 type=pa.float32()))),
                lambda: ParquetReader(d, "eval", 2, prefetch=0).validate_labels()),
     r"eval/part-00000.parquet, row group 0, row 2: label 'click' is 2.0"),
    ("eval_label_5_in_second_row_group",
     lambda p: (d := _dataset(p, evaluation=_with(click=pa.array([0, 1, 0, 0, 1, 5, 1, 0],
                                                                 type=pa.float32()))),
                lambda: ParquetReader(d, "eval", 2, prefetch=0).validate_labels()),
     r"eval/part-00000.parquet, row group 1, row 5: label 'click' is 5.0"),
    ("null_binary_label",
     lambda p: (d := _dataset(p, train=_with(click=pa.array([0, 1, None, 0, 1, 0, 1, 0],
                                                            type=pa.float32()))),
                lambda: ParquetReader(d, "train", 2, prefetch=0).validate_labels()),
     r"train/part-00000.parquet, row group 0, row 2: label 'click' is nan"),
    ("nan_regression_label",
     lambda p: (d := _dataset(p, "regression", train=_with(
         click=pa.array([0, 1, 3, 0, 1, float("nan"), 1, 0], type=pa.float32()))),
                lambda: ParquetReader(d, "train", 2, prefetch=0).validate_labels()),
     r"row 5: label 'click' is nan; a regression label must be in finite values"),
    ("label_in_reading_pass",
     lambda p: (d := _dataset(p, train=_with(click=pa.array([0, 1, 0, 7, 1, 0, 1, 0],
                                                            type=pa.float32()))),
                lambda: _read_all(d, "train")),
     r"train/part-00000.parquet, row group 0, row 3: label 'click' is 7.0"),
    ("whole_list_null",
     lambda p: (d := _dataset(p, train=_with(user=pa.array([[0], [1], None, [3], [4], [0], [1],
                                                           [2]], type=pa.list_(pa.int64())))),
                lambda: _read_all(d, "train")),
     r"row 2: column 'user' is null for this row \(a whole-list null\)"),
    ("null_id_in_list",
     lambda p: (d := _dataset(p, train=_with(user=pa.array([[0], [1], [None], [3], [4], [0],
                                                           [1], [2]], type=pa.list_(pa.int64())))),
                lambda: _read_all(d, "train")),
     r"row 2: column 'user' holds a null id"),
    ("negative_id",
     lambda p: (d := _dataset(p, train=_with(user=pa.array([[0], [1], [2], [-3], [4], [0], [1],
                                                           [2]], type=pa.list_(pa.int64())))),
                lambda: _read_all(d, "train")),
     r"row 3: column 'user' has negative id -3"),
    ("id_out_of_range",
     lambda p: (d := _dataset(p, train=_with(user=pa.array([[0], [1], [2], [3], [4], [9], [1],
                                                           [2]], type=pa.list_(pa.int64())))),
                lambda: _read_all(d, "train")),
     r"row group 1, row 5: column 'user' has id 9 >= num_embeddings 5"),
    ("dense_inf",
     lambda p: (d := _dataset(p, train=_with(d0=pa.array([0, 1, np.inf, 0, 1, 0, 1, 0],
                                                         type=pa.float32()))),
                lambda: _read_all(d, "train")),
     r"row 2: dense column 'd0' is inf"),
    ("missing_column",
     lambda p: (d := _dataset(p, train={k: v for k, v in _good_columns().items() if k != "d0"}),
                lambda: _read_all(d, "train")),
     r"train/part-00000.parquet: missing column\(s\) \['d0'\]"),
    ("sparse_as_string",
     lambda p: (d := _dataset(p, train=_with(user=pa.array([str(i) for i in range(8)]))),
                lambda: _read_all(d, "train")),
     r"train/part-00000.parquet: column 'user' has type string"),
    ("empty_file",
     lambda p: (d := _dataset(p), (p / "train" / "part-00001.parquet").write_bytes(b""),
                lambda: _read_all(d, "train"))[::2],
     r"train/part-00001.parquet: empty file"),
    ("corrupt_file",
     lambda p: (d := _dataset(p), (p / "train" / "part-00001.parquet").write_bytes(b"PAR1junk"),
                lambda: _read_all(d, "train"))[::2],
     r"train/part-00001.parquet: not a readable parquet file"),
    ("meta_rows_mismatch",
     lambda p: (d := _dataset(p), (p / "meta.json").write_text('{"rows": {"train": 9}}'),
                lambda: _read_all(d, "train"))[::2],
     r"parquet footers hold 8 rows but meta.json says 9"),
]


@pytest.mark.parametrize("name,build,pattern", READER_CASES, ids=[c[0] for c in READER_CASES])
def test_bad_dataset_file_names_file_row_column(name: str, build: Any, pattern: str,
                                                tmp_path: Path) -> None:
    _, action = build(tmp_path)
    with pytest.raises((DataError, SchemaError)) as info:
        action()
    assert re.search(pattern, str(info.value)), str(info.value)


def test_bad_eval_label_fails_before_training(tmp_path: Path) -> None:
    """build_readers (the trainer's first data step) checks both splits' labels."""
    import torch

    from sharding.dist import DistContext
    from trainer.tasks import get_task_kind
    from trainer.trainer import build_readers

    d = _dataset(tmp_path, evaluation=_with(click=pa.array([0, 1, 0, 0, 1, 0, 1, 2],
                                                          type=pa.float32())))
    cfg = load_config(None, [f"--data.path={d}", "--data.batch_size=2", "--data.prefetch=0"])
    ctx = DistContext(0, 1, 0, 1, torch.device("cpu"), "gloo")
    schema = load_schema(d)
    with pytest.raises(DataError, match=r"eval/part-00000.parquet, row group 1, row 7: label "
                                        r"'click' is 2.0"):
        build_readers(cfg, ctx, schema, get_task_kind("ctr", cfg, schema))


# -- CTR (BCE) models need one binary label -------------------------------------------------
@pytest.mark.parametrize("labels,pattern", [
    ([], r"labels are none \(\[\]\)"),
    ([{"name": "rating", "kind": "regression"}], r"\('rating', 'regression'\)"),
    ([{"name": "a"}, {"name": "b"}], r"\('a', 'binary'\), \('b', 'binary'\)"),
], ids=["no_labels", "regression_label", "two_labels"])
def test_ctr_model_refuses_labels_a_bce_head_cannot_train(labels: List[Dict[str, str]],
                                                          pattern: str, tmp_path: Path) -> None:
    from trainer.tasks import get_task_kind

    schema = Schema.from_dict({"features": [_feature()], "labels": labels})
    cfg = load_config(None, [f"--data.path={tmp_path}"])
    with pytest.raises(SchemaError) as info:
        get_task_kind("ctr", cfg, schema)
    msg = str(info.value)
    assert str(tmp_path / "schema.json") in msg and "'deepfm' is a CTR model" in msg
    assert re.search(pattern, msg), msg


# -- converters -----------------------------------------------------------------------------
def _criteo_line(label: str = "1", dense: Sequence[str] = ("5",) * 13,
                 cats: Sequence[str] = ("68fd1e64",) * 26) -> str:
    return "\t".join([label, *dense, *cats]) + "\n"


def _criteo(p: Path, bad: str, at: int = 3, n: int = 6, name: str = "day_0") -> List[str]:
    lines = [_criteo_line() for _ in range(n)]
    lines[at - 1] = bad
    (p / name).write_text("".join(lines))
    return ["criteo", str(p / name)]


def _truncated_gz(p: Path) -> List[str]:
    data = gzip.compress(("".join(_criteo_line() for _ in range(20000))).encode())
    (p / "day_0.gz").write_bytes(data[: len(data) // 2])
    return ["criteo", str(p / "day_0.gz")]


def _seqtxt(p: Path, text: str) -> List[str]:
    (p / "seq.txt").write_text(text)
    return ["seqtxt", str(p / "seq.txt")]


def _movielens(p: Path, text: str) -> List[str]:
    (p / "ratings.dat").write_text(text)
    return ["movielens", str(p / "ratings.dat")]


def _csv(p: Path, text: str, **spec: Any) -> List[str]:
    (p / "x.csv").write_text(text)
    full = {"label": {"column": "click"}, "dense": [{"column": "price"}],
            "categorical": [{"column": "site", "num_embeddings": 100}], "eval_ratio": 0.5}
    full.update(spec)
    (p / "spec.json").write_text(json.dumps(full))
    return ["csv", str(p / "x.csv"), "--spec", str(p / "spec.json")]


_CSV_OK = "click,price,site\n1,2,a\n0,3,b\n"
_D = ("5",) * 13

CONVERTER_CASES: List[Tuple[str, Callable[[Path], List[str]], str]] = [
    ("criteo_20_digit_integer",
     lambda p: _criteo(p, _criteo_line(dense=("12345678901234567890",) + _D[1:])),
     r"day_0:3: column 2 \(I1\): expected an integer \(at most 18 digits\) or empty, got "
     r"'12345678901234567890'"),
    ("criteo_truncated_gz", _truncated_gz, r"day_0.gz:\d+: .*truncated or corrupt .gz"),
    ("criteo_label_2", lambda p: _criteo(p, _criteo_line(label="2"), at=4),
     r"day_0:4: column 1 \(label\): expected 0 or 1, got '2'"),
    ("criteo_too_few_fields", lambda p: _criteo(p, "1\t2\t3\n", at=2),
     r"day_0:2: expected 40 fields separated by '\\t', found 3"),
    ("criteo_text_in_dense", lambda p: _criteo(p, _criteo_line(dense=_D[:5] + ("x1",) + _D[6:])),
     r"day_0:3: column 7 \(I6\): expected an integer"),
    ("criteo_eval_ratio_0", lambda p: _criteo(p, _criteo_line()) + ["--eval-ratio", "0"],
     r"--eval-ratio must lie in \(0, 1\), got 0.0"),
    ("criteo_eval_ratio_1", lambda p: _criteo(p, _criteo_line()) + ["--eval-ratio", "1"],
     r"--eval-ratio must lie in \(0, 1\), got 1.0"),
    ("criteo_ratios_leave_no_train",
     lambda p: _criteo(p, _criteo_line()) + ["--eval-ratio", "0.5", "--test-ratio", "0.5"],
     r"--test-ratio 0.5 must lie in \[0, 1\) and leave training rows"),
    ("criteo_empty_file", lambda p: ((p / "day_0").write_text(""), ["criteo", str(p / "day_0")])[1],
     r"day_0: empty file"),
    ("criteo_num_embeddings_text",
     lambda p: _criteo(p, _criteo_line()) + ["--num-embeddings", "lots"],
     r"--num-embeddings: expected an integer"),
    ("seqtxt_timestamp_overflow",
     lambda p: _seqtxt(p, "u1 i1 1\nu1 i2 2\nu1 i3 99999999999999999999\n"),
     r"seq.txt:3: field 3 \(timestamp\): expected a non-negative integer \(at most 18 digits\)"),
    ("seqtxt_negative_timestamp", lambda p: _seqtxt(p, "u1 i1 1\nu1 i2 -2\n"),
     r"seq.txt:2: field 3 \(timestamp\)"),
    ("seqtxt_wrong_field_count", lambda p: _seqtxt(p, "u1 i1 1 extra\n"),
     r"seq.txt:1: expected 'user item\[ timestamp\]', got 4 fields"),
    ("seqtxt_missing_item", lambda p: _seqtxt(p, "u1 i1 1\nu1  2\n"),
     r"seq.txt:2: expected non-empty user and item fields"),
    ("movielens_text_user", lambda p: _movielens(p, "1::10::5::978300760\nx::12::4::978300762\n"),
     r"ratings.dat:2: field user: expected a non-negative number, got 'x'"),
    ("movielens_timestamp_overflow",
     lambda p: _movielens(p, "1::10::5::978300760\n1::11::3::99999999999999999999\n"),
     r"ratings.dat:2: field timestamp"),
    ("movielens_too_few_fields", lambda p: _movielens(p, "1::10::5::978300760\n1::11\n"),
     r"ratings.dat:2: expected \d+ fields separated by"),
    ("csv_spec_num_embeddings_string",
     lambda p: _csv(p, _CSV_OK, categorical=[{"column": "site", "num_embeddings": "1000"}]),
     r"spec.json: categorical #0 'site': key 'num_embeddings' must be an integer, got \"1000\""),
    ("csv_spec_embedding_dim_float",
     lambda p: _csv(p, _CSV_OK, categorical=[{"column": "site", "num_embeddings": 10,
                                              "embedding_dim": 1.5}]),
     r"categorical #0 'site': key 'embedding_dim' must be an integer, got 1.5"),
    ("csv_spec_num_embeddings_1",
     lambda p: _csv(p, _CSV_OK, categorical=[{"column": "site", "num_embeddings": 1}]),
     r"categorical\[0\] \('site'\): num_embeddings must be >= 2"),
    ("csv_spec_fill_string",
     lambda p: _csv(p, _CSV_OK, dense=[{"column": "price", "fill": "zero"}]),
     r"dense #0 'price': key 'fill' must be an integer or a number, got \"zero\""),
    ("csv_spec_eval_ratio_0", lambda p: _csv(p, _CSV_OK, eval_ratio=0),
     r"spec.json: key 'eval_ratio' must lie in \(0, 1\), got 0"),
    ("csv_spec_eval_ratio_1", lambda p: _csv(p, _CSV_OK, eval_ratio=1.0),
     r"spec.json: key 'eval_ratio' must lie in \(0, 1\), got 1.0"),
    ("csv_spec_header_string", lambda p: _csv(p, _CSV_OK, header="yes"),
     r"spec.json: key 'header' must be true or false"),
    ("csv_spec_unknown_key", lambda p: _csv(p, _CSV_OK, ratio=0.1),
     r"spec.json: unknown key\(s\) \['ratio'\]; valid keys"),
    ("csv_spec_not_json",
     lambda p: (_csv(p, _CSV_OK), (p / "spec.json").write_text("{"))[0],
     r"--spec .*spec.json: cannot read JSON"),
    ("csv_missing_column", lambda p: _csv(p, "click,cost,site\n1,2,a\n"),
     r"x.csv: column\(s\) \['price'\] named in the spec are missing"),
    ("csv_label_3", lambda p: _csv(p, "click,price,site\n1,2,a\n3,3,b\n"),
     r"x.csv:3: column 'click' \(label\): expected 0 or 1"),
    ("csv_dense_text", lambda p: _csv(p, "click,price,site\n1,2,a\n0,cheap,b\n"),
     r"x.csv:3: column 'price' \(dense\): expected a finite number"),
    ("csv_too_many_fields", lambda p: _csv(p, 'click,price,site\n1,2,a\n0,3,"b,c",d\n'),
     r"x.csv:3: expected 3 fields separated by ',', found 4"),
]


@pytest.mark.parametrize("name,build,pattern", CONVERTER_CASES,
                         ids=[c[0] for c in CONVERTER_CASES])
def test_bad_converter_input_exits_2_naming_file_line(name: str, build: Any, pattern: str,
                                                      tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    argv = build(tmp_path)
    out = tmp_path / "ds"
    assert convert_main([*argv, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(pattern, err), err
    assert not out.exists()  # nothing half-written


def test_csv_rfc4180_quoting(tmp_path: Path) -> None:
    """Quoted values are hashed without their quotes; quoted delimiters, doubled quotes and
    quoted line breaks are part of the value; a quoted header name may hold the delimiter."""
    text = ('click,price,"the,site"\n1,"2","a,b"\n0,3,"say ""hi"""\n1,4,plain\n'
            '0,5,"two\nlines"\n1,6,"plain"\n')
    argv = _csv(tmp_path, text, categorical=[{"column": "the,site", "num_embeddings": 1000,
                                              "name": "site"}], eval_ratio=1e-9)
    out = tmp_path / "ds"
    assert convert_main([*argv, "--out", str(out), "--no-progress"]) == 0
    t = pq.read_table(out / "train").to_pydict()
    expected = bucketize(hash64(pa.array(["a,b", 'say "hi"', "plain", "two\nlines", "plain"]),
                                salt=0), 1000)
    assert [ids[0] for ids in t["site"]] == expected.tolist()
    assert t["price"] == [2.0, 3.0, 4.0, 5.0, 6.0]


# -- --overwrite only replaces what the tool wrote -------------------------------------------
def test_convert_overwrite_refuses_a_foreign_directory(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    argv = _csv(tmp_path, _CSV_OK * 1)
    assert convert_main([*argv, "--out", str(foreign), "--overwrite", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{foreign} exists and is not a dataset written by this tool" in err
    assert (foreign / "thesis.tex").read_text() == "years of work"
    # A dataset it wrote itself is replaced.
    ds = tmp_path / "ds"
    assert convert_main([*argv, "--out", str(ds), "--no-progress"]) == 0
    assert (ds / ".shardrec-dataset").is_file()
    assert convert_main([*argv, "--out", str(ds), "--overwrite", "--no-progress"]) == 0


def test_synth_overwrite_refuses_a_foreign_directory(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from data.synth.__main__ import main as synth_main

    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    assert synth_main(["ctr", "--out", str(foreign), "--preset", "tiny", "--overwrite"]) == 2
    assert "not a dataset written by this tool" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep"


def test_export_overwrite_refuses_a_foreign_directory(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.export import main as export_main

    ckpt = tmp_path / "step_00000001"
    ckpt.mkdir()
    (ckpt / MARKER).write_text("")
    foreign = tmp_path / "runs_i_need"
    foreign.mkdir()
    (foreign / "x").write_text("keep")
    assert export_main(["--checkpoint", str(ckpt), "--out", str(foreign), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"{foreign} exists and is not an export written by this tool" in err
    assert (foreign / "x").read_text() == "keep"


# -- checkpoint files (what the checkpointer checks before loading) -------------------------
def _ckpt(p: Path, *files: str) -> str:
    path = p / "step_00000004"
    path.mkdir()
    for f in files:
        (path / f).write_text('{"step": 4, "world_size": 1}' if f == "trainer.json" else "")
    return str(path)


CHECKPOINT_CASES: List[Tuple[str, Callable[[Path], str], str]] = [
    ("missing_directory", lambda p: str(p / "step_00000009"), r"step_00000009 does not exist"),
    ("no_complete_marker", lambda p: _ckpt(p, ".metadata", "trainer.json"),
     r"step_00000004 has no COMPLETE marker"),
    ("missing_metadata", lambda p: _ckpt(p, MARKER, "trainer.json"),
     r"step_00000004/.metadata is missing"),
    ("missing_trainer_json", lambda p: _ckpt(p, MARKER, ".metadata"),
     r"step_00000004/trainer.json is missing"),
    ("corrupt_trainer_json",
     lambda p: (path := _ckpt(p, MARKER, ".metadata"),
                (Path(path) / "trainer.json").write_text("{step"))[0],
     r"step_00000004/trainer.json: unreadable"),
]


@pytest.mark.parametrize("name,build,pattern", CHECKPOINT_CASES,
                         ids=[c[0] for c in CHECKPOINT_CASES])
def test_bad_checkpoint_names_the_file(name: str, build: Any, pattern: str,
                                       tmp_path: Path) -> None:
    path = build(tmp_path)
    with pytest.raises(CheckpointError) as info:
        Checkpointer(str(tmp_path), 0, 1, 3)._check(path)
    assert re.search(pattern, str(info.value)), str(info.value)


def test_export_of_an_incomplete_checkpoint_exits_2(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.export import main as export_main

    path = _ckpt(tmp_path, ".metadata", "trainer.json")
    assert export_main(["--checkpoint", path, "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert f"{path}: not a complete checkpoint (no COMPLETE marker)" in err
    assert not (tmp_path / "e").exists()


def test_trainer_reports_bad_input_without_a_traceback(caplog: pytest.LogCaptureFixture,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.__main__ import report_failure

    report_failure(0, DataError("x/eval/part-00000.parquet, row 3: label 'click' is 5.0"))
    assert [r.exc_info for r in caplog.records if r.name == "trainer"] == [None]
    assert capsys.readouterr().err.strip().endswith(
        "rank 0 failed: DataError: x/eval/part-00000.parquet, row 3: label 'click' is 5.0")
    report_failure(0, RuntimeError("a bug"))  # not bad input: the traceback stays
    assert caplog.records[-1].exc_info is not None
