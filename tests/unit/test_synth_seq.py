"""Sequence-signal CTR generator: deterministic, well-formed sequences, and the label really
depends on whether the candidate's category is in the recent history."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from data.schema import Schema
from data.synth.__main__ import main
from data.synth.ctr_seq import SEQ_PRESETS, SeqCTRSynthArgs, generate_ctr_seq


def test_sequences_are_well_formed_and_carry_the_signal(tmp_path) -> None:  # type: ignore[no-untyped-def]
    args = SeqCTRSynthArgs(**{**SEQ_PRESETS["tiny"], "train_rows": 20_000,  # type: ignore[arg-type]
                              "rows_per_file": 20_000})
    meta = generate_ctr_seq(str(tmp_path / "a"), args, progress=False)
    again = generate_ctr_seq(str(tmp_path / "b"), args, progress=False)
    assert meta["oracle"] == again["oracle"]
    schema = Schema.load(str(tmp_path / "a"))
    assert [f.name for f in schema.sequence_features] == ["hist_item", "hist_cat"]
    t = pq.read_table(str(tmp_path / "a" / "train" / "part-00000.parquet")).to_pydict()
    lengths = np.array([len(x) for x in t["hist_item"]])
    assert lengths.min() == 0 and lengths.max() == args.max_len
    assert all(len(a) == len(b) == len(c) for a, b, c in
               zip(t["hist_item"], t["hist_cat"], t["hist_ts"]))
    assert all(np.all(np.diff(ts) > 0) for ts in t["hist_ts"])  # oldest first
    # Every item has one category, in the history and as a candidate alike.
    cat_of = {}
    for items, cats in zip(t["hist_item"] + t["item"], t["hist_cat"] + t["item_cat"]):
        for i, c in zip(items, cats):
            assert cat_of.setdefault(i, c) == c
    # The signal: a click is far likelier when the most recent event matches the candidate.
    labels = np.array(t["label"])
    recent_match = np.array([len(h) > 0 and h[-1] == c[0]
                             for h, c in zip(t["hist_cat"], t["item_cat"])])
    assert labels[recent_match].mean() - labels[~recent_match].mean() > 0.15
    assert 0.6 < meta["oracle"]["auc"] < 0.95  # type: ignore[index]


def test_cli_writes_dataset(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = str(tmp_path / "seq")
    assert main(["ctr_seq", "--out", out, "--preset", "tiny", "--max-len", "5"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["oracle_auc"] == pytest.approx(
        json.load(open(f"{out}/meta.json"))["oracle"]["auc"])
    assert Schema.load(out).feature("hist_item").max_len == 5
    assert main(["ctr_seq", "--out", out, "--preset", "tiny"]) == 2  # exists, no --overwrite
