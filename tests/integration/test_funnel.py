"""Funnel smoke test on the tiny retrieval set: the ranker's CTR data, a ranker (DeepFM) and
``two_tower`` trained a few steps by the real trainer, both exported, then
``trainer.funnel evaluate``. With K = every item, re-ranking the retrieved set is ranking all
items: the funnel's NDCG@10 must equal the ranker's over all items and recall@K be 1
(smaller K: docs/retrieval.md, "Funnel")."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

from tests.integration.runner import parse_final

pytestmark = pytest.mark.slow


def _py(repo_root: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=repo_root, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": repo_root})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_funnel_smoke(repo_root: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    data, rank = str(tmp_path / "ret"), str(tmp_path / "rank")
    _py(repo_root, "-m", "data.synth", "retrieval", "--out", data, "--preset", "tiny")
    _py(repo_root, "-m", "trainer.funnel", "ranking-data", "--data", data, "--out", rank)
    for config, path, name, batch in (("funnel_ranker_synthetic", rank, "ranker", 128),
                                      ("two_tower_synthetic", data, "retrieval", 64)):
        _py(repo_root, "-m", "trainer", "--config", f"launch/configs/{config}.toml",
            f"--data.path={path}", f"--data.batch_size={batch}", "--training.steps=20",
            f"--training.run_dir={tmp_path / name}")
    ckpt = {n: sorted(glob.glob(str(tmp_path / n / "checkpoints" / "step_*")))[-1]
            for n in ("ranker", "retrieval")}
    _py(repo_root, "-m", "trainer.export", "--checkpoint", ckpt["ranker"], "--out",
        str(tmp_path / "ranker_export"), "--format", "weights")
    _py(repo_root, "-m", "trainer.export", "--checkpoint", ckpt["retrieval"],
        "--out", str(tmp_path / "retrieval_export"), "--compile", "none")
    common = ["-m", "trainer.funnel", "evaluate", "--data", data, "--retrieval",
              str(tmp_path / "retrieval_export"), "--ranker", str(tmp_path / "ranker_export")]
    everything = parse_final(_py(repo_root, *common, "--k", "120"))
    assert everything["users"] == 200 and everything["recall@120"] == 1.0, everything
    assert abs(everything["funnel_ndcg@10"] - everything["ranker_ndcg@10"]) < 1e-9, everything
    assert 0.0 < everything["ranker_ndcg@10"] < 1.0, everything
    assert 0.0 <= everything["retrieval_ndcg@10"] <= 1.0, everything
