"""Converters round-trip small fixtures written here; values are checked, not just counts."""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.convert.__main__ import main as convert_main
from data.convert.common import ConvertError, bucketize, hash64
from data.schema import Schema, load_meta


def run(*argv: str) -> None:
    assert convert_main([*argv, "--no-progress"]) == 0


def read(out: str, split: str) -> Dict[str, list]:
    return pq.read_table(os.path.join(out, split)).to_pydict()


# -- hashing -------------------------------------------------------------------------------
def _ref_hash(text: str, salt: int = 0) -> int:
    """Scalar reference of hash64: FNV-1a over UTF-8 bytes, then splitmix64."""
    mask = (1 << 64) - 1

    def mix(x: int) -> int:
        x = (x + 0x9E3779B97F4A7C15) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    h = 0xCBF29CE484222325 ^ mix(salt)
    for b in text.encode():
        h = ((h ^ b) * 0x100000001B3) & mask
    return mix(h)


def test_hash64_matches_scalar_reference_for_fixed_and_ragged_strings() -> None:
    for values in (["68fd1e64", "80e26c9b", "00000000"], ["", "a", "héllo wörld", "ab|cd"]):
        got = hash64(pa.array(values), salt=3)
        assert got.tolist() == [_ref_hash(v, 3) for v in values]
    # Sliced arrays (non-zero offset) hash their own rows.
    arr = pa.array(["x", "yy", "zzz"]).slice(1)
    assert hash64(arr).tolist() == [_ref_hash("yy"), _ref_hash("zzz")]


# -- criteo --------------------------------------------------------------------------------
def _criteo_line(label: str, ints: List[str], cats: List[str]) -> str:
    assert len(ints) == 13 and len(cats) == 26
    return "\t".join([label] + ints + cats) + "\n"


def _criteo_rows() -> List[str]:
    cats_a = [f"{j:02x}aa00ff" for j in range(26)]
    cats_b = list(cats_a)
    cats_b[0], cats_b[5] = "deadbeef", ""
    return [
        _criteo_line("1", ["5", "", "3", "-1"] + ["0"] * 9, cats_a),
        _criteo_line("0", [""] * 13, [""] * 26),
        _criteo_line("0", ["100"] + ["1"] * 12, cats_b),
    ]


def test_criteo_hash_mode_values(tmp_path) -> None:
    day = tmp_path / "day_0"
    day.write_text("".join(_criteo_rows()))
    out = str(tmp_path / "ds")
    run("criteo", str(day), "--out", out, "--eval-ratio", "0", "--num-embeddings", "1000",
        "--row-group-rows", "2")
    t = read(out, "train")
    assert t["label"] == [1.0, 0.0, 0.0]
    np.testing.assert_allclose(t["I1"], [math.log(6), 0.0, math.log(101)], rtol=1e-6)
    np.testing.assert_allclose(t["I2"], [0.0, 0.0, math.log(2)], rtol=1e-6)  # missing → 0
    np.testing.assert_allclose(t["I4"], [0.0, 0.0, math.log(2)], rtol=1e-6)  # -1 → max(x,0)
    expected_c1 = bucketize(hash64(pa.array(["00aa00ff"]), salt=0), 1000)[0]
    assert t["C1"][0] == [expected_c1]
    assert t["C1"][1] == [0]  # missing categorical → id 0
    assert t["C1"][2] != t["C1"][0]
    assert t["C2"][2] == t["C2"][0]  # same text, same id
    assert t["C6"][2] == [0]
    schema = Schema.load(out)
    assert [f.name for f in schema.dense_features] == [f"I{i}" for i in range(1, 14)]
    assert all(f.num_embeddings == 1000 for f in schema.sparse_features)
    meta = load_meta(out)
    assert meta["converter"] == "criteo" and meta["rows"] == {"train": 3}
    assert meta["args"]["num_embeddings"] == "1000"
    assert pq.ParquetFile(os.path.join(out, "train", "part-00000.parquet")).num_row_groups == 2


