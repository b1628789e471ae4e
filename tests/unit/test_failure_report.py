"""A failed rank leaves one parseable line on stderr and an error file for torchrun."""

from __future__ import annotations

import json

import pytest

from trainer.__main__ import report_failure


def test_failure_is_one_line_naming_rank_and_cause(capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path) -> None:
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    try:
        raise FileNotFoundError("first line\n  second line\n")
    except FileNotFoundError as e:
        report_failure(3, e)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "rank 3 failed: FileNotFoundError: first line; second line"
    recorded = json.loads(error_file.read_text())
    assert recorded["message"]["message"].startswith("FileNotFoundError: first line")
    assert "raise FileNotFoundError" in recorded["message"]["extraInfo"]["py_callstack"]


def test_exit_now_keeps_buffered_output_logs_and_the_exit_code(tmp_path) -> None:
    """``python -m trainer`` leaves through ``exit_now`` (no interpreter teardown): the lines
    still in the stdout buffer (a pipe: block-buffered) and the log file handler must still
    arrive, and the code must be the process's exit status."""
    import os
    import subprocess
    import sys

    log = tmp_path / "train.log"
    script = ("import logging, sys\n"
              "from trainer.__main__ import exit_now\n"
              f"logging.basicConfig(filename={str(log)!r}, level=logging.INFO)\n"
              "logging.getLogger('trainer').info('last words')\n"
              "print('step 1/1')\n"
              "print('final auc=0.5')\n"
              "exit_now(3)\n")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=repo, env={**env, "PYTHONPATH": repo}, timeout=120)  # in jobs
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "step 1/1\nfinal auc=0.5\n"
    assert "last words" in log.read_text()
