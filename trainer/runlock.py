"""One run per run dir: ``<run_dir>/.run.lock``, held by rank 0 for the life of a run.

Two runs sharing a run dir would overwrite each other's checkpoints and interleave
``metrics.jsonl``. At start-up rank 0 takes an exclusive ``flock`` on the lock file and
writes ``{"host", "pid", "started"}`` into it; the kernel drops the ``flock`` when the process
dies, however it dies. So:

* the ``flock`` is taken → a second run fails with :class:`RunDirBusy` naming the holder;
* the ``flock`` is free but the file names a process of this host → that process died
  without cleaning up: the lock is taken over with a log line;
* the ``flock`` is free and the file names another host → on a network file system the
  ``flock`` may not reach across hosts, so the lock is not taken over automatically; the
  error names the holder and says to delete the file once that run is known to be gone.

Example::

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> lock = RunLock(d); lock.acquire()
    >>> RunLock(d).acquire()  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    RunDirBusy: ...
    >>> lock.release()
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import time
from typing import Any, Dict, Optional

logger = logging.getLogger(__name__)

LOCK_FILE = ".run.lock"


class RunDirBusy(RuntimeError):
    """Another run holds the run dir; the message names it (host, pid, start time)."""


def _describe(holder: Dict[str, Any]) -> str:
    started = holder.get("started")
    when = (datetime.datetime.fromtimestamp(float(started), datetime.timezone.utc)
            .strftime("%Y-%m-%d %H:%M:%S UTC") if isinstance(started, (int, float)) else "?")
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {when}"


class RunLock:
    """The lock of ``run_dir`` (see the module docstring). ``acquire`` / ``release``."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_FILE)
        self._fd: Optional[int] = None

    def _read(self, fd: int) -> Dict[str, Any]:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        try:
            holder = json.loads(raw.decode() or "{}")
            return holder if isinstance(holder, dict) else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {}

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunDirBusy`."""
        os.makedirs(self.run_dir, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                raise RunDirBusy(self._busy(holder)) from None
            try:  # the holder may have released (and unlinked) it between open and flock
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            holder = self._read(fd)
            host = socket.gethostname()
            if holder.get("pid") and holder.get("pid") != os.getpid():
                if holder.get("host") != host:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    raise RunDirBusy(self._busy(holder) + f" (another host: this host cannot "
                                     f"tell whether it is still running; delete {self.path} "
                                     f"once it is gone)")
                logger.warning("taking over the run dir lock %s of a process that is gone "
                               "(%s)", self.path, _describe(holder))
            me = {"host": host, "pid": os.getpid(), "started": time.time()}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(me).encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _busy(self, holder: Dict[str, Any]) -> str:
        return (f"run dir {self.run_dir} is in use by another run ({_describe(holder)}; lock "
                f"file {self.path}): two runs in one run dir overwrite each other's "
                f"checkpoints and metrics. Wait for it to finish, stop it, or pass another "
                f"--training.run_dir")

    def release(self) -> None:
        """Drop the lock and its file (a no-op when not held)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # a reader between unlink and close sees no holder
            os.remove(self.path)
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def lock_run_dir(run_dir: str, rank: int) -> Optional[RunLock]:
    """Rank 0 takes the lock of ``run_dir``; every rank raises the same :class:`RunDirBusy`
    when it is held (a collective when a process group is up). Returns rank 0's lock (None
    on the other ranks)."""
    import torch.distributed as dist

    lock, error = None, ""
    if rank == 0:
        try:
            lock = RunLock(run_dir)
            lock.acquire()
        except RunDirBusy as e:
            lock, error = None, str(e)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise RunDirBusy(error)
    return lock