def test_criteo_vocabulary_min_count_and_file_split(tmp_path) -> None:
    rows = _criteo_rows()
    d0, d1, d2 = tmp_path / "day_0", tmp_path / "day_1", tmp_path / "day_2.gz"
    d0.write_text(rows[0] + rows[2])
    d1.write_text(rows[0])
    import gzip

    with gzip.open(d2, "wt") as fh:
        fh.write(rows[1] + rows[2])
    out = str(tmp_path / "ds")
    run("criteo", str(d0), str(d1), str(d2), "--out", out, "--eval-files", "1",
        "--min-count", "2")
    train, ev = read(out, "train"), read(out, "eval")
    assert train["label"] == [1.0, 0.0, 1.0] and ev["label"] == [0.0, 0.0]
    schema = Schema.load(out)
    # C1 in training rows: "00aa00ff" twice (kept), "deadbeef" once (rare → 0).
    assert schema.feature("C1").num_embeddings == 2
    assert train["C1"] == [[1], [0], [1]]
    assert ev["C1"] == [[0], [0]]  # missing, then rare
    # C2 "01aa00ff" appears 3 times in training rows.
    assert train["C2"] == [[1], [1], [1]]
    vocab = np.load(os.path.join(out, "vocab.npz"))
    assert vocab["C1_counts"].tolist() == [2]


def test_criteo_ratio_split_is_deterministic_and_complete(tmp_path) -> None:
    day = tmp_path / "day_0"
    line = _criteo_rows()[0]
    day.write_text(line * 200)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for out in (a, b):
        run("criteo", str(day), "--out", out, "--eval-ratio", "0.3", "--test-ratio", "0.2")
    rows_a, rows_b = load_meta(a)["rows"], load_meta(b)["rows"]
    assert rows_a == rows_b and sum(rows_a.values()) == 200
    assert 30 < rows_a["eval"] < 90 and 15 < rows_a["test"] < 65


def test_criteo_bad_lines_report_file_line_and_column(tmp_path) -> None:
    rows = _criteo_rows()
    bad_value = rows[0].replace("\t5\t", "\tfive\t", 1)
    day = tmp_path / "day_0"
    day.write_text(rows[0] + bad_value + "1\t2\n" + rows[2])
    out = str(tmp_path / "ds")
    with pytest.raises(ConvertError, match=r"day_0:3: expected 40 fields .* found 2"):
        from data.convert import criteo
        ns = _ns(criteo, ["--eval-ratio", "0"])
        criteo.convert([str(day)], out, ns)
    ns = _ns(criteo, ["--eval-ratio", "0", "--skip-bad-lines", "1"])
    with pytest.raises(ConvertError, match=r"day_0:2: column 2 \(I1\): expected an integer "
                                           r"or empty, got 'five'.*more than --skip-bad-lines 1"):
        criteo.convert([str(day)], out, ns)
    assert not os.path.exists(out) and not any(p.name.startswith("ds.tmp") for p in tmp_path.iterdir())
    ns = _ns(criteo, ["--eval-ratio", "0", "--skip-bad-lines", "2"])
    meta = criteo.convert([str(day)], out, ns)
    assert meta["rows"] == {"train": 2} and meta["bad_lines_skipped"] == 2
    assert read(out, "train")["label"] == [1.0, 0.0]


def _ns(module, extra: List[str]):
    from data.convert.__main__ import build_parser

    name = module.__name__.rsplit(".", 1)[1]
    return build_parser().parse_args([name, "x", "--out", "y", "--no-progress", *extra])


def test_refuses_to_overwrite_and_rejects_empty_input(tmp_path) -> None:
    day = tmp_path / "day_0"
    day.write_text(_criteo_rows()[0])
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert convert_main(["criteo", str(day), "--out", str(out), "--no-progress"]) == 2
    assert (out / "keep.txt").read_text() == "precious"
    empty = tmp_path / "empty"
    empty.write_text("")
    from data.convert import criteo

    with pytest.raises(ConvertError, match=r"empty: empty file \(0 bytes\)"):
        criteo.convert([str(empty)], str(tmp_path / "ds2"), _ns(criteo, []))


# -- movielens -----------------------------------------------------------------------------
# (user, item, rating, ts); user 1 has a tie at ts 20 (items 30 then 10, in file order).
RATINGS = [(1, 10, 5, 20), (2, 10, 3, 5), (1, 20, 4, 10), (1, 30, 2, 20), (2, 40, 4, 6),
           (1, 40, 1, 30), (3, 20, 5, 1)]


