"""The multi-rank harness (``launch.spawn.run_ranks``) fails fast, never hangs: a rank that
dies without reporting (here: ``os._exit``, as a segfault would) fails the test with its exit
code while the surviving rank is still blocked in a collective, and an exception on a rank
comes back with that rank's traceback."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
import torch.distributed as dist

from launch.spawn import run_ranks


def _rank1_dies_rank0_waits(ctx: Any) -> int:
    if ctx.rank == 1:
        os._exit(3)
    dist.barrier()  # never returns: rank 1 is gone
    return ctx.rank


def _rank0_raises(ctx: Any) -> int:
    if ctx.rank == 0:
        raise ValueError("bad shard on purpose")
    return ctx.rank


def test_a_dead_rank_fails_fast_instead_of_hanging() -> None:
    start = time.monotonic()
    with pytest.raises(AssertionError, match="rank 1: died with exit code 3"):
        run_ranks(_rank1_dies_rank0_waits, 2, timeout_s=120)
    # The barrier's own timeout is 120 s: finishing well before it means the harness noticed.
    assert time.monotonic() - start < 60


def test_a_rank_exception_carries_its_traceback() -> None:
    with pytest.raises(AssertionError, match=r"rank 0:[\s\S]*ValueError: bad shard on purpose"):
        run_ranks(_rank0_raises, 2, timeout_s=120)
