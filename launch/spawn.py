"""A local multi-process launcher: run a function on N gloo ranks, each in its own spawned
process, and collect results (the multi-process tests and the benchmarks use it; it sits in
``launch`` above every package it drives, so both can import it).

Each rank sets the rendezvous environment, joins the default process group through
``sharding.dist.init_distributed`` (the trainer's path) and returns a picklable value.
A failure on any rank fails the test with that rank's traceback.
"""

from __future__ import annotations

import os
import time
import traceback
from typing import Any, Callable, List, Optional

import torch.multiprocessing as mp

from sharding.dist import destroy_distributed, free_port, init_distributed


def _worker(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple,
            queue: "mp.SimpleQueue[Any]", cpu_threads: Optional[int]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        ctx = init_distributed("gloo", "cpu", cpu_threads=cpu_threads, timeout_s=120)
        result = fn(ctx, *args)
        queue.put((rank, "ok", result))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        destroy_distributed()


def run_ranks(fn: Callable[..., Any], world_size: int = 2, *args: Any,
              timeout_s: float = 300.0, cpu_threads: Optional[int] = 1) -> List[Any]:
    """``fn(ctx, *args)`` on every rank; returns the results ordered by rank.

    ``cpu_threads``: intra-op threads per rank (1 keeps tests deterministic and cheap;
    ``None`` = usable cores / ranks, as the trainer does).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, cpu_threads))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: List[Any] = [None] * world_size
    errors = []
    pending = set(range(world_size))
    deadline = time.monotonic() + timeout_s
    # Poll rather than block: a rank that dies without reporting (segfault, import error in
    # the child) must fail the test, not hang it.
    while pending and time.monotonic() < deadline:
        if queue.empty():
            dead = [r for r in pending if not procs[r].is_alive() and procs[r].exitcode != 0]
            if dead and queue.empty():
                time.sleep(0.5)  # let a last report through the pipe
                if queue.empty():
                    errors += [f"rank {r}: died with exit code {procs[r].exitcode}" for r in dead]
                    break
            time.sleep(0.05)
            continue
        rank, status, value = queue.get()
        pending.discard(rank)
        if status == "ok":
            results[rank] = value
        else:
            errors.append(f"rank {rank}:\n{value}")
    if pending and not errors:
        errors.append(f"ranks {sorted(pending)} did not finish within {timeout_s}s")
    for p in procs:
        p.join(timeout=5 if errors else 60)
        if p.is_alive():
            p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return results
