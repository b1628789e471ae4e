"""Quiet logs: silence the known third-party notes a healthy run prints, and nothing else.

On a 2-rank CPU run of torch 2.13 / torchrec 1.8 these lines are as many as our own, and none
of them asks the user to do anything:

* ``FutureWarning: `broadcast_buffers` is deprecated`` — torchrec wraps data-parallel tables
  and the dense part in ``DistributedDataParallel(..., broadcast_buffers=False)``
  (``torchrec/distributed/embeddingbag.py``, ``embedding.py``, ``model_parallel.py``); the
  warning's source line ``DistributedDataParallel(`` is what shows up twice per rank.
* ``FutureWarning: `torch.distributed.reduce_scatter_tensor` is deprecated`` (and
  ``all_gather_into_tensor``, ``_reduce_scatter_base``, ``_all_gather_base``) — raised by
  ``torch/distributed/c10d_logger.py`` around the collectives torchrec's DDP and row-wise
  sharding call.
* ``UserWarning: fbgemm::...: an autograd kernel was not registered`` — ``torch.autograd``
  about fbgemm's dense (data-parallel) embedding lookup, whose gradient torchrec computes
  itself.
* torchrec's planner log notes: the dry-run dense-storage estimate
  (``torchrec.distributed.planner.storage_reservations``), "Sharding spec not found for …"
  for data-parallel tables (root logger, from ``torchrec/distributed/planner/planners.py``)
  and "Sharding Type is data_parallel, caching params will be ignored"
  (``torchrec.distributed.utils``).
* torch's ``is_fx_tracing will return true for both …`` (``torch.fx._symbolic_trace``),
  logged when torchrec's pipeline checks for tracing.

Each filter names the module that emits the line and matches its message from the start, so
the same kind of warning from anywhere else still shows. ``--log.verbose=true`` installs
none of them.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import List, Optional, Pattern, Tuple

# (category, message regex, module regex) for ``warnings.filterwarnings`` — the module is the
# ``__name__`` of the frame the warning is attributed to.
WARNING_FILTERS: List[Tuple[type, str, str]] = [
    (FutureWarning, r"`broadcast_buffers` is deprecated",
     r"torchrec\.distributed\.(embeddingbag|embedding|model_parallel)$"),
    (FutureWarning,
     r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor|_reduce_scatter_base"
     r"|_all_gather_base)` is deprecated",
     r"torch\.distributed\.c10d_logger$"),
    (UserWarning, r"fbgemm::\w+: an autograd kernel was not registered",
     r"torch\.autograd\.graph$"),
]

# (logger name, message regex, source-file suffix or None) for log records.
LOG_FILTERS: List[Tuple[str, str, Optional[str]]] = [
    ("torchrec.distributed.planner.storage_reservations",
     r"There is a known issue with TorchRec's dense tensor size calculation in dry run", None),
    ("root", r"Sharding spec not found for ",
     "torchrec/distributed/planner/planners.py"),
    ("torchrec.distributed.utils",
     r"(Sharding Type is data_parallel|Compute Kernel is dense), caching params will be "
     r"ignored$", None),
    ("torch.fx._symbolic_trace", r"is_fx_tracing will return true for both", None),
]


class _MessageFilter(logging.Filter):
    """Drops records whose message matches ``pattern`` from the start (and, when given,
    whose source file ends with ``path_suffix``)."""

    def __init__(self, pattern: Pattern[str], path_suffix: Optional[str]) -> None:
        super().__init__()
        self.pattern = pattern
        self.path_suffix = path_suffix

    def filter(self, record: logging.LogRecord) -> bool:
        if self.path_suffix and not record.pathname.replace("\\", "/").endswith(
                self.path_suffix):
            return True
        return not self.pattern.match(record.getMessage())


_installed: List[Tuple[logging.Logger, logging.Filter]] = []


def install_quiet_filters() -> None:
    """Install every filter above (idempotent: ``warnings`` replaces an identical filter).
    Logger filters apply where a record is made, so they hold whatever handlers (console,
    ``train.log``) are attached later."""
    for category, message, module in WARNING_FILTERS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    if _installed:
        return
    for name, message, path_suffix in LOG_FILTERS:
        log = logging.getLogger() if name == "root" else logging.getLogger(name)
        f = _MessageFilter(re.compile(message), path_suffix)
        log.addFilter(f)
        _installed.append((log, f))


def remove_quiet_filters() -> None:
    """Undo :func:`install_quiet_filters`' log filters (tests; warnings filters stay)."""
    while _installed:
        log, f = _installed.pop()
        log.removeFilter(f)
