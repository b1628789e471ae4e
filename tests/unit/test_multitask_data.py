"""Multi-label data: the two-task synthetic generator, eval-only labels in schema.json, the
MovieLens ``love`` label, and ``Batch.labels`` of shape ``[B, T]``."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from data.convert.__main__ import main as convert_main
from data.reader import ParquetReader
from data.schema import FeatureSpec, LabelSpec, Schema, SchemaError
from data.synth.ctr import PRESETS
from data.synth.ctr2 import MultiTaskSynthArgs, PlantedCTCVR, ctr2_preset, generate_ctr2


def test_ctr2_conversion_only_after_click_and_oracles(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = str(tmp_path / "d")
    meta = generate_ctr2(out, MultiTaskSynthArgs(**PRESETS["tiny"]), progress=False)  # type: ignore[arg-type]
    t = pq.read_table(os.path.join(out, "eval")).to_pydict()
    click, conv, would = (np.array(t[k]) for k in ("click", "conversion", "would_convert"))
    assert np.all(conv == click * would)  # a conversion needs a click
    assert 0 < conv.mean() < click.mean() < 1
    oracle = meta["oracle"]  # type: ignore[index]
    for task in ("click", "conversion", "would_convert"):
        assert 0.6 < oracle[f"auc_{task}"] < 0.99, oracle
    assert oracle["auc"] == oracle["auc_click"]
    # The conversion model shares signal with the click model: the labels correlate.
    assert np.corrcoef(click, would)[0, 1] > 0.05
    schema = Schema.load(out)
    assert [(lab.name, lab.eval_only) for lab in schema.labels] == [
        ("click", False), ("conversion", False), ("would_convert", True)]


def test_esmm_preset_rare_clicks_and_conversion_driven_by_the_click_structure() -> None:
    """``esmm_ci`` (ESMM's data-sparsity setting) has rarer clicks than ``ci`` and a pCVR that
    follows pCTR far more closely; ρ₂ = 0 (the default) leaves the default data unchanged."""
    def sample(**kw: object) -> np.ndarray:
        args = MultiTaskSynthArgs(**{**ctr2_preset(str(kw.pop("preset"))), **kw})  # type: ignore[arg-type]
        _, _, probs, labels = PlantedCTCVR.draw(args).sample(20_000, np.random.default_rng(3))
        return np.concatenate([probs, labels], axis=1)

    ci, esmm = sample(preset="ci"), sample(preset="esmm_ci")
    assert esmm[:, 3].mean() < 0.35 < ci[:, 3].mean()  # click rate

    def corr(a: np.ndarray) -> float:  # of logit pCTR and logit pCVR
        return float(np.corrcoef(np.log(a[:, 0] / (1 - a[:, 0])),
                                 np.log(a[:, 2] / (1 - a[:, 2])))[0, 1])

    # Measured with these draws: 0.76 (esmm_ci) and 0.26 (ci).
    assert corr(esmm) > 0.6 > 0.4 > corr(ci), (corr(esmm), corr(ci))
    # An explicit ρ₂ = 0 is the default: the same draws, the same labels.
    assert np.array_equal(sample(preset="ci", cvr_click_interaction=0.0), ci)
    assert not np.array_equal(sample(preset="ci", cvr_click_interaction=0.5), ci)
    with pytest.raises(ValueError, match="unknown ctr2 preset 'big'.*esmm_ci"):
        ctr2_preset("big")


def test_reader_gives_b_by_t_labels_and_b_for_one(tiny_ctr2: str, tiny_ctr: str) -> None:
    out = tiny_ctr2  # the session's data.synth ctr2 --preset tiny
    batch = next(iter(ParquetReader(out, "eval", 64, prefetch=0)))
    assert batch.labels.shape == (64, 3) and batch.batch_size == 64
    first = pq.read_table(os.path.join(out, "eval")).slice(0, 64).to_pydict()
    assert batch.labels[:, 1].tolist() == first["conversion"]
    single = next(iter(ParquetReader(tiny_ctr, "eval", 64, prefetch=0)))
    assert single.labels.shape == (64,)


def test_eval_only_is_written_only_when_set_and_read_back(tmp_path) -> None:  # type: ignore[no-untyped-def]
    feats = [FeatureSpec("d0", "dense")]
    Schema(feats, [LabelSpec("y")]).save(str(tmp_path))
    raw = json.load(open(tmp_path / "schema.json"))
    assert raw["labels"] == [{"name": "y", "kind": "binary"}]  # old files stay identical
    Schema(feats, [LabelSpec("y"), LabelSpec("z", "regression", eval_only=True)]).save(
        str(tmp_path))
    back = Schema.load(str(tmp_path))
    assert back.labels[1] == LabelSpec("z", "regression", eval_only=True)
    with pytest.raises(SchemaError, match="duplicate label name"):
        Schema(feats, [LabelSpec("y"), LabelSpec("y")])


def test_movielens_love_label(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ratings = [(1, 10, 5, 20), (2, 10, 3, 5), (1, 20, 4, 10), (1, 30, 2, 21), (2, 40, 5, 6)]
    path = tmp_path / "ratings.dat"
    path.write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in ratings))
    out = str(tmp_path / "ds")
    assert convert_main(["movielens", str(path), "--out", out, "--task", "ctr",
                         "--love-label", "--no-progress"]) == 0
    train = pq.read_table(os.path.join(out, "train")).to_pydict()
    valid = pq.read_table(os.path.join(out, "valid")).to_pydict()
    # user 1 sorted by time: ratings 4 (train), 5 (valid), 2 (test); user 2: 3 (valid),
    # 5 (test)
    assert train["label"] == [1.0] and valid["label"] == [1.0, 0.0]
    assert train["love"] == [0.0] and valid["love"] == [1.0, 0.0]
    schema = Schema.load(out)
    assert [lab.name for lab in schema.labels] == ["label", "love"]
