"""``python -m trainer.plot``: curves of several runs overlaid in one PNG, and clear errors."""

from __future__ import annotations

import json
import os

from trainer.plot import main, read_metrics


def _run(path, auc_offset: float, partial_tail: bool = False) -> str:  # type: ignore[no-untyped-def]
    os.makedirs(path)
    records = [{"split": "train", "step": s, "loss": 1.0 / s, "auc": 0.6 + auc_offset,
                "lr/dense": 1e-3, "examples_per_s": 100.0} for s in (10, 20, 30)]
    records += [{"split": "valid", "step": 20, "auc": 0.7 + auc_offset, "eval_rows": 64},
                {"split": "final", "steps": 30, "auc": 0.72 + auc_offset, "oracle_auc": 0.8}]
    with open(os.path.join(path, "metrics.jsonl"), "w") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in records))
        if partial_tail:
            fh.write('{"split": "train", "st')  # a run killed mid-write
    return str(path)


def test_overlay_of_two_runs(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    a = _run(tmp_path / "a", 0.0)
    b = _run(tmp_path / "b", 0.05, partial_tail=True)
    series, last = read_metrics(b)
    assert last == 30 and series[("train", "loss")] == [(10, 0.1), (20, 0.05), (30, 1 / 30)]
    assert ("train", "lr/dense") not in series and ("valid", "eval_rows") not in series
    out = str(tmp_path / "cmp.png")
    assert main([a, b, "--out", out]) == 0
    with open(out, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "2 panels: loss, auc" in capsys.readouterr().out
    assert main([a]) == 0 and os.path.isfile(os.path.join(a, "curves.png"))


def test_errors_name_the_file(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main([str(tmp_path)]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err
    a = _run(tmp_path / "a", 0.0)
    assert main([a, "--metrics", "hr@10"]) == 2
    assert "hr@10 not in these runs; they logged loss, auc" in capsys.readouterr().err
    with open(os.path.join(a, "metrics.jsonl"), "a") as fh:
        fh.write("garbage\n{}\n")
    assert main([a]) == 2
    assert "metrics.jsonl:6: not a JSON record" in capsys.readouterr().err
