"""Learning runs of the shipped zoo configs on 2 gloo ranks: DCN-v2, AutoInt+, Wide&Deep, DCN,
xDeepFM and MaskNet reach the CI-sized synthetic set's oracle within 0.03, and on the
sequence-signal set InterFormer, DIN and DIEN do too and beat the pooled-only DeepFM by a
clear margin.

The ten runs share ONE 2-rank spawn (``launch.spawn.run_ranks``) and its process group, as in
``test_train_multitask.py``: ``train()`` is what ``python -m trainer`` runs under torchrun
(covered by the other integration tests), and the suite pays for process start-up and the
torchrec imports once instead of ten times. The runs use one intra-op thread per rank, as
torchrun does on this 2-core machine, so their numbers are the torchrun runs' numbers.

Measured on a shared 2-core CPU (see docs/results/models.md): on ``ctr --preset ci``
(oracle 0.869) DCN-v2 (full, 2 epochs) 0.841; AutoInt+ (2 epochs) 0.843-0.844. On
``ctr_seq --preset ci`` (oracle 0.770) after one epoch InterFormer 0.743-0.744 vs DeepFM 0.657
(DCN-v2 0.658).
"""

from __future__ import annotations

from typing import Dict, Tuple

import pytest

from launch.spawn import run_ranks
from tests.integration.runner import train_in_turn

pytestmark = pytest.mark.slow

# name → (config, dataset fixture, epochs, per-rank batch size). The pooled models at batch
# 512 (their configs ship 1024 for the full-size set), the sequence models at 256.
RUNS: Dict[str, Tuple[str, str, int, int]] = {
    "dcn_v2_synthetic": ("dcn_v2_synthetic", "ci_ctr", 2, 512),
    "autoint_synthetic": ("autoint_synthetic", "ci_ctr", 2, 512),
    "wide_deep_synthetic": ("wide_deep_synthetic", "ci_ctr", 2, 512),
    "xdeepfm_synthetic": ("xdeepfm_synthetic", "ci_ctr", 1, 512),
    "masknet_synthetic": ("masknet_synthetic", "ci_ctr", 2, 512),
    "dcn_synthetic": ("dcn_synthetic", "ci_ctr", 3, 512),
    "deepfm_seq": ("deepfm_synthetic", "ci_seq", 1, 512),
    "interformer_synthetic": ("interformer_synthetic", "ci_seq", 1, 256),
    "din_synthetic": ("din_synthetic", "ci_seq", 2, 256),
    "dien_synthetic": ("dien_synthetic", "ci_seq", 2, 256),
}


@pytest.fixture(scope="module")
def finals(repo_root: str, ci_ctr: str, ci_seq: str,
           tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Dict[str, float]]:
    """Each run's final metrics by name."""
    data = {"ci_ctr": ci_ctr, "ci_seq": ci_seq}
    runs = [(name, config, [f"--data.path={data[d]}", f"--data.batch_size={batch}",
                            f"--training.epochs={epochs}"])
            for name, (config, d, epochs, batch) in RUNS.items()]
    ranks = run_ranks(train_in_turn, 2, repo_root, runs, str(tmp_path_factory.mktemp("zoo")),
                      timeout_s=2400, cpu_threads=None)
    by_name = dict(zip(RUNS, ranks[0]))
    for name, final in by_name.items():
        assert set(final) >= {"auc", "oracle_auc", "logloss", "examples_per_s"}, (name, final)
    print(by_name)  # the measured numbers, visible with pytest -s
    return by_name


# Allowed gap to the oracle AUC, every pooled zoo model with its shipped config at batch 512.
# Measured gaps (seeds 0 / 1 where two are given): DCN-v2 0.027-0.028, AutoInt+
# 0.025-0.026 (2 epochs), Wide&Deep 0.025, MaskNet 0.026 (2 epochs), xDeepFM 0.018 (1 epoch),
# DCN (v1) 0.024 / 0.026 after 3 epochs (its rank-1 cross layers leave the field x field
# term to its MLP, which needs the third epoch: 0.029 / 0.032 after 2). A run with the same
# seed, code and machine repeats to the last digit, so the margin guards against seed and
# library drift, not run noise.
@pytest.mark.parametrize("name", ["dcn_v2_synthetic", "autoint_synthetic",
                                  "wide_deep_synthetic", "xdeepfm_synthetic",
                                  "masknet_synthetic", "dcn_synthetic"])
def test_pooled_models_approach_oracle(finals: Dict[str, Dict[str, float]], name: str) -> None:
    final = finals[name]
    assert final["oracle_auc"] - final["auc"] <= 0.03, final


# Sequence models against the pooled-only DeepFM (it stands for every pooled model here:
# DCN-v2 scored the same, 0.657-0.658 vs 0.657; whatever their capacity they cannot see the
# history, ~0.11 below the oracle). Measured: InterFormer (1 epoch) 0.743-0.744, gap
# 0.027-0.028, margin ~0.085; DIN (recency-aware target attention, 2 epochs) 0.751 / 0.750
# (gaps 0.019 / 0.021); DIEN (AIGRU interest evolution, 2 epochs) 0.755 / 0.748 (gaps 0.015 /
# 0.023; with the paper's AUGRU 0.731, see models/dien.py); seeds 0 / 1.
@pytest.mark.parametrize("name", ["interformer_synthetic", "din_synthetic", "dien_synthetic"])
def test_sequence_models_use_the_sequence_signal(finals: Dict[str, Dict[str, float]],
                                                 name: str) -> None:
    final, deepfm = finals[name], finals["deepfm_seq"]
    assert final["auc"] - deepfm["auc"] >= 0.05, (final, deepfm)
    assert final["oracle_auc"] - final["auc"] <= 0.03, final
