"""End to end under torchrun (2 gloo ranks) with the shipped synthetic configs, run in full
(16 epochs, 352 steps each): HSTU and SASRec train on the CI-sized next-item set
(``data.synth seq --preset ci``: a cluster Markov chain in sessions, where the first step
after a break returns to the previous cluster; oracle HR@10 0.669, time-blind oracle 0.541),
end with the sequential ``final`` line, and:

* HSTU reaches the oracle HR@10 within 10% (relative) — the issue's bar — and its NDCG@10
  the oracle's NDCG@10 within 12%;
* HSTU beats the best model blind to time (its time-gap bias sees the breaks), and SASRec,
  which has no timestamps, stays at or below that time-blind ceiling;
* so HSTU beats SASRec by a wide margin.

Measured on a quiet 2-core CPU (2026-11-22): HSTU 0.644 HR@10 (0.96 of the oracle; 0.632-
0.638 on training seeds 1-2), NDCG@10 0.395 (0.92 of the oracle's 0.427; 0.91-0.93), SASRec 0.506-0.509, HSTU without its time bias 0.507; ~55 s
and ~40 s wall time. docs/hstu.md has the table.
"""

from __future__ import annotations

from typing import Dict

import pytest

from tests.integration.runner import parse_final, run_trainer

pytestmark = pytest.mark.slow

# HSTU / oracle (measured 0.93-0.96 over training seeds), HSTU over the time-blind oracle
# (measured +0.09-0.10), SASRec at most the time-blind oracle plus noise (measured -0.03;
# the standard error of a HR@10 on 5,632 users is ~0.007), HSTU − SASRec (measured 0.12-0.14).
HR_BOUND = 0.90
NDCG_BOUND = 0.88  # NDCG / oracle NDCG measured 0.91-0.93
OVER_BLIND = 0.04
BLIND_SLACK = 0.02
MARGIN = 0.08


def _train(repo_root: str, config: str, data: str, run_dir: str) -> Dict[str, float]:
    proc = run_trainer(repo_root, 2, ["--config", f"launch/configs/{config}.toml",
                                      f"--data.path={data}", f"--training.run_dir={run_dir}"],
                       timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    final = parse_final(proc.stdout)
    assert set(final) >= {"hr@10", "ndcg@10", "mrr", "examples_per_s", "oracle_hr@10",
                          "oracle_ndcg@10", "time_blind_oracle_hr@10", "sampled_hr@10",
                          "sampled_ndcg@10"}, final
    assert 0.0 < final["sampled_ndcg@10"] <= final["sampled_hr@10"] <= 1.0, final
    assert final["steps"] == 352, final  # the shipped 16 epochs
    return final


def test_hstu_approaches_oracle_and_beats_sasrec(repo_root: str, ci_nextitem: str,
                                                 tmp_path) -> None:  # type: ignore[no-untyped-def]
    hstu = _train(repo_root, "hstu_synthetic", ci_nextitem, str(tmp_path / "hstu"))
    sasrec = _train(repo_root, "sasrec_synthetic", ci_nextitem, str(tmp_path / "sasrec"))
    blind = hstu["time_blind_oracle_hr@10"]
    assert hstu["hr@10"] >= HR_BOUND * hstu["oracle_hr@10"], hstu
    assert hstu["ndcg@10"] >= NDCG_BOUND * hstu["oracle_ndcg@10"], hstu
    assert 0.0 < hstu["ndcg@10"] <= hstu["hr@10"] and 0.0 < hstu["mrr"] < 1.0, hstu
    assert hstu["hr@10"] >= blind + OVER_BLIND, hstu
    assert sasrec["hr@10"] <= blind + BLIND_SLACK, sasrec
    assert hstu["hr@10"] - sasrec["hr@10"] >= MARGIN, (hstu, sasrec)
