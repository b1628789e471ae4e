"""``trainer.predict`` on multi-task exports: one score column per prediction, named after
it, equal to the head's in-process outputs; per-prediction metrics evaluated like the
trainer's ``final`` line (ESMM's ``cvr`` against ``would_convert`` over all rows).

The export directory is written here the way ``trainer.export`` lays it out (the task
wrapper's state dict, ``config.toml``, ``schema.json``), from a randomly initialised model:
no training needed. ``tests/integration/test_train_multitask.py`` exports a trained, sharded
MMoE checkpoint through ``trainer.export`` and checks the predicted AUCs against the run's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from data.reader import ParquetReader
from data.schema import Schema
from data.metrics import log_loss, roc_auc
from models import get_model_spec
from trainer.tasks.multitask import MultiTaskTrain
from trainer.config import load_config, save_config
from trainer.export import MODEL_FILE
from trainer.predict import main as predict_main


def _export(model_name: str, data: str, out: str) -> MultiTaskTrain:
    """A random ``model_name`` on ``data``'s schema, written as an export directory."""
    cfg = load_config(None, [f"--model.name={model_name}", f"--data.path={data}",
                             "--model.args.backbone_flavour=small"])
    schema = Schema.load(data)
    spec = get_model_spec(model_name)
    torch.manual_seed(0)
    model = MultiTaskTrain(spec.build(schema, spec.make_args(cfg.model.flavour, cfg.model.args),
                                     "cpu")).eval()
    with torch.no_grad():  # embeddings far from zero, so the scores spread
        for n, p in model.named_parameters():
            if "embedding_bags" in n:
                p.uniform_(-0.5, 0.5)
    os.makedirs(out)
    torch.save(model.state_dict(), os.path.join(out, MODEL_FILE))
    save_config(cfg, out)
    schema.save(out)
    return model


@pytest.mark.parametrize("model_name,names", [("mmoe", ["click", "conversion"]),
                                              ("esmm", ["click", "conversion", "cvr"])])
def test_predict_writes_one_score_column_per_prediction(model_name: str, names: List[str],
                                                        tiny_ctr2: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    out = str(tmp_path / "export")
    model = _export(model_name, tiny_ctr2, out)
    assert [p.name for p in model.predictions] == names
    scores = str(tmp_path / "scores.parquet")
    # Batch 300 does not divide the 1024 eval rows: the padded last batch's duplicates go.
    assert predict_main(["--model", out, "--data", tiny_ctr2, "--out", scores,
                         "--batch-size", "300"]) == 0
    table = pq.read_table(scores).to_pydict()
    assert list(table) == ["sample_id", *[f"score_{n}" for n in names], "label_click",
                           "label_conversion", "label_would_convert"]
    ids = np.asarray(table["sample_id"])
    assert len(ids) == 1024 and len(np.unique(ids)) == 1024
    # The in-process head on the same rows, in the reader's order.
    expected, labels, order = [], [], []
    with torch.no_grad():
        for batch in ParquetReader(tiny_ctr2, "eval", 1024, prefetch=0):
            expected.append(torch.sigmoid(model.model(batch)).numpy())
            labels.append(batch.labels.numpy())
            order.append(batch.sample_ids.numpy())
    rows = np.searchsorted(ids, np.concatenate(order))
    expected_scores, y = np.concatenate(expected), np.concatenate(labels)
    for k, n in enumerate(names):
        np.testing.assert_allclose(np.asarray(table[f"score_{n}"])[rows], expected_scores[:, k],
                                   rtol=1e-5, atol=1e-6)
    final = dict(kv.split("=") for kv in
                 capsys.readouterr().out.strip().splitlines()[-1].split()[1:])
    assert int(final["rows"]) == 1024
    # Evaluated as the trainer does: each prediction against its evaluation label, over its
    # evaluation rows (ESMM's pCVR by default: conversion on clicked rows).
    for k, n in enumerate(names):
        label, keep = {"click": (0, None), "conversion": (1, None), "cvr": (1, 0)}[n]
        rows_kept = y[:, keep] == 1 if keep is not None else np.ones(len(y), dtype=bool)
        s, t = expected_scores[rows_kept, k], y[rows_kept, label]
        assert float(final[f"auc_{n}"]) == pytest.approx(roc_auc(s, t), abs=1e-5)
        assert float(final[f"logloss_{n}"]) == pytest.approx(log_loss(s, t), abs=1e-5)


def test_predict_names_the_task_kinds_it_scores(tmp_path: Path, tiny_nextitem: str,
                                                capsys: pytest.CaptureFixture) -> None:
    out = str(tmp_path / "export")
    os.makedirs(out)
    cfg = load_config(None, ["--model.name=sasrec", f"--data.path={tiny_nextitem}"])
    save_config(cfg, out)
    Schema.load(tiny_nextitem).save(out)
    assert predict_main(["--model", out, "--data", tiny_nextitem]) == 2
    assert "task kind 'sequential'; trainer.predict scores task kinds ['ctr', 'multitask']" \
        in capsys.readouterr().err
