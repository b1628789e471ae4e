"""A new user's own CSV, end to end with default converter settings (docs/own-data.md): the
2,000-row mixed CSV (label, 3 numeric columns with a raw age, 4 categorical strings, a
``|`` list, a request id) converts to train/valid/test, trains with the template config on
1 rank (``python -m trainer``) and 2 ranks (torchrun), and:

* the 1-rank run overfits after a few epochs, stops ``early_stop_patience`` evaluations after
  its best one, and the exported model is the best-on-valid checkpoint: ``trainer.predict``
  on the valid split gives exactly the best valid AUC the run logged, and on the test split
  exactly the final line's test AUC and row count;
* unlabelled rows converted ``--like`` the training set are scored with their ids;
* a batch larger than a rank's rows is a one-line error naming the largest that fits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from data.convert.__main__ import main as convert_main
from tests.integration.runner import parse_final, run_trainer
from tests.own_data import write_mixed_csv, write_spec

pytestmark = pytest.mark.slow

TEMPLATE = "launch/configs/csv_template.toml"


def _cli(repo_root: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=repo_root, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": repo_root})


def _in_process(capsys, main, *args: str) -> str:
    """stdout of a command's ``main`` run here (saves a process start per call)."""
    capsys.readouterr()
    assert main(list(args)) == 0
    return capsys.readouterr().out


def test_own_csv_end_to_end(repo_root: str, tmp_path, capsys) -> None:
    from trainer.export import main as export_main
    from trainer.predict import main as predict_main

    csv, spec, ds = str(tmp_path / "x.csv"), str(tmp_path / "spec.json"), str(tmp_path / "ds")
    write_mixed_csv(csv)
    write_spec(spec)
    assert convert_main(["csv", csv, "--out", ds, "--spec", spec, "--no-progress"]) == 0
    rows = json.load(open(os.path.join(ds, "meta.json")))["rows"]
    assert sum(rows.values()) == 2000 and set(rows) == {"train", "valid", "test"}

    # Default batch size on this small set: one line naming the fix, no traceback.
    p = _cli(repo_root, "trainer", "--config", TEMPLATE, f"--data.path={ds}",
             f"--training.run_dir={tmp_path}/big", "--data.batch_size=4096")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert f"the largest batch size that fits is {rows['train']}" in p.stderr.splitlines()[-1]

    run1 = str(tmp_path / "run1")
    p = _cli(repo_root, "trainer", "--config", TEMPLATE, f"--data.path={ds}",
             f"--training.run_dir={run1}")
    assert p.returncode == 0, p.stderr[-5000:]
    final = parse_final(p.stdout)
    assert final["eval_rows"] == rows["test"] and final["auc"] > 0.7, final
    # Stopped early, exactly `patience` epoch evaluations after the best one.
    per_epoch = rows["train"] // 256
    assert final["steps"] < 20 * per_epoch, final
    assert final["steps"] - final["best_step"] == 3 * per_epoch, final
    valid = [json.loads(line) for line in open(os.path.join(run1, "metrics.jsonl"))
             if '"split": "valid"' in line]
    best = max(valid, key=lambda r: r["auc"])
    assert best["step"] == final["best_step"] and best["auc"] == pytest.approx(final["valid_auc"])
    assert all(r["eval_rows"] == rows["valid"] for r in valid)

    # Export picks the best-on-valid checkpoint of the run; predict agrees with the trainer.
    export = str(tmp_path / "export")
    out = _in_process(capsys, export_main, "--checkpoint", run1, "--out", export,
                      "--format", "weights")
    assert f"step {int(final['best_step'])} " in out, out
    got = parse_final(_in_process(capsys, predict_main, "--model", export, "--data", ds,
                                  "--split", "valid"))
    assert got["auc"] == pytest.approx(final["valid_auc"], abs=1e-5)
    assert got["rows"] == rows["valid"]
    got = parse_final(_in_process(capsys, predict_main, "--model", export, "--data", ds))
    assert got["auc"] == pytest.approx(final["auc"], abs=1e-5) and got["rows"] == rows["test"]

    # New rows without labels, converted like the training set and scored with their ids.
    new_csv, new_ds = str(tmp_path / "new.csv"), str(tmp_path / "new")
    write_mixed_csv(new_csv, rows=60, seed=7, labelled=False, id_offset=500_000)
    assert convert_main(["csv", new_csv, "--out", new_ds, "--like", ds, "--no-label",
                         "--no-progress"]) == 0
    _in_process(capsys, predict_main, "--model", export, "--data", new_ds, "--out",
                str(tmp_path / "scores.parquet"))
    scores = pq.read_table(str(tmp_path / "scores.parquet")).to_pydict()
    assert scores["req_id"] == [f"r{500_000 + i:06d}" for i in range(60)]
    assert all(0.0 < s < 1.0 for s in scores["score"])

    # Two ranks, default converter settings: the row groups give both ranks a share.
    proc = run_trainer(repo_root, 2, ["--config", TEMPLATE, f"--data.path={ds}",
                                      f"--training.run_dir={tmp_path}/run2",
                                      "--data.batch_size=128", "--training.epochs=3"])
    assert proc.returncode == 0, proc.stderr[-5000:]
    final2 = parse_final(proc.stdout)
    assert final2["eval_rows"] == rows["test"] and final2["auc"] > 0.7, final2