def _ml_files(tmp_path, fmt: str) -> str:
    d = tmp_path / fmt
    d.mkdir()
    order = [RATINGS[i] for i in (0, 1, 2, 3, 4, 5, 6)]
    # Keep the tie (1,10,.,20) before (1,30,.,20) in file order.
    if fmt == "100k":
        path = d / "u.data"
        path.write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in order))
    elif fmt == "1m":
        path = d / "ratings.dat"
        path.write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in order))
    else:
        path = d / "ratings.csv"
        path.write_text("userId,movieId,rating,timestamp\n"
                        + "".join(f"{u},{i},{r}.0,{t}\n" for u, i, r, t in order))
    return str(path)


@pytest.mark.parametrize("fmt", ["100k", "1m", "20m"])
def test_movielens_sequential_leave_one_out(tmp_path, fmt: str) -> None:
    out = str(tmp_path / "ds")
    run("movielens", _ml_files(tmp_path, fmt), "--out", out, "--task", "sequential",
        "--max-len", "8")
    train, valid, ev = read(out, "train"), read(out, "valid"), read(out, "test")
    # items renumbered by raw id: 10→1, 20→2, 30→3, 40→4; user 3 (1 rating) is dropped.
    assert ev["user_id"] == [[1], [2]]
    assert ev["item_seq"] == [[2, 1, 3, 4], [1, 4]]
    assert ev["item_ts"] == [[10, 20, 20, 30], [5, 6]]
    scale = 2 if fmt == "20m" else 1
    assert ev["action_seq"] == [[4 * scale, 5 * scale, 2 * scale, 1 * scale],
                                [3 * scale, 4 * scale]]
    # Leave-one-out: valid stops one item before test, train one before valid (user 2's
    # train row would hold one item, which predicts nothing: no train row).
    assert valid["item_seq"] == [[2, 1, 3], [1]]
    assert valid["item_ts"] == [[10, 20, 20], [5]]
    assert train["user_id"] == [[1]] and train["item_seq"] == [[2, 1]]
    assert train["item_ts"] == [[10, 20]]
    schema = Schema.load(out)
    seq = schema.feature("item_seq")
    assert (seq.num_embeddings, seq.max_len, seq.timestamps) == (5, 8, "item_ts")
    assert schema.feature("action_seq").num_embeddings == 5 * scale + 1
    assert load_meta(out)["num_items"] == 4


def test_movielens_ctr_history_strictly_before_and_side_features(tmp_path) -> None:
    ratings = _ml_files(tmp_path, "1m")
    d = os.path.dirname(ratings)
    with open(os.path.join(d, "movies.dat"), "w", encoding="latin-1") as fh:
        fh.write("10::Toy Story (1995)::Animation|Comedy\n20::Heat: The Movie (1995)::Action\n"
                 "30::Café (1996)::Comedy|Drama\n")  # movie 40 has no entry
    with open(os.path.join(d, "users.dat"), "w") as fh:
        fh.write("1::F::1::10::48067\n2::M::56::16::70072\n")  # user 3 unknown
    out = str(tmp_path / "ds")
    run("movielens", ratings, os.path.join(d, "movies.dat"), os.path.join(d, "users.dat"),
        "--out", out, "--task", "ctr", "--history-len", "2")
    train, valid, ev = read(out, "train"), read(out, "valid"), read(out, "test")
    # Sorted by user then time; each user's last rating is in test, the one before in valid.
    assert train["item_id"] == [[2], [1]]
    assert train["label"] == [1.0, 1.0]
    assert valid["item_id"] == [[3], [1]] and valid["label"] == [0.0, 0.0]
    # The tie at ts 20: neither item sees the other in its history.
    assert train["hist_items"] == [[], [2]] and valid["hist_items"] == [[2], []]
    assert train["hist_ts"] == [[], [10]] and valid["hist_ts"] == [[10], []]
    assert ev["item_id"] == [[4], [4], [2]]
    assert ev["hist_items"] == [[1, 3], [1], []]  # most recent 2 of [2, 1, 3]
    # Genres sorted: Action 1, Animation 2, Comedy 3, Drama 4.
    assert train["genres"] == [[1], [2, 3]] and valid["genres"] == [[3, 4], [2, 3]]
    assert ev["genres"] == [[], [], [1]]
    assert train["gender"] == [[1], [1]] and valid["gender"] == [[1], [2]]
    assert ev["gender"] == [[1], [2], [0]]
    schema = Schema.load(out)
    assert schema.feature("hist_items").timestamps == "hist_ts"
    assert schema.feature("genres").num_embeddings == 5


