"""Atomic writes: a file or a directory appears whole under its name, or not at all.

Everything the project writes for later reading (datasets, schema/meta JSON, resolved
configs, exports, predictions, benchmark results) goes through these helpers, so a crash,
a full disk or a kill mid-write never leaves a half-written file that looks complete.

* :func:`atomic_path` — yields a temporary path ``PATH.tmp-<pid>`` for any writer that takes a
  path (``pq.write_table``, ``torch.save``); renamed onto ``PATH`` when the block succeeds,
  removed when it raises.
* :func:`atomic_file` — the same with an open file handle, flushed and fsynced before the rename.
* :func:`write_text_atomic` / :func:`write_json_atomic` — one-call forms.
* :class:`AtomicDirectory` — a directory built in ``OUT.tmp-<pid>`` and renamed onto ``OUT``
  by :meth:`AtomicDirectory.commit`; an existing ``OUT`` is replaced only with ``overwrite``
  and, when a ``marker`` is given, only if it holds that marker (:mod:`data.marker`: a
  directory this tool wrote), which the commit writes into the new one.

Example::

    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> write_json_atomic(os.path.join(d, "meta.json"), {"rows": 3})
    >>> with AtomicDirectory(os.path.join(d, "ds")) as out:
    ...     write_text_atomic(os.path.join(out.path, "a.txt"), "x")
    ...     out.commit()
    >>> sorted(os.listdir(d))
    ['ds', 'meta.json']
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from typing import IO, Any, Iterator, Optional

from data.marker import replace_refusal, write_marker


def _tmp_name(path: str) -> str:
    return f"{path}.tmp-{os.getpid()}"


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary path next to ``path``; renamed onto ``path`` when the block succeeds."""
    tmp = _tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        raise


@contextmanager
def atomic_file(path: str, mode: str = "w") -> Iterator[IO[Any]]:
    """An open handle on a temporary file; flushed, fsynced and renamed onto ``path``."""
    with atomic_path(path) as tmp:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())


def write_text_atomic(path: str, text: str) -> None:
    with atomic_file(path) as fh:
        fh.write(text)


def write_json_atomic(path: str, obj: Any) -> None:
    """``obj`` as indented JSON (one trailing newline)."""
    with atomic_file(path) as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")


class AtomicDirectory:
    """A directory built under a temporary name and renamed into place on :meth:`commit`.

    Args:
        out: the final directory.
        overwrite: replace an existing ``out``; without it an existing ``out`` raises
            ``FileExistsError`` naming it and the flag.
        marker: the marker file (``data.marker.DATASET_MARKER`` / ``EXPORT_MARKER``) that
            makes an existing ``out`` replaceable and that :meth:`commit` writes; ``None``
            replaces any existing ``out`` when ``overwrite`` is set.
        what: what the directory is, for the refusal message ("dataset", "export").
        tool: the writer named inside the marker (may be set until :meth:`commit`).

    Use as a context manager: leaving the block without :meth:`commit` (an exception, or a
    deliberate abort) removes the temporary directory and leaves ``out`` as it was.
    """

    def __init__(self, out: str, overwrite: bool = False, marker: Optional[str] = None,
                 what: str = "directory", tool: str = "shardrec") -> None:
        self.out = os.path.abspath(out)
        if marker is not None:
            refusal = replace_refusal(self.out, overwrite, marker, what)
            if refusal:
                raise FileExistsError(refusal)
        elif os.path.exists(self.out) and not overwrite:
            raise FileExistsError(f"{self.out} already exists; pass --overwrite to replace it")
        self.marker = marker
        self.tool = tool
        self.path = _tmp_name(self.out)
        self.committed = False

    def __enter__(self) -> "AtomicDirectory":
        shutil.rmtree(self.path, ignore_errors=True)
        os.makedirs(self.path)
        return self

    def commit(self) -> None:
        """Rename the finished directory onto ``out`` (replacing what was there). The old
        directory is moved aside first, so ``out`` is missing only between two renames."""
        if self.marker is not None:
            write_marker(self.path, self.marker, self.tool)
        old: Optional[str] = None
        if os.path.exists(self.out):
            old = f"{self.out}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.out, old)
        os.replace(self.path, self.out)
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self.committed:
            shutil.rmtree(self.path, ignore_errors=True)
