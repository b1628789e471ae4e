"""``python -m bench.hstu_attention --quick`` runs end to end and reports finite numbers
(a smoke test: no timing thresholds on a shared CI machine)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_hstu_bench_quick(tmp_path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "bench.hstu_attention", "--quick", "--json",
                           str(out)], cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ratios: pytorch_jagged vs the others" in proc.stdout
    payload = json.loads(out.read_text())
    assert math.isfinite(payload["matmul_flops"]) and payload["matmul_flops"] > 0
    impls = {(r["workload"], r["impl"]) for r in payload["results"]}
    assert ("longtail-2", "pytorch_padded") in impls and ("longtail-4", "loop") in impls
    for r in payload["results"]:
        for key in ("layer_s", "attention_s", "attention_flops"):
            assert math.isfinite(r[key]) and r[key] > 0, r
        assert math.isfinite(r["peak_bytes"]) and r["peak_bytes"] >= 0, r
    for r in payload["ratios"]:
        assert all(math.isfinite(r[key]) for key in ("speedup", "attn_speedup", "memory_ratio"))
    # The compiled kernel, semi-local at the long workload, and the balanced-batch spreads.
    assert ("longtail-4", "compiled_jagged") in impls and ("long-256", "semi_local") in impls
    assert [g["workload"] for g in payload["compiled_goals"]] == ["longtail-2", "longtail-4"]
    assert {r["vs"] for r in payload["semi_local"]} == {"pytorch_jagged", "compiled_jagged"}
    spread = {r["batches"]: r for r in payload["balance_spread"]}
    assert set(spread) == {"plain", "balanced", "balanced+hstu_sampling"}
    for r in spread.values():
        assert r["steps"] > 0 and 1.0 <= r["spread"] and 1.0 <= r["cost_spread"], r
    # The cost model is deterministic: balancing must lower the cross-rank spread.
    assert spread["balanced"]["cost_spread"] < spread["plain"]["cost_spread"], spread
