"""trainer.selection: split resolution for new and older datasets, the early-stopping
tracker (direction per metric, patience, state round trip) and export's checkpoint choice."""

from __future__ import annotations

import os

import pytest

from trainer.checkpoint import MARKER
from trainer.selection import EarlyStopping, higher_is_better, resolve_checkpoint, resolve_splits


def test_splits_of_new_older_and_criteo_datasets(tmp_path) -> None:
    def ds(*splits: str) -> str:
        d = tmp_path / "_".join(splits)
        for s in splits:
            (d / s).mkdir(parents=True, exist_ok=True)
        return str(d)

    assert resolve_splits(ds("train", "valid", "test")) == ("valid", "test")
    assert resolve_splits(ds("train", "eval")) == (None, "eval")  # older: eval = test
    assert resolve_splits(ds("train", "eval", "test")) == ("eval", "test")  # criteo ratios
    assert resolve_splits(ds("train", "test")) == (None, "test")
    assert resolve_splits(ds("train", "valid", "test"), "v2", "t2") == ("v2", "t2")


def test_early_stopping_direction_patience_and_resume() -> None:
    assert higher_is_better("auc") and higher_is_better("ndcg@10") and higher_is_better("mrr")
    assert not higher_is_better("ne") and not higher_is_better("logloss_click")
    stop = EarlyStopping("auc", patience=2)
    assert stop.update(10, {"auc": 0.70}) == (True, False)
    assert stop.update(20, {"auc": 0.75}) == (True, False)
    assert stop.update(30, {"auc": 0.74}) == (False, False)
    resumed = EarlyStopping("auc", patience=2)
    resumed.load_state_dict(stop.state_dict())  # what a checkpoint carries
    assert (resumed.best, resumed.best_step, resumed.bad) == (0.75, 20, 1)
    assert resumed.update(40, {"auc": 0.75}) == (False, True)  # ties do not improve
    assert resumed.exhausted()
    ne = EarlyStopping("ne", patience=0)  # 0: keep the best, never stop
    assert ne.update(1, {"ne": 0.9}) == (True, False)
    assert ne.update(2, {"ne": 0.8}) == (True, False)
    assert [ne.update(s, {"ne": 0.85})[1] for s in range(3, 9)] == [False] * 6
    with pytest.raises(ValueError, match=r"'hr@10' is not a metric .* choose one of \['auc'"):
        EarlyStopping("hr@10", 1).update(1, {"auc": 0.5, "eval_rows": 10.0})


def test_export_prefers_the_best_checkpoint(tmp_path) -> None:
    def ckpt(path: str) -> str:
        os.makedirs(path)
        open(os.path.join(path, MARKER), "w").close()
        return path

    run = tmp_path / "run"
    latest = ckpt(str(run / "checkpoints" / "step_00000036"))
    assert resolve_checkpoint(str(run)) == latest
    best = ckpt(str(run / "checkpoints" / "best" / "step_00000018"))
    assert resolve_checkpoint(str(run)) == best
    assert resolve_checkpoint(str(run / "checkpoints")) == best
    assert resolve_checkpoint(latest) == latest
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_checkpoint(str(tmp_path / "nothing"))
