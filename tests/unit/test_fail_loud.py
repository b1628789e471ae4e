"""Single-process pieces of "fail loud, lose nothing": the restricted metadata unpickler, the
run-dir lock (busy, stale takeover, other host), the per-step guard (non-finite loss, stop
signals), rerun consistency checks and the metrics file trimmed on resume."""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp

from trainer.checkpoint import (
    CheckpointError,
    check_resume,
    data_fingerprint,
    file_checksum,
)
from trainer.config import Config
from trainer.metrics import MetricsFile
from trainer.preempt import NonFiniteLoss, StepGuard, StopSignals
from trainer.runlock import LOCK_FILE, RunDirBusy, RunLock
from trainer.safe_load import UnsafeCheckpointError, load_full_state_dict, read_metadata


def test_metadata_unpickler_admits_dcp_metadata_and_refuses_the_rest(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = torch.nn.Linear(3, 2).to(torch.float64)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optim": opt.state_dict(),
             "ids": torch.arange(5), "flag": torch.zeros(2, dtype=torch.bool)}
    dcp.save(state, checkpoint_id=str(tmp_path / "ok"), no_dist=True)
    read_metadata(str(tmp_path / "ok" / ".metadata"))
    full = load_full_state_dict(str(tmp_path / "ok"))  # non-tensor values: weights_only
    torch.testing.assert_close(full["model"]["weight"], model.weight.detach())
    assert full["optim"]["param_groups"][0]["lr"] == 0.01

    sentinel = tmp_path / "ran"
    for payload, refused in [((os.system, (f"touch {sentinel}",)), "posix.system"),
                             ((eval, ("1",)), "builtins.eval"),
                             ((subprocess.call, (["true"],)), "subprocess.call")]:
        class Evil:
            def __reduce__(self):  # type: ignore[no-untyped-def]
                return payload

        bad = tmp_path / "bad.metadata"
        bad.write_bytes(pickle.dumps({"x": Evil()}))
        with pytest.raises(UnsafeCheckpointError, match=f"{bad}: refused to load type "
                                                        f"{refused}"):
            read_metadata(str(bad))
    assert not sentinel.exists()
    (tmp_path / "junk").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match="junk: not a readable DCP metadata file"):
        read_metadata(str(tmp_path / "junk"))
    (tmp_path / "list").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(CheckpointError, match="holds a list, not DCP metadata"):
        read_metadata(str(tmp_path / "list"))


def test_file_checksum_is_crc32c(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import crc32c

    (tmp_path / "check").write_bytes(b"123456789")  # the CRC-32C check value (RFC 3720)
    assert file_checksum(str(tmp_path / "check")) == (9, "e3069283")
    data = os.urandom((8 << 20) + 12345)  # more than one read chunk
    (tmp_path / "f").write_bytes(data)
    assert file_checksum(str(tmp_path / "f")) == (len(data), f"{crc32c.crc32c(data):08x}")


def test_run_lock_busy_stale_and_other_host(repo_root: str, tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    run_dir = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from trainer.runlock import RunLock; RunLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(60)"), run_dir], stdout=subprocess.PIPE,
        text=True, env={**os.environ, "PYTHONPATH": repo_root})
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy, match=rf"host {socket.gethostname()}, pid "
                                             rf"{holder.pid}, started 20"):
            RunLock(run_dir).acquire()
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its flock is gone, the file still names it.
    assert json.load(open(os.path.join(run_dir, LOCK_FILE)))["pid"] == holder.pid
    with caplog.at_level(logging.WARNING, logger="trainer.runlock"):
        lock = RunLock(run_dir)
        lock.acquire()
    assert "taking over the run dir lock" in caplog.text and f"pid {holder.pid}" in caplog.text
    assert json.load(open(os.path.join(run_dir, LOCK_FILE)))["pid"] == os.getpid()
    lock.release()
    assert not os.path.exists(os.path.join(run_dir, LOCK_FILE))
    # A lock file from another host is never taken over (flock may not cross hosts).
    with open(os.path.join(run_dir, LOCK_FILE), "w") as fh:
        json.dump({"host": "elsewhere", "pid": 4242, "started": time.time()}, fh)
    with pytest.raises(RunDirBusy, match="host elsewhere, pid 4242.*another host.*delete"):
        RunLock(run_dir).acquire()


