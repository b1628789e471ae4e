"""MIND beats two_tower on the multi-interest synthetic preset (2 gloo ranks, shipped configs).

``data.synth retrieval --preset multi`` plants three interests per user (each a shared
prototype plus noise); a single vector per user holds 0.32 of the top-50's probability mass
there, one vector per interest 0.57 (the oracle's 0.58; ``meta.json``). Both models train
with their shipped configs — the same profile (``segment``), item tower (id + ``category`` +
``brand``), loss, negatives and optimizers — for 3 of the configs' 5 epochs; MIND
(``mind_synthetic.toml``: K = 4, spread routing, label-aware attention towards every
candidate) must retrieve more test positives in its top 50 than ``two_tower``.

The two trainings share ONE 2-rank spawn (``launch.spawn.run_ranks``) calling ``train()`` in
turn, as ``test_train_zoo.py`` does.

Measured 2026-12-02, 2 ranks, 3 epochs (data seeds 0 / 1, oracle recall@50 0.572 / 0.563):
two_tower 0.443 / 0.418, MIND 0.477 / 0.451 (gaps +0.034 / +0.033; after 5 epochs 0.453 vs
0.484 and 0.427 vs 0.469). With the paper's label-aware attention (towards the positive
only) MIND stays below two_tower (docs/retrieval.md). The test uses seed 0 and asserts a gap
of at least 0.02 and MIND at 0.80 of the oracle (measured 0.833).
"""

from __future__ import annotations

import os
from typing import Dict, List, Tuple

import pytest

from data.synth.retrieval import RETRIEVAL_PRESETS, RetrievalSynthArgs, generate_retrieval
from launch.spawn import run_ranks
from sharding.dist import DistContext

pytestmark = pytest.mark.slow

EPOCHS = 3
MIN_GAP = 0.02  # MIND − two_tower recall@50: measured 0.034 (seed 0), 0.033 (seed 1)
MIN_ORACLE_FRACTION = 0.80  # MIND recall@50 / oracle: measured 0.833 (seed 0), 0.801 (seed 1)


def _train_both(ctx: DistContext, repo_root: str, runs: List[Tuple[str, List[str]]],
                run_root: str) -> List[Dict[str, float]]:
    """On each rank: ``train()`` each config in turn on the spawn's process group; their final
    metrics (rank 0's hold the values)."""
    from trainer.config import load_config
    from trainer.trainer import train

    os.chdir(repo_root)  # the configs' relative paths
    finals = []
    for config, extra in runs:
        cfg = load_config(f"launch/configs/{config}.toml",
                          ["--training.log_every=100", f"--training.run_dir={run_root}/{config}",
                           "--checkpoint.save_at_end=false", *extra])
        final = train(cfg)
        finals.append({k: float(v) for k, v in final.items() if v is not None})
    return finals


def test_mind_beats_two_tower_on_multi_interest_preset(repo_root: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = str(tmp_path / "multi")
    generate_retrieval(data, RetrievalSynthArgs(**RETRIEVAL_PRESETS["multi"]),  # type: ignore
                       progress=False)
    extra = [f"--data.path={data}", f"--training.epochs={EPOCHS}"]
    runs = [("two_tower_synthetic", extra), ("mind_synthetic", extra)]
    ranks = run_ranks(_train_both, 2, repo_root, runs, str(tmp_path / "runs"),
                      timeout_s=1200, cpu_threads=None)
    two_tower, mind = ranks[0]
    print({"two_tower": two_tower, "mind": mind})  # the measured numbers, with pytest -s
    for final in (two_tower, mind):
        assert final["eval_users"] == 3000, final
        assert final["oracle_recall@50"] == mind["oracle_recall@50"], (two_tower, mind)
    assert mind["recall@50"] - two_tower["recall@50"] >= MIN_GAP, (mind, two_tower)
    assert mind["recall@50"] >= MIN_ORACLE_FRACTION * mind["oracle_recall@50"], mind
