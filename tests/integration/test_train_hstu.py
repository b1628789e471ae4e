"""End to end under torchrun (2 gloo ranks) with the shipped synthetic configs: HSTU and
SASRec train on the CI-sized next-item set (``data.synth seq --preset ci``), end with the
sequential ``final`` line, approach the planted oracle's HR@10, and HSTU beats SASRec.

Measured on the shared 2-core CPU (README, HSTU section): see ``HR_BOUND`` and ``MARGIN``.
"""

from __future__ import annotations

from typing import Dict

import pytest

from tests.integration.runner import parse_final, run_trainer

pytestmark = pytest.mark.slow

# hr@10 / oracle_hr@10 the configs' budget reaches at least (measured ratio in the README),
# and the HSTU − SASRec HR@10 gap asserted (measured gap in the README).
HR_BOUND = 0.75
MARGIN = 0.01


def _train(repo_root: str, config: str, data: str, run_dir: str) -> Dict[str, float]:
    proc = run_trainer(repo_root, 2, ["--config", f"launch/configs/{config}.toml",
                                      f"--data.path={data}", f"--training.run_dir={run_dir}"],
                       timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    final = parse_final(proc.stdout)
    assert set(final) >= {"hr@10", "ndcg@10", "mrr", "examples_per_s", "oracle_hr@10"}, final
    return final


def test_hstu_approaches_oracle_and_beats_sasrec(repo_root: str, ci_nextitem: str,
                                                 tmp_path) -> None:  # type: ignore[no-untyped-def]
    hstu = _train(repo_root, "hstu_synthetic", ci_nextitem, str(tmp_path / "hstu"))
    sasrec = _train(repo_root, "sasrec_synthetic", ci_nextitem, str(tmp_path / "sasrec"))
    assert hstu["hr@10"] >= HR_BOUND * hstu["oracle_hr@10"], hstu
    assert 0.0 < hstu["ndcg@10"] <= hstu["hr@10"] and 0.0 < hstu["mrr"] < 1.0, hstu
    assert hstu["hr@10"] - sasrec["hr@10"] >= MARGIN, (hstu, sasrec)
