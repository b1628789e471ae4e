"""End to end under torchrun: 2 gloo ranks train DeepFM on the CI-sized synthetic set and
reach an eval AUC within 0.03 of the dataset's oracle; the run leaves its records behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.integration.runner import parse_final, run_trainer

pytestmark = pytest.mark.slow


def test_two_rank_training_reaches_oracle(repo_root: str, ci_ctr: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    run_dir = str(tmp_path / "run")
    proc = run_trainer(repo_root, 2, [
        "--config", "launch/configs/deepfm_synthetic.toml",
        f"--data.path={ci_ctr}", "--data.batch_size=512", "--training.epochs=2",
        "--training.eval_every=200", "--training.log_every=100",
        f"--training.run_dir={run_dir}",
    ])
    assert proc.returncode == 0, proc.stderr[-5000:]
    final = parse_final(proc.stdout)
    assert set(final) >= {"auc", "oracle_auc", "logloss", "examples_per_s"}
    assert final["oracle_auc"] - final["auc"] <= 0.03, final
    # The run directory: resolved config, metrics records (train, eval, final), rank-0 log.
    records = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    splits = {r["split"] for r in records}
    assert {"train", "eval", "final"} <= splits
    assert records[-1]["auc"] == pytest.approx(final["auc"], abs=1e-5)
    assert "batch_size = 512" in open(os.path.join(run_dir, "config.toml")).read()
    assert "step 100/" in open(os.path.join(run_dir, "train.log")).read()


def test_bad_config_fails_before_any_work(repo_root: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "--config", "launch/configs/deepfm_synthetic.toml",
         "--training.stepz=3", f"--training.run_dir={tmp_path / 'r'}"],
        cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown key 'training.stepz'" in proc.stderr
    assert not os.path.exists(tmp_path / "r")  # nothing written


def test_single_process_same_code_path(repo_root: str, tiny_ctr: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "--config", "launch/configs/deepfm_synthetic.toml",
         f"--data.path={tiny_ctr}", "--data.batch_size=256", "--training.steps=10",
         f"--training.run_dir={tmp_path / 'r'}"],
        cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = parse_final(proc.stdout)
    assert final["steps"] == 10 and 0.0 < final["auc"] <= 1.0
