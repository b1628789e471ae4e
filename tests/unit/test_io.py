"""Atomic writes: a failure mid-write leaves the previous content (or nothing) in place and
no temporary files behind; an existing directory is replaced only when asked."""

from __future__ import annotations

import json
import os

import pytest

from data.io import AtomicDirectory, atomic_path, write_json_atomic, write_text_atomic


def test_file_replaced_whole_or_not_at_all(tmp_path) -> None:
    path = str(tmp_path / "meta.json")
    write_json_atomic(path, {"rows": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            with open(tmp, "w") as fh:
                fh.write('{"rows": ')   # half a file, then the writer dies
            raise RuntimeError("killed mid-write")
    assert json.load(open(path)) == {"rows": 1}
    assert os.listdir(tmp_path) == ["meta.json"]


def test_directory_commit_abort_and_overwrite(tmp_path) -> None:
    out = str(tmp_path / "ds")
    with AtomicDirectory(out) as d:
        write_text_atomic(os.path.join(d.path, "a.txt"), "first")
        d.commit()
    with pytest.raises(FileExistsError, match="--overwrite"):
        AtomicDirectory(out)
    with pytest.raises(ValueError):
        with AtomicDirectory(out, overwrite=True) as d:
            write_text_atomic(os.path.join(d.path, "a.txt"), "second")
            raise ValueError("conversion failed")
    assert open(os.path.join(out, "a.txt")).read() == "first"
    with AtomicDirectory(out, overwrite=True) as d:
        write_text_atomic(os.path.join(d.path, "b.txt"), "second")
        d.commit()
    assert os.listdir(out) == ["b.txt"]
    assert sorted(os.listdir(tmp_path)) == ["ds"]
