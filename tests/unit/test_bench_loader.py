"""``python -m bench.loader --quick`` runs end to end and reports finite positive rates
(a smoke test: no timing thresholds on a shared CI machine)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_loader_bench_quick(tmp_path) -> None:
    out = tmp_path / "bench.json"
    # A subprocess: the bench initialises a (1-rank gloo) process group of its own.
    proc = subprocess.run([sys.executable, "-m", "bench.loader", "--quick", "--json", str(out)],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loader samples/s/core" in proc.stdout
    results = json.loads(out.read_text())["results"]
    assert [r["schema"] for r in results] == ["criteo-like", "sequence"]
    for r in results:
        for key in ("loader_samples_per_s_per_core", "deepfm_train_samples_per_s_per_core",
                    "ratio"):
            assert math.isfinite(r[key]) and r[key] > 0, r
