"""End to end under torchrun (2 gloo ranks) with the shipped configs: DCN-v2, AutoInt+,
Wide&Deep, DCN, xDeepFM and MaskNet reach the CI-sized synthetic set's oracle within 0.03,
and on the sequence-signal set InterFormer, DIN and DIEN do too and beat the pooled-only
DeepFM by a clear margin.

Measured on a shared 2-core CPU (see docs/results/models.md): on ``ctr --preset ci``
(oracle 0.869) DCN-v2 (full, 2 epochs) 0.841; AutoInt+ (2 epochs) 0.843-0.844. On
``ctr_seq --preset ci`` (oracle 0.770) after one epoch InterFormer 0.743-0.744 vs DeepFM 0.657
(DCN-v2 0.658).
"""

from __future__ import annotations

from typing import Dict

import pytest

from tests.integration.runner import parse_final, run_trainer

pytestmark = pytest.mark.slow


def _train(repo_root: str, config: str, data: str, run_dir: str, *extra: str
           ) -> Dict[str, float]:
    proc = run_trainer(repo_root, 2, ["--config", f"launch/configs/{config}.toml",
                                      f"--data.path={data}", "--training.log_every=100",
                                      f"--training.run_dir={run_dir}", *extra])
    assert proc.returncode == 0, proc.stderr[-5000:]
    final = parse_final(proc.stdout)
    assert set(final) >= {"auc", "oracle_auc", "logloss", "examples_per_s"}
    return final


# (config, allowed gap to the oracle AUC); measured gaps 0.027-0.028 (DCN-v2) and
# 0.025-0.026 (AutoInt+, seeds 0 and 1). A run with the same seed, code and machine repeats
# to the last digit, so the margin guards against seed and library drift, not run noise.
@pytest.mark.parametrize("config,gap", [("dcn_v2_synthetic", 0.03),
                                        ("autoint_synthetic", 0.03)])
def test_pooled_models_approach_oracle(repo_root: str, ci_ctr: str, tmp_path, config: str,  # type: ignore[no-untyped-def]
                                       gap: float) -> None:
    final = _train(repo_root, config, ci_ctr, str(tmp_path / "run"), "--data.batch_size=512",
                   "--training.epochs=2")
    assert final["oracle_auc"] - final["auc"] <= gap, final


# The seed zoo's pooled models with their shipped configs (batch 512); measured gaps
# (2026-12-02, seeds 0 / 1 where two are given): Wide&Deep 0.025, MaskNet 0.026, DCN (v1)
# 0.024 / 0.026 after 3 epochs (its rank-1 cross layers leave the field x field term to its
# MLP, which needs the third epoch: 0.029 / 0.032 after 2), xDeepFM 0.018 after 1.
@pytest.mark.parametrize("config,epochs", [("wide_deep_synthetic", 2),
                                           ("xdeepfm_synthetic", 1),
                                           ("masknet_synthetic", 2),
                                           ("dcn_synthetic", 3)])
def test_seed_zoo_pooled_models_approach_oracle(repo_root: str, ci_ctr: str, tmp_path,  # type: ignore[no-untyped-def]
                                                config: str, epochs: int) -> None:
    final = _train(repo_root, config, ci_ctr, str(tmp_path / "run"), "--data.batch_size=512",
                   f"--training.epochs={epochs}")
    assert final["oracle_auc"] - final["auc"] <= 0.03, final


def test_sequence_models_use_the_sequence_signal(repo_root: str, ci_seq: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """InterFormer, DIN and DIEN reach the oracle within 0.03 and beat the pooled-only DeepFM
    (one run each). DeepFM stands for every pooled model here: DCN-v2 scored the same
    (0.657-0.658 vs 0.657), whatever their capacity they cannot see the history."""
    deepfm = _train(repo_root, "deepfm_synthetic", ci_seq, str(tmp_path / "fm"),
                    "--data.batch_size=512", "--training.epochs=1")
    inter = _train(repo_root, "interformer_synthetic", ci_seq, str(tmp_path / "if"),
                   "--data.batch_size=256", "--training.epochs=1")
    # Measured margin ~0.085; DeepFM sits ~0.11 below the oracle, InterFormer 0.027-0.028
    # (seeds 0 and 1).
    assert inter["auc"] - deepfm["auc"] >= 0.05, (inter, deepfm)
    assert inter["oracle_auc"] - inter["auc"] <= 0.03, inter
    # DIN (recency-aware target attention), 2 epochs: measured 0.751 / 0.750 (seeds 0 / 1,
    # gaps 0.019 / 0.021).
    din = _train(repo_root, "din_synthetic", ci_seq, str(tmp_path / "din"),
                 "--data.batch_size=256", "--training.epochs=2")
    assert din["auc"] - deepfm["auc"] >= 0.05, (din, deepfm)
    assert din["oracle_auc"] - din["auc"] <= 0.03, din
    # DIEN (AIGRU interest evolution), 2 epochs: measured 0.755 / 0.748 (seeds 0 / 1, gaps
    # 0.015 / 0.023; with the paper's AUGRU 0.731, see models/dien.py).
    dien = _train(repo_root, "dien_synthetic", ci_seq, str(tmp_path / "dien"),
                  "--data.batch_size=256", "--training.epochs=2")
    assert dien["auc"] - deepfm["auc"] >= 0.05, (dien, deepfm)
    assert dien["oracle_auc"] - dien["auc"] <= 0.03, dien
