"""Learning runs of the shipped multi-task configs through the trainer's ``train()`` on 2
gloo ranks: MMoE and PLE approach each task's oracle AUC on ``data.synth ctr2 --preset ci``;
ESMM's CVR, evaluated over the whole impression space, against a CVR model trained on
clicked rows only, on ESMM's data-sparsity setting (``--preset esmm_ci``); the sharded MMoE
checkpoint exported and scored by ``trainer.predict`` in one process.

The four runs share ONE 2-rank spawn (``launch.spawn.run_ranks``) and its process group
(``train()`` leaves a group it did not create), so the suite pays for process start-up and
the torchrec imports once, not once per ``torchrun``; ``python -m trainer`` under
``torchrun`` is covered by the other integration tests, and ``train()`` is what it runs.
(MMoE on converted MovieLens like/love data is checked in-process by
``tests/unit/test_multitask_movielens.py``.)

Measured numbers are in docs/results/multitask.md.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Tuple

import pytest

from launch.spawn import run_ranks
from tests.integration.runner import train_in_turn

pytestmark = pytest.mark.slow

# The naive CVR model: the same backbone and the same tower as ESMM's CVR tower
# ([64, 32] on the DCN-v2 representation, no shared bottom), one task whose loss (and
# metrics) keep clicked rows only, evaluated like ESMM's pCVR against would_convert.
NAIVE_CVR = ['--model.args.tasks=["conversion"]', "--model.args.bottom_dims=[]",
             "--model.args.tower_dims=[64, 32]",
             "--model.args.loss_weights={conversion = 1.0}",
             '--model.args.loss_given={conversion = "click"}',
             '--model.args.eval_labels={conversion = "would_convert"}']

# Rows per rank per evaluation batch of the ``ci`` runs: fewer, larger steps than the
# configs' 512 evaluate the same 49,152 of the 50,000 eval rows faster (both leave out only
# the split's last, short row group). (On ``esmm_ci`` they would leave out more rows.)
EVAL_BATCH = 4096
CI_EVAL = [f"--data.eval_batch_size={EVAL_BATCH}"]

# name → (config, dataset fixture, overrides). ESMM and the naive model: the same rows seen
# (two epochs of the 100k-row set), the same optimizers and learning rates. The naive
# model overfits its clicked rows in the second epoch, so its best is after one epoch: its
# run also evaluates there (``eval_every`` = one epoch's steps, set in :func:`finals`), which
# costs one evaluation instead of a second, one-epoch run (the first epoch of a two-epoch run
# is the one-epoch run: same seed, same batches).
RUNS: Dict[str, Tuple[str, str, List[str]]] = {
    # MMoE keeps its final checkpoint for the export test.
    "mmoe": ("mmoe_synthetic", "ci_ctr2", ["--checkpoint.save_at_end=true", *CI_EVAL]),
    # PLE its shipped two epochs too (see below).
    "ple": ("ple_synthetic", "ci_ctr2", [*CI_EVAL]),
    "esmm": ("esmm_synthetic", "esmm_ctr2", ["--training.epochs=2"]),
    "naive_cvr": ("shared_bottom_synthetic", "esmm_ctr2", ["--training.epochs=2", *NAIVE_CVR]),
}


@pytest.fixture(scope="module")
def run_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Each run's directory is ``run_root/<name>``."""
    return str(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def finals(repo_root: str, ci_ctr2: str, esmm_ctr2: str,
           run_root: str) -> Dict[str, Dict[str, float]]:
    """Each run's final metrics by name, plus ``naive_cvr_1_epoch``: the naive model's
    evaluation after its first epoch."""
    from data.reader import ParquetReader
    from trainer.config import load_config

    data = {"ci_ctr2": ci_ctr2, "esmm_ctr2": esmm_ctr2}
    naive_batch = load_config(os.path.join(repo_root, "launch/configs",
                                           f"{RUNS['naive_cvr'][0]}.toml")).data.batch_size
    epoch_steps = len(ParquetReader(esmm_ctr2, "train", naive_batch, rank=0, world_size=2,
                                    prefetch=0, validate=False))
    extra = {"naive_cvr": [f"--training.eval_every={epoch_steps}"]}
    runs = [(name, config, [f"--data.path={data[d]}", *args, *extra.get(name, [])])
            for name, (config, d, args) in RUNS.items()]
    ranks = run_ranks(train_in_turn, 2, repo_root, runs, run_root, timeout_s=900,
                      cpu_threads=None)
    by_name = dict(zip(RUNS, ranks[0]))
    with open(os.path.join(run_root, "naive_cvr", "metrics.jsonl")) as fh:
        evals = [r for r in map(json.loads, fh) if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [epoch_steps], evals
    by_name["naive_cvr_1_epoch"] = {k: float(v) for k, v in evals[0].items()
                                    if isinstance(v, (int, float))}
    print(by_name)  # the measured numbers, visible with pytest -s
    return by_name


# Allowed gap to each task's oracle AUC. MMoE, its shipped two epochs (DeepFM backbone with
# field_scale 4): measured click 0.022 / 0.023 / 0.023, conversion 0.015 / 0.015 / 0.016
# (data seed 0 with training seeds 0 / 1, data seed 1), so the spec's 0.03 is asserted. PLE
# (128-wide experts) reaches click 0.027 / 0.025 / 0.027, conversion 0.016-0.018 after its
# shipped two epochs (the runs are deterministic on this machine: the CI run is data seed 0,
# training seed 0, click 0.027), so both assert the spec's 0.03. After one epoch PLE is at
# click 0.036: two epochs are needed (the suite, ~10 min of its 15, affords the ~12 s).
@pytest.mark.parametrize("name,gap", [("mmoe", 0.03), ("ple", 0.03)])
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
    much signal of its own, the naive model wins: docs/multitask.md.)
    """
    esmm, naive, naive_1 = finals["esmm"], finals["naive_cvr"], finals["naive_cvr_1_epoch"]
    assert esmm["oracle_auc_cvr"] == naive["oracle_auc_conversion"]  # the same target
    assert esmm["auc_cvr"] - naive["auc_conversion"] >= 0.02, (esmm, naive)
    assert esmm["auc_cvr"] - naive_1["auc_conversion"] >= 0.01, (esmm, naive_1)
    assert esmm["auc_cvr"] >= 0.75, esmm  # learnt through pCTCVR = pCTR x pCVR only
    assert esmm["auc_conversion"] >= 0.80, esmm  # pCTCVR against conversions


def test_exported_mmoe_scores_what_the_sharded_run_evaluated(
        finals: Dict[str, Dict[str, float]], run_root: str, ci_ctr2: str,
        tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``trainer.export`` of the MMoE run's final (2-rank, sharded) checkpoint, then
    ``trainer.predict`` in this one process with no process group: each task's score
    column gives, over every eval row, the run's AUC and log-loss."""
    from data.metrics import log_loss, roc_auc
    from trainer.checkpoint import find_latest
    from trainer.export import export_checkpoint
    from trainer.predict import predict

    ckpt = find_latest(os.path.join(run_root, "mmoe", "checkpoints"))
    assert ckpt, "the MMoE run saved no checkpoint"
    out = str(tmp_path / "export")
    assert export_checkpoint(ckpt, out)["model"] == "mmoe"
    scores = predict(out, ci_ctr2)
    assert len(scores["sample_id"]) == 50_000  # every eval row, once
    # The run's final evaluation also saw every eval row exactly once (pad + mask).
    final = finals["mmoe"]
    assert final["eval_rows"] == 50_000
    for task in ("click", "conversion"):
        s, y = scores[f"score_{task}"], scores[f"label_{task}"]
        assert roc_auc(s, y) == pytest.approx(final[f"auc_{task}"], abs=1e-5), task
        assert log_loss(s, y) == pytest.approx(final[f"logloss_{task}"], abs=1e-5), task
