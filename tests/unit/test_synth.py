"""Synthetic CTR generator: deterministic, Zipf-skewed, and its oracle is right."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from data.metrics import log_loss, roc_auc
from data.synth.ctr import PRESETS, CTRSynthArgs, generate_ctr


def test_roc_auc_matches_bruteforce() -> None:
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(300), 1)  # many ties
    labels = rng.random(300) < 0.4
    pos, neg = scores[labels], scores[~labels]
    brute = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (
        pos.size * neg.size)
    assert roc_auc(scores, labels) == pytest.approx(brute, abs=1e-12)


def test_generator_is_deterministic_and_oracle_consistent(tmp_path) -> None:  # type: ignore[no-untyped-def]
    args = CTRSynthArgs(**PRESETS["tiny"])  # type: ignore[arg-type]
    a = generate_ctr(str(tmp_path / "a"), args, progress=False)
    b = generate_ctr(str(tmp_path / "b"), args, progress=False)
    assert a["oracle"] == b["oracle"]
    ta = pq.read_table(str(tmp_path / "a" / "eval" / "part-00000.parquet"))
    tb = pq.read_table(str(tmp_path / "b" / "eval" / "part-00000.parquet"))
    assert ta.equals(tb)
    assert 0.6 < a["oracle"]["auc"] < 0.99
    with pytest.raises(FileExistsError, match="--overwrite"):
        generate_ctr(str(tmp_path / "a"), args, progress=False)
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # temp dirs renamed away
    meta = json.load(open(tmp_path / "a" / "meta.json"))
    assert meta["rows"] == {"train": args.train_rows, "eval": args.eval_rows}
    c = generate_ctr(str(tmp_path / "c"), CTRSynthArgs(**{**PRESETS["tiny"], "seed": 1}),  # type: ignore[arg-type]
                     progress=False)
    assert c["oracle"] != a["oracle"]


def test_ids_are_zipf_skewed_and_in_range(tmp_path) -> None:  # type: ignore[no-untyped-def]
    args = CTRSynthArgs(train_rows=20000, eval_rows=1000, num_embeddings=[500], multi_hot=[0],
                        num_dense=2, interacting_fields=1, rows_per_file=20000)
    generate_ctr(str(tmp_path / "z"), args, progress=False)
    t = pq.read_table(str(tmp_path / "z" / "train" / "part-00000.parquet"))
    ids = np.concatenate(t.column("s0").to_pylist())
    assert ids.min() >= 0 and ids.max() < 500
    counts = np.sort(np.bincount(ids, minlength=500))[::-1]
    assert counts[:10].sum() > 0.25 * ids.size  # the head dominates
    assert counts[0] > 20 * max(1, np.median(counts))


def test_oracle_beats_noise_and_matches_labels(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    p = rng.random(5000)
    y = rng.random(5000) < p
    assert roc_auc(p, y) > 0.7
    assert log_loss(p, y) < log_loss(np.full(5000, y.mean()), y)