def test_movielens_malformed_line_names_line(tmp_path) -> None:
    d = tmp_path / "ml"
    d.mkdir()
    (d / "u.data").write_text("1\t10\t5\t20\n1\tten\t5\t21\n")
    code = convert_main(["movielens", str(d / "u.data"), "--out", str(tmp_path / "o"),
                         "--no-progress"])
    assert code == 2
    from data.convert import movielens

    with pytest.raises(ConvertError, match=r"u.data:2: field item: expected a non-negative "
                                           r"number, got 'ten'"):
        movielens.convert([str(d / "u.data")], str(tmp_path / "o"), _ns(movielens, []))


# -- seqtxt --------------------------------------------------------------------------------
def test_seqtxt_with_and_without_timestamps(tmp_path) -> None:
    f = tmp_path / "seq.txt"
    f.write_text("u1 a 3\nu2 b 1\nu1 b 1\nu1 c 2\nu2 a 5\n")
    out = str(tmp_path / "ds")
    run("seqtxt", str(f), "--out", out)
    ev = read(out, "test")
    # Decode the renumbered items back to tokens through the hash order.
    tokens = sorted(["a", "b", "c"], key=lambda s: _ref_hash(s, 1))
    item_of = {k + 1: tok for k, tok in enumerate(tokens)}
    seqs = sorted([[item_of[i] for i in s] for s in ev["item_seq"]])
    assert seqs == [["b", "a"], ["b", "c", "a"]]
    assert sorted(ev["item_ts"]) == [[1, 2, 3], [1, 5]]
    f2 = tmp_path / "seq2.txt"
    f2.write_text("u1\ta\nu1\tb\nu1\tc\n")
    out2 = str(tmp_path / "ds2")
    run("seqtxt", str(f2), "--out", out2, "--delimiter", "\t")
    ev2 = read(out2, "test")
    assert [[item_of[i] for i in s] for s in ev2["item_seq"]] == [["a", "b", "c"]]
    assert ev2["item_ts"] == [[0, 1, 2]]
    assert read(out2, "valid")["item_ts"] == [[0, 1]]
    assert not os.path.exists(os.path.join(out2, "train"))  # a 1-item train row predicts nothing


# -- csv -------------------------------------------------------------------------------------
def _spec(tmp_path, **extra) -> str:
    spec = {
        "label": {"column": "click"},
        "dense": [{"column": "price", "transform": "log"}, {"column": "age", "fill": -1.0}],
        "categorical": [
            {"column": "site", "num_embeddings": 100, "embedding_dim": 8},
            {"column": "tags", "separator": "|", "num_embeddings": 50, "pooling": "mean"},
        ],
        "eval_ratio": 0.0,
        **extra,
    }
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return str(path)


def test_csv_text_and_parquet_inputs(tmp_path) -> None:
    f = tmp_path / "x.csv"
    f.write_text("click,price,age,site,tags,unused\n1,9,30,a.com,x|y,z\n0,,,b.com,,z\n"
                 "1,0.5,7,a.com,y||x,z\n")
    out = str(tmp_path / "ds")
    run("csv", str(f), "--out", out, "--spec", _spec(tmp_path))
    t = read(out, "train")
    assert t["click"] == [1.0, 0.0, 1.0]
    np.testing.assert_allclose(t["price"], [math.log(10), 0.0, math.log(1.5)], rtol=1e-6)
    assert t["age"] == [30.0, -1.0, 7.0]
    site_a = int(bucketize(hash64(pa.array(["a.com"]), 0), 100)[0])
    assert t["site"] == [[site_a], t["site"][1], [site_a]] and t["site"][1] != [site_a]
    x, y = bucketize(hash64(pa.array(["x", "y"]), 1), 50).tolist()
    assert t["tags"] == [[x, y], [], [y, x]]
    schema = Schema.load(out)
    assert schema.feature("tags").pooling == "mean" and schema.feature("site").embedding_dim == 8
    # The same table as parquet gives the same dataset.
    pq.write_table(pa.table({"click": [1, 0, 1], "price": [9.0, None, 0.5], "age": [30, None, 7],
                             "site": ["a.com", "b.com", "a.com"], "tags": ["x|y", "", "y||x"]}),
                   tmp_path / "x.parquet")
    out2 = str(tmp_path / "ds2")
    run("csv", str(tmp_path / "x.parquet"), "--out", out2, "--spec", _spec(tmp_path))
    assert read(out2, "train") == t


