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
