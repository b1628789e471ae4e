"""``python -m bench.triton_gpu_check --cpu-smoke``: the GPU validation script's own logic
(parity through the Triton interpreter at tiny sizes, the CPU speed rows, the JSON file)."""

from __future__ import annotations

import json

import pytest

from bench.triton_gpu_check import main


def test_triton_gpu_check_cpu_smoke(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import sys

    # The script switches the interpreter on before its first import of the kernels.
    monkeypatch.delitem(sys.modules, "models.hstu.triton_attention", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = tmp_path / "check.json"
    assert main(["--cpu-smoke", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["ok"] and {c["case"] for c in payload["parity"]} == {
        "mixed_time", "query_ts", "all_empty"}
    assert all(c["worst_err/tol"] <= 1.0 for c in payload["parity"])
    assert {r["impl"] for r in payload["speed"]} == {"compiled_jagged"}
    sys.modules.pop("models.hstu.triton_attention", None)  # the next importer decides afresh
