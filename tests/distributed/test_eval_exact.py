"""Exact evaluation on 1, 2 and 3 gloo ranks: every eval row counts once, whatever the world
size and batch size (the last batches are padded and the padding masked out).

CTR: a 1,000-row test split in 8 row groups of 125 rows, batch 128 — 3 ranks read 375, 375
and 250 rows, so every rank pads and ranks pad differently. The model trained on 1 rank is
evaluated by the trainer on 1, 2 and 3 ranks (the others resume its checkpoint, resharded);
AUC, log-loss and ``eval_rows`` equal a single-process brute force over the exported model's
scores (``trainer.predict`` + numpy AUC/log-loss).

Sequential (SASRec, 256 users, max 12 items): HR@10, NDCG@10, MRR and ``eval_users`` on 2 and
3 ranks with batch 20 (padded) equal 1 rank reading all users in one unpadded batch.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List

import numpy as np
import pyarrow as pa

from data.convert.common import DatasetWriter, single_id_column
from data.schema import FeatureSpec, LabelSpec, Schema
from data.metrics import log_loss, roc_auc
from sharding.dist import DistContext
from launch.spawn import run_ranks

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEST_ROWS = 1000


def _ctr_dataset(out: str) -> None:
    rng = np.random.default_rng(0)
    schema = Schema(features=[FeatureSpec("d0", "dense"), FeatureSpec("d1", "dense"),
                              FeatureSpec("a", "sparse", num_embeddings=20, embedding_dim=8),
                              FeatureSpec("b", "sparse", num_embeddings=30, embedding_dim=8)],
                    labels=[LabelSpec("label")])
    w_a = rng.normal(0, 1.5, 20)
    with DatasetWriter(out, row_group_rows=None) as writer:
        for split, n in (("train", 512), ("valid", 200), ("test", TEST_ROWS)):
            dense = rng.normal(0, 1, (n, 2)).astype(np.float32)
            a, b = rng.integers(0, 20, n), rng.integers(0, 30, n)
            p = 1 / (1 + np.exp(-(w_a[a] + dense[:, 0])))
            writer.write(split, pa.table({
                "d0": dense[:, 0], "d1": dense[:, 1],
                "a": single_id_column(a), "b": single_id_column(b),
                "label": (rng.random(n) < p).astype(np.float32)}))
        writer.finish(schema, {"generator": "test_eval_exact"})


def _train(ctx: DistContext, runs: List[List[str]]) -> List[Dict[str, Any]]:
    from trainer.config import load_config
    from trainer.trainer import train

    out = []
    for config, *overrides in runs:
        out.append(train(load_config(os.path.join(REPO, config), overrides)))
    return out


def _ctr_run(data: str, tmp: str, world: int) -> List[str]:
    common = ["launch/configs/deepfm_synthetic.toml", f"--data.path={data}",
              "--data.batch_size=128", "--training.steps=3", "--training.log_every=1",
              f"--training.run_dir={tmp}/ctr{world}", "--model.args.embedding_dim=8"]
    if world == 1:
        return common + [f"--checkpoint.dir={tmp}/ctr_ckpt"]
    # Evaluate the 1-rank model: resume its last checkpoint (resharded; the planner may shard
    # small tables otherwise, so weights only), train no further.
    return common + [f"--checkpoint.resume_from={tmp}/ctr_ckpt/step_00000003",
                     "--checkpoint.reset_optimizer=true",
                     "--checkpoint.save_at_end=false"]


def _seq_run(data: str, tmp: str, world: int) -> List[str]:
    common = ["launch/configs/sasrec_synthetic.toml", f"--data.path={data}",
              "--data.batch_size=32", "--training.steps=2", "--training.log_every=1",
              f"--training.run_dir={tmp}/seq{world}"]
    if world == 1:
        return common + ["--data.eval_batch_size=256", f"--checkpoint.dir={tmp}/seq_ckpt"]
    return common + ["--data.eval_batch_size=20", "--checkpoint.save_at_end=false",
                     "--checkpoint.reset_optimizer=true",
                     f"--checkpoint.resume_from={tmp}/seq_ckpt/step_00000002"]


def test_eval_counts_every_row_once_on_1_2_3_ranks(tmp_path, tiny_nextitem: str) -> None:
    from trainer.export import export_checkpoint
    from trainer.predict import predict

    data, tmp = str(tmp_path / "ctr"), str(tmp_path)
    _ctr_dataset(data)
    finals = {}
    for world in (1, 2, 3):
        runs = [_ctr_run(data, tmp, world), _seq_run(tiny_nextitem, tmp, world)]
        finals[world] = run_ranks(_train, world, runs, timeout_s=600)[0]
    # Brute force: the exported 1-rank model scores every test row in one process.
    export_checkpoint(f"{tmp}/ctr_ckpt/step_00000003", f"{tmp}/export")
    scores = predict(f"{tmp}/export", data, "test", batch_size=TEST_ROWS)
    assert len(scores["sample_id"]) == TEST_ROWS
    auc, loss = roc_auc(scores["score"], scores["label"]), log_loss(scores["score"],
                                                                    scores["label"])
    assert 0.6 < auc < 1.0
    seq_ref = finals[1][1]
    assert seq_ref["eval_users"] == 256 and 0 < seq_ref["ndcg@10"] <= seq_ref["hr@10"] < 1
    for world, (ctr, seq) in finals.items():
        assert ctr["eval_rows"] == TEST_ROWS, (world, ctr)
        assert abs(ctr["auc"] - auc) < 1e-5, (world, ctr["auc"], auc)
        assert abs(ctr["logloss"] - loss) < 1e-5, (world, ctr["logloss"], loss)
        assert seq["eval_users"] == 256, (world, seq)
        for key in ("hr@10", "ndcg@10", "mrr"):
            assert abs(seq[key] - seq_ref[key]) < 1e-9, (world, key, seq[key], seq_ref[key])
