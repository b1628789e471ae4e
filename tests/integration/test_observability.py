"""One 2-rank torchrun run as a user starts it, checked for what an operator sees: only our
own lines (and torchrun's banner), log lines in the documented format, TensorBoard events
with the expected tags, the final line's calibration and eval_rows, and the plot command on
the run directory."""

from __future__ import annotations

import json
import os
import re

import pytest

from tests.integration.runner import parse_final, run_trainer
from trainer.plot import plot_runs
from trainer.progress import parse_log_line

# Third-party lines quiet mode removes (trainer.quiet); none may appear.
NOISE = ("FutureWarning", "UserWarning", "is_fx_tracing", "DistributedDataParallel(",
         "There is a known issue with TorchRec", "Sharding spec not found",
         "caching params will be ignored", "broadcast_buffers", "c10d_logger")

# What may appear: torchrun's banner, our "HH:MM:SS [rankR] ..." lines, the indented lines
# of the sharding plan, and the final line.
OURS = re.compile(r"^(\d\d:\d\d:\d\d \[rank\d+\] |  model\.|final |"
                  r"W\d{4} [\d:.]+ \d+ \S*torch/distributed/run\.py:\d+\] )")


@pytest.mark.slow
def test_two_rank_run_is_quiet_logged_and_recorded(repo_root: str, tiny_ctr: str,
                                                   tmp_path) -> None:  # type: ignore[no-untyped-def]
    run_dir = str(tmp_path / "run")
    proc = run_trainer(repo_root, 2, [
        "--config", "deepfm_synthetic",  # a built-in config by name
        f"--data.path={tiny_ctr}", "--data.batch_size=256", "--training.steps=10",
        "--training.log_every=5", "--training.eval_every=5", "--metrics.window_batches=4",
        f"--training.run_dir={run_dir}"])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for noise in NOISE:
        assert noise not in out, f"{noise!r} in the output:\n{out}"
    strangers = [l for l in out.splitlines() if l.strip() and not OURS.match(l)]
    assert not strangers, "lines that are not ours:\n" + "\n".join(strangers)

    lines = [parse_log_line(l.split("] ", 1)[1]) for l in proc.stderr.splitlines()
             if re.search(r"\] step \d+/", l)]
    assert [l["step"] for l in lines] == [5, 10]
    assert all(l["steps"] == 10 and 0 < l["auc"] <= 1 and l["lr"] == pytest.approx(1e-3)
               for l in lines)
    assert lines[-1]["eta_s"] == 0 and lines[0]["epoch"] == pytest.approx(5 / 8, abs=0.01)

    final = parse_final(proc.stdout)
    with open(os.path.join(tiny_ctr, "meta.json")) as fh:
        eval_split_rows = json.load(fh)["rows"]["eval"]
    assert 0 < final["eval_rows"] <= eval_split_rows
    assert 0.5 < final["calibration"] < 2.0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    want = {"train/loss", "train/auc", "train/logloss", "train/calibration",
            "train/lr/dense", "train/lr/sparse", "train/examples_per_s", "eval/auc",
            "eval/logloss", "eval/eval_rows", "final/auc", "final/calibration",
            "final/eval_rows"}
    assert want <= tags, want - tags
    assert [e.step for e in acc.Scalars("train/loss")] == [5, 10]
    assert [e.step for e in acc.Scalars("eval/auc")] == [5]
    assert acc.Scalars("final/eval_rows")[0].value == final["eval_rows"]
    assert acc.Scalars("train/loss")[-1].value == pytest.approx(lines[-1]["loss"], abs=1e-4)

    drawn = plot_runs([run_dir])
    png = os.path.join(run_dir, "curves.png")
    with open(png, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert drawn["loss"] == ["run train"]
    assert drawn["auc"] == ["run eval", "run final", "run train", "run oracle"]
