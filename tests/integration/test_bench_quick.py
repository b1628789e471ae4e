"""Benchmark smoke runs: every contender runs and produces finite numbers (no timing
assertions — speed goals live in the benchmarks' own output)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_throughput_quick(repo_root: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "t.json"
    proc = subprocess.run([sys.executable, "-m", "bench.throughput", "--quick", "--out", str(out)],
                          cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    ran = {r["contender"] for r in res["results"]}
    assert {"torchrec_dlrm", "shardrec_deepfm", "shardrec_deepfm_bf16", "plain_dense_adam",
            "plain_sparse_adam"} <= ran
    for r in res["results"]:
        assert math.isfinite(r["examples_per_s"]) and r["examples_per_s"] > 0, r
    assert res["matmul_flops"] > 0 and all(m["mlp_flops"] > 0 for m in res["mlp"])
    assert "vs_torchrec_dlrm" in proc.stdout