def test_step_guard_nonfinite_and_signals() -> None:
    signals = StopSignals().install()
    try:
        guard = StepGuard(signals, 0, 1, torch.device("cpu"))
        assert guard.check(torch.tensor(0.7), 1, None) is False
        with pytest.raises(NonFiniteLoss, match=r"at step 5 on rank 0.*last good checkpoint "
                                                r"is /ck/step_00000004"):
            guard.check(torch.tensor(float("nan")), 5, "/ck/step_00000004")
        with pytest.raises(NonFiniteLoss, match="no checkpoint was written before it"):
            guard.check(torch.tensor(float("-inf")), 2, None)
        os.kill(os.getpid(), signal.SIGUSR1)  # handled: the process lives on
        assert signals.name == "SIGUSR1"
        assert guard.check(torch.tensor(0.7), 6, None) is True
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL or callable(
        signal.getsignal(signal.SIGTERM))


def test_rerun_consistency_checks(tiny_ctr: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = Config()
    cfg.data.path = tiny_ctr
    data = data_fingerprint(cfg)
    ck = tmp_path / "step_00000024"
    ck.mkdir()
    (ck / "trainer.json").write_text(json.dumps({"step": 24, "data": data}))
    assert check_resume(str(ck), data, 24, explicit=False) == []
    with pytest.raises(CheckpointError, match=r"at step 24 but this run asks for 10 steps.*"
                                              r"--training.steps>=24"):
        check_resume(str(ck), data, 10, explicit=False)
    other = json.loads(json.dumps(data))
    other["schema_sha256"] = "0" * 64
    other["splits"]["train"] = other["splits"]["train"][:-1]
    with pytest.raises(CheckpointError, match=r"other data.*schema.json differs.*split "
                                              r"'train' has other files.*--training.run_dir"):
        check_resume(str(ck), other, 24, explicit=False)
    warnings = check_resume(str(ck), other, 24, explicit=True)  # fine-tuning: allowed
    assert len(warnings) == 1 and "schema.json differs" in warnings[0]


def test_metrics_file_drops_records_past_the_resumed_step(tmp_path) -> None:  # type: ignore[no-untyped-def]
    mf = MetricsFile(str(tmp_path), True)
    for rec in ({"split": "train", "step": 8}, {"split": "eval", "step": 8},
                {"split": "train", "step": 12}, {"split": "final", "steps": 24}):
        mf.write(rec)
    with open(mf.path, "a") as fh:
        fh.write('{"split": "train", "st')  # the torn last line of a killed run
    mf.drop_after(12)
    kept = [json.loads(line) for line in open(mf.path)]
    assert [(r["split"], r.get("step")) for r in kept] == [("train", 8), ("eval", 8),
                                                           ("train", 12)]
    mf.write({"split": "final", "steps": 12})  # a finished run, resumed at its last step:
    mf.drop_after(12)                          # its final record is written again
    assert [json.loads(line)["split"] for line in open(mf.path)] == ["train", "eval", "train"]


def test_unwritable_checkpoint_dir_fails_at_start_with_the_documented_message(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from trainer.checkpoint import Checkpointer

    (tmp_path / "file").write_text("not a directory")
    root = str(tmp_path / "file" / "checkpoints")  # unwritable even for root
    with pytest.raises(CheckpointError, match=rf"checkpoint directory {root} is not writable "
                                              r"\(Not a directory\).*--checkpoint.dir="):
        Checkpointer(root, 0, 1, 3).ensure_writable()
    with pytest.raises(CheckpointError, match=r"saving checkpoint step 5 to .* failed "
                                              r"\(.*Not a directory.*\); the previous "
                                              r"checkpoints in .* are intact"):
        Checkpointer(root, 0, 1, 3).save(5, None, None, {}, Config(), None)  # type: ignore[arg-type]
