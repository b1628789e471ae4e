"""End to end under torchrun (2 gloo ranks) with the shipped multi-task configs on the
two-task synthetic set (``data.synth ctr2 --preset ci``): MMoE and PLE approach each task's
oracle AUC; ESMM's CVR, evaluated over the whole impression space, against a CVR model
trained on clicked rows only. (MMoE on converted MovieLens like/love data is checked
in-process by ``tests/unit/test_multitask_movielens.py``.)

One epoch per run keeps the four runs near the time budget of the slow suite.

Measured numbers are in the README's "Multi-task heads" section.
"""

from __future__ import annotations

from typing import Dict

import pytest

from data.synth import PRESETS
from data.synth_multitask import MultiTaskSynthArgs, generate_ctr2
from tests.integration.runner import parse_final, run_trainer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ci_ctr2(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("data") / "ci_ctr2")
    generate_ctr2(out, MultiTaskSynthArgs(**PRESETS["ci"]), progress=False)  # type: ignore[arg-type]
    return out


def _train(repo_root: str, config: str, data: str, run_dir: str, *extra: str
           ) -> Dict[str, float]:
    proc = run_trainer(repo_root, 2, ["--config", f"launch/configs/{config}.toml",
                                      f"--data.path={data}", "--training.log_every=100",
                                      f"--training.run_dir={run_dir}",
                                      "--checkpoint.save_at_end=false", *extra])
    assert proc.returncode == 0, proc.stderr[-5000:]
    final = parse_final(proc.stdout)
    print(config, final)  # the measured numbers, visible with pytest -s
    return final


# (config, allowed gap to each task's oracle AUC) after ONE epoch. The 0.03 target is met
# after 2 epochs by MMoE (click 0.029, conversion 0.021) and nearly by PLE (click 0.032,
# conversion 0.021) — single-task DCN-v2 sits at 0.028 there too — but two epochs of both
# cost more CI time than the suite allows; after one epoch MMoE measured click 0.037,
# conversion 0.024, and PLE 0.038 / 0.024, so the asserted bound is 0.045.
@pytest.mark.parametrize("config,gap", [("mmoe_synthetic", 0.045), ("ple_synthetic", 0.045)])
def test_mmoe_and_ple_approach_every_oracle(repo_root: str, ci_ctr2: str, tmp_path,  # type: ignore[no-untyped-def]
                                            config: str, gap: float) -> None:
    final = _train(repo_root, config, ci_ctr2, str(tmp_path / "run"), "--training.epochs=1")
    for task in ("click", "conversion"):
        assert final[f"oracle_auc_{task}"] - final[f"auc_{task}"] <= gap, (task, final)
    assert final["examples_per_s"] > 0


def test_esmm_cvr_against_a_cvr_model_trained_on_clicked_rows(repo_root: str, ci_ctr2: str,  # type: ignore[no-untyped-def]
                                                              tmp_path) -> None:
    """ESMM's pCVR has no loss of its own, yet ranks would-be conversions over the whole
    impression space; compared with the naive CVR model (the same backbone, one task, its
    loss only on clicked rows), evaluated against the same counterfactual label.

    Measured (README, "Multi-task heads"): ESMM's pCVR did NOT beat the naive model on this
    data — 0.852 vs 0.870 after one epoch (0.858 vs 0.868 after two), and also not with
    rarer clicks (CTR 10% and 5%: 0.822 vs 0.847, 0.790 vs 0.842). The planted conversion model is additive in per-id
    weights, so a model fitted on clicked rows extrapolates well; ESMM's pCVR is only
    determined through pCTR·pCVR and is weakly pinned down where pCTR is small. This test
    therefore asserts the measured relation (ESMM within 0.04 of the naive model), that the
    CVR tower learns through the product alone, and that pCTCVR approaches its oracle.
    """
    short = "--training.epochs=1"
    esmm = _train(repo_root, "esmm_synthetic", ci_ctr2, str(tmp_path / "esmm"), short)
    naive = _train(repo_root, "shared_bottom_synthetic", ci_ctr2, str(tmp_path / "naive"),
                   short, '--model.args.tasks=["conversion"]',
                   "--model.args.loss_weights={conversion = 1.0}",
                   '--model.args.loss_given={conversion = "click"}',
                   '--model.args.eval_labels={conversion = "would_convert"}')
    assert esmm["oracle_auc_cvr"] == naive["oracle_auc_conversion"]  # the same target
    assert esmm["auc_cvr"] >= 0.80, esmm  # learnt through pCTCVR = pCTR x pCVR only
    assert naive["auc_conversion"] - esmm["auc_cvr"] <= 0.04, (esmm, naive)
    assert esmm["oracle_auc_conversion"] - esmm["auc_conversion"] <= 0.04, esmm