def test_csv_bad_label_and_missing_column(tmp_path) -> None:
    f = tmp_path / "x.tsv"
    f.write_text("click\tprice\tage\tsite\ttags\n1\t1\t1\ta\tb\n2\t1\t1\ta\tb\n")
    from data.convert import csv as csv_conv

    spec = _spec(tmp_path, delimiter="\t")
    with pytest.raises(ConvertError, match=r"x.tsv:3: column 'click' \(label\): expected 0 or 1"):
        csv_conv.convert([str(f)], str(tmp_path / "o"), _ns(csv_conv, ["--spec", spec]))
    g = tmp_path / "y.tsv"
    g.write_text("click\tprice\n1\t1\n")
    with pytest.raises(ConvertError, match=r"y.tsv: column\(s\) \['age', 'site', 'tags'\] "
                                           r"named in the spec are missing"):
        csv_conv.convert([str(g)], str(tmp_path / "o"), _ns(csv_conv, ["--spec", spec]))


def test_streaming_blocks_and_line_numbers_after_skipped_lines(tmp_path) -> None:
    from data.convert.common import BadLines
    from data.convert.text import integer_column, read_delimited, report_bad_rows

    f = tmp_path / "x.tsv"
    lines = [f"{i}\t{i * 10}\n" for i in range(1, 31)]
    lines[4] = "only-one-field\n"        # line 5: wrong field count (skipped by the parser)
    lines[24] = "25\tnot-a-number\n"     # line 25: bad value (found by the converter)
    f.write_text("".join(lines))
    bad = BadLines(limit=2)
    seen_lines, values, blocks = [], [], 0
    for first_row, batch, line_map in read_delimited(str(f), ["a", "b"], "\t", bad,
                                                     block_size=64):
        blocks += 1
        b, is_bad = integer_column(batch.column(1))
        keep = report_bad_rows(str(f), is_bad, first_row, line_map, batch,
                               lambda i: "column b: expected an integer", bad)
        rows = np.arange(batch.num_rows)
        seen_lines += line_map.lines(first_row + rows)[keep].tolist()
        values += b[keep].tolist()
    assert blocks > 3  # streamed in many small blocks, not read whole
    expected = [i for i in range(1, 31) if i not in (5, 25)]
    assert seen_lines == expected and values == [i * 10 for i in expected]
    assert bad.count == 2 and "x.tsv:25: column b" in bad.examples[1]


def test_vocabulary_counts_across_chunks() -> None:
    from data.convert.criteo import Vocabulary

    v = Vocabulary(1)
    for chunk in ([5, 7, 5], [7, 9], [5]):
        v.add(0, np.array(chunk, dtype=np.uint64))
    v.freeze(min_count=2)
    assert v.keys[0].tolist() == [5, 7] and v.counts[0].tolist() == [3, 2]
    assert v.lookup(0, np.array([7, 9, 5, 1], dtype=np.uint64)).tolist() == [2, 0, 1, 0]


def test_csv_parquet_bad_row_names_row(tmp_path) -> None:
    pq.write_table(pa.table({"click": [1, 2], "price": [1.0, 2.0], "age": [1, 2],
                             "site": ["a", "b"], "tags": ["x", "y"]}), tmp_path / "x.parquet")
    from data.convert import csv as csv_conv

    with pytest.raises(ConvertError, match=r"x.parquet: row 1: column 'click' \(label\): "
                                           r"expected 0 or 1"):
        csv_conv.convert([str(tmp_path / "x.parquet")], str(tmp_path / "o"),
                         _ns(csv_conv, ["--spec", _spec(tmp_path)]))
