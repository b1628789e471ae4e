"""End to end under torchrun (2 gloo ranks) with the shipped synthetic configs: HSTU and
SASRec train on the CI-sized next-item set (``data.synth seq --preset ci``, oracle HR@10
0.655), end with the sequential ``final`` line, approach the oracle, and HSTU beats SASRec.

CI budget: 3 of the configs' 12 epochs (66 steps per run). Measured on the shared 2-core CPU
at that budget: HSTU HR@10 0.513 (0.78 of the oracle), SASRec 0.427 — a 0.086 gap; HSTU
~1.6 min, SASRec ~1.1 min wall time under load. The 10%-of-oracle target is reached only by
the full 12 epochs (HSTU 0.613 = 0.935 of the oracle, SASRec 0.603; ~4.5 and ~2 min), too
long for this suite; the README's HSTU section lists the numbers.
"""

from __future__ import annotations

from typing import Dict

import pytest

from tests.integration.runner import parse_final, run_trainer

pytestmark = pytest.mark.slow

# At 3 epochs: hr@10 / oracle_hr@10 asserted for HSTU (measured 0.78) and the HSTU − SASRec
# HR@10 gap asserted (measured 0.086).
EPOCHS = 3
HR_BOUND = 0.70
MARGIN = 0.04


def _train(repo_root: str, config: str, data: str, run_dir: str) -> Dict[str, float]:
    proc = run_trainer(repo_root, 2, ["--config", f"launch/configs/{config}.toml",
                                      f"--data.path={data}", f"--training.run_dir={run_dir}",
                                      f"--training.epochs={EPOCHS}"],
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
