"""Learning runs of the shipped multi-task configs through the trainer's ``train()`` on 2
gloo ranks: MMoE and PLE approach each task's oracle AUC on ``data.synth ctr2 --preset ci``;
ESMM's CVR, evaluated over the whole impression space, against a CVR model trained on
clicked rows only, on ESMM's data-sparsity setting (``--preset esmm_ci``).

The five runs share ONE 2-rank spawn (``sharding.spawn.run_ranks``) and its process group,
so the suite pays for process start-up and the torchrec imports once, not once per
``torchrun``; ``python -m trainer`` under ``torchrun`` is covered by the other
integration tests, and ``train()`` is what it runs. (MMoE on converted MovieLens like/love
data is checked in-process by ``tests/unit/test_multitask_movielens.py``.)

Measured numbers are in the README's "Multi-task heads" section.
"""

from __future__ import annotations

import os
from typing import Dict, List, Tuple

import pytest

from sharding.dist import DistContext
from sharding.spawn import run_ranks

pytestmark = pytest.mark.slow

# The naive CVR model: the same backbone and the same tower as ESMM's CVR tower
# ([64, 32] on the DCN-v2 representation, no shared bottom), one task whose loss (and
# metrics) keep clicked rows only, evaluated like ESMM's pCVR against would_convert.
NAIVE_CVR = ['--model.args.tasks=["conversion"]', "--model.args.bottom_dims=[]",
             "--model.args.tower_dims=[64, 32]",
             "--model.args.loss_weights={conversion = 1.0}",
             '--model.args.loss_given={conversion = "click"}',
             '--model.args.eval_labels={conversion = "would_convert"}']

# name → (config, dataset fixture, overrides). ESMM and the naive model: the same rows seen
# (two epochs of the 100k-row set), the same optimizers and learning rates.
RUNS: Dict[str, Tuple[str, str, List[str]]] = {
    "mmoe": ("mmoe_synthetic", "ci_ctr2", ["--training.epochs=1"]),
    "ple": ("ple_synthetic", "ci_ctr2", ["--training.epochs=1"]),
    "esmm": ("esmm_synthetic", "esmm_ctr2", ["--training.epochs=2"]),
    "naive_cvr": ("shared_bottom_synthetic", "esmm_ctr2", ["--training.epochs=2", *NAIVE_CVR]),
    # The naive model overfits its clicked rows in the second epoch: its best is one epoch.
    "naive_cvr_1_epoch": ("shared_bottom_synthetic", "esmm_ctr2",
                          ["--training.epochs=1", *NAIVE_CVR]),
}


def _train_all(ctx: DistContext, repo_root: str, runs: List[Tuple[str, str, List[str]]],
               run_root: str) -> List[Dict[str, float]]:
    """On each rank: ``train()`` every run in turn on the spawn's process group; returns their
    final metrics.

    ``train()`` joins the group the spawn's worker created and, not having created it,
    leaves it for the next run (the worker destroys it at the end). Only rank 0 computes
    the final metrics (the other ranks' values are None).
    """
    import torch.distributed as dist

    from trainer.config import load_config
    from trainer.trainer import train

    os.chdir(repo_root)  # the configs' relative paths
    finals = []
    for i, (config, data, extra) in enumerate(runs):
        cfg = load_config(f"launch/configs/{config}.toml",
                          [f"--data.path={data}", "--training.log_every=100",
                           f"--training.run_dir={run_root}/{i}",
                           "--checkpoint.save_at_end=false", *extra])
        final = train(cfg)
        # The caller's group survives the run (train() destroys only a group it created).
        assert dist.is_initialized(), f"train() destroyed the caller's process group ({config})"
        finals.append({k: float(v) for k, v in final.items() if v is not None})
    return finals


@pytest.fixture(scope="module")
def finals(repo_root: str, ci_ctr2: str, esmm_ctr2: str,
           tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Dict[str, float]]:
    data = {"ci_ctr2": ci_ctr2, "esmm_ctr2": esmm_ctr2}
    runs = [(config, data[d], extra) for config, d, extra in RUNS.values()]
    run_root = str(tmp_path_factory.mktemp("runs"))
    ranks = run_ranks(_train_all, 2, repo_root, runs, run_root, timeout_s=900,
                      cpu_threads=None)
    by_name = dict(zip(RUNS, ranks[0]))
    print(by_name)  # the measured numbers, visible with pytest -s
    return by_name


# Allowed gap to each task's oracle AUC after ONE epoch. The 0.03 target is met after 2
# epochs by MMoE (click 0.029, conversion 0.021) and nearly by PLE (click 0.032, conversion
# 0.021) — single-task DCN-v2 sits at 0.028 there too — but two epochs of both cost more CI
# time than the suite allows; after one epoch MMoE measured click 0.037, conversion 0.024,
# and PLE 0.038 / 0.024, so the asserted bound is 0.045.
@pytest.mark.parametrize("name,gap", [("mmoe", 0.045), ("ple", 0.045)])
def test_mmoe_and_ple_approach_every_oracle(finals: Dict[str, Dict[str, float]], name: str,
                                            gap: float) -> None:
    final = finals[name]
    for task in ("click", "conversion"):
        assert final[f"oracle_auc_{task}"] - final[f"auc_{task}"] <= gap, (task, final)
    assert final["examples_per_s"] > 0


def test_esmm_cvr_against_a_cvr_model_trained_on_clicked_rows(
        finals: Dict[str, Dict[str, float]]) -> None:
    """ESMM's pCVR has no loss of its own, yet ranks would-be conversions over the whole
    impression space; compared with the naive CVR model (:data:`NAIVE_CVR`), evaluated
    against the same counterfactual label, after the same rows.

    On ``esmm_ci`` (clicks rare, ids heavy-tailed, conversion driven by the click model's
    structure), measured: after two epochs each, ESMM's pCVR 0.787 and the naive model 0.744
    (oracle 0.913; ESMM's pCTCVR 0.822, oracle 0.917); the naive model's best is after ONE
    epoch, 0.768, which ESMM's two-epoch pCVR still beats by 0.019 (with data seed 1: 0.765
    vs 0.720 and 0.745). The naive model sees only the clicked 28% of the rows, so rarely
    clicked ids barely train and the rest overfit; ESMM's shared embeddings learn the same
    structure from every impression through pCTR. After one epoch ESMM's pCVR is not there
    yet (0.748): it is pinned down only through pCTCVR once pCTR is. The margins asserted
    are about half the measured ones. (On the default ``ci`` data, where conversion has
    much signal of its own, the naive model wins: README, "Multi-task heads".)
    """
    esmm, naive, naive_1 = finals["esmm"], finals["naive_cvr"], finals["naive_cvr_1_epoch"]
    assert esmm["oracle_auc_cvr"] == naive["oracle_auc_conversion"]  # the same target
    assert esmm["auc_cvr"] - naive["auc_conversion"] >= 0.02, (esmm, naive)
    assert esmm["auc_cvr"] - naive_1["auc_conversion"] >= 0.01, (esmm, naive_1)
    assert esmm["auc_cvr"] >= 0.75, esmm  # learnt through pCTCVR = pCTR x pCVR only
    assert esmm["auc_conversion"] >= 0.80, esmm  # pCTCVR against conversions
