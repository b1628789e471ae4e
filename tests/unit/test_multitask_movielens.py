"""MMoE on MovieLens with two labels (like = rating >= 4, love = rating >= 5), in one process:
the shipped ``mmoe_movielens_ctr.toml`` validates against converted data, builds, trains
both tasks from real-format files, and its task kind names both tasks in the final line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.convert.__main__ import main as convert_main
from data.reader import ParquetReader
from data.schema import Schema
from data.metrics import roc_auc
from models import get_model_spec
from trainer.tasks.multitask import MultiTaskTrain
from tests.integration.test_train_converted import write_movielens_1m
from trainer.config import load_config
from trainer.tasks.multitask import MultiTaskKind

# A learning run (about 20 s of CPU; a minute or more on a loaded machine).
pytestmark = pytest.mark.slow


def test_mmoe_learns_like_and_love_from_converted_movielens(tmp_path) -> None:  # type: ignore[no-untyped-def]
    raw = tmp_path / "ml-1m"
    raw.mkdir()
    write_movielens_1m(str(raw))
    data = str(tmp_path / "ml")
    assert convert_main(["movielens", str(raw / "ratings.dat"), str(raw / "movies.dat"),
                         str(raw / "users.dat"), "--task", "ctr", "--love-label",
                         "--embedding-dim", "16", "--out", data, "--row-group-rows", "128",
                         "--no-progress"]) == 0
    # The shipped config with a smaller DeepFM, so this stays a quick single-process test.
    cfg = load_config("launch/configs/mmoe_movielens_ctr.toml",
                      [f"--data.path={data}", "--model.args.backbone_flavour=small"])
    schema = Schema.load(data)
    kind = MultiTaskKind(cfg, schema)
    assert [p.name for p in kind.predictions] == ["label", "love"]
    spec = get_model_spec(cfg.model.name)
    torch.manual_seed(0)
    model = MultiTaskTrain(spec.build(schema, spec.make_args(cfg.model.flavour, cfg.model.args),
                                     "cpu"))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    train = ParquetReader(data, "train", 128, shuffle=True, prefetch=0)
    for epoch in range(2):
        train.set_epoch(epoch)
        for batch in train:
            loss, _ = model(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
    scores, labels = [], []
    with torch.no_grad():
        for batch in ParquetReader(data, "test", 32, prefetch=0, remainder="pad"):
            _, (_, logits, y) = model(batch)
            scores.append(logits.numpy())
            labels.append(y.numpy())
    s, y = np.concatenate(scores), np.concatenate(labels)
    auc_like, auc_love = roc_auc(s[:, 0], y[:, 0]), roc_auc(s[:, 1], y[:, 1])
    # Ratings follow a hidden per-movie quality, so the item id predicts both labels.
    assert auc_like > 0.7 and auc_love > 0.7, (auc_like, auc_love)
    final = kind.final({"auc_label": auc_like, "auc_love": auc_love}, {})
    assert final["auc_label"] == auc_like and "oracle_auc_label" not in final
