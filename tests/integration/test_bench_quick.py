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
    # fp32 and bf16 DeepFM through the trainer, on the same data: both AUCs real numbers.
    assert [r["dense_dtype"] for r in res["precision"]] == ["fp32", "bf16"]
    for r in res["precision"]:
        assert 0.5 < r["auc"] <= 1 and math.isfinite(r["examples_per_s"]), r


def test_scaling_and_report_quick(repo_root: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    results = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "bench.scaling", "--quick", "--out",
                           str(results / "scaling_quick.json")],
                          cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((results / "scaling_quick.json").read_text())
    # Every sweep ran every size, the 2-rank run included.
    assert [r["rows"] for r in res["rows"]] == [1000, 10_000]
    assert [r["batch_size"] for r in res["batch"]] == [64, 128]
    assert [r["L"] for r in res["hstu"]] == [8, 16]
    assert [r["ranks"] for r in res["ranks"]] == [1, 2]
    for sweep in ("rows", "batch", "ranks"):
        for r in res[sweep]:
            assert math.isfinite(r["step_s"]) and r["step_s"] > 0, r
            assert math.isfinite(r["examples_per_s"]) and r["examples_per_s"] > 0, r
    for r in res["hstu"]:
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("layer_s", "attention_s")), r
        assert math.isfinite(r["attn_per_L2_vs_smallest"]), r
    assert "vs_1_rank" in proc.stdout

    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "bench.report", "--quick", "--results",
                           str(results), "--out", str(out)],
                          cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (out / "RESULTS.md").read_text()
    assert "## Machine" in text and "## Scaling" in text and "](scaling.png)" in text
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_serving_quick(repo_root: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """bench.serving --quick: eager and exported DeepFM score the same inputs alike at every
    batch size, the top-K part measures every index against exact, the quantisation part
    reports an AUC per table format."""
    out = tmp_path / "s.json"
    proc = subprocess.run([sys.executable, "-m", "bench.serving", "--quick", "--out", str(out)],
                          cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    scoring = res["scoring"]["results"]
    assert {(r["contender"], r["batch"]) for r in scoring} == {
        (c, b) for c in ("eager", "exported") for b in (1, 64, 512)}
    for r in scoring:
        assert r["max_abs_diff"] < 1e-5, r  # the exported program scores as eager does
        assert math.isfinite(r["rows_per_s"]) and r["rows_per_s"] > 0, r
    assert all(math.isfinite(v) and v > 0 for v in res["scoring"]["ratios"].values())
    topk = res["topk"]["results"]
    assert topk[0]["method"] == "exact" and len(topk) == 7
    assert all(0.0 <= r["recall@10"] <= 1.0 and r["qps"] > 0 for r in topk), topk
    for q in ("int8", "int4"):
        assert 0.5 < res["quantisation"][q][f"auc_{q}_ctr"] <= 1.0, res["quantisation"]
    assert "exported_vs_eager_b512" in proc.stdout
