"""Process-group set-up from the launcher's environment.

``torchrun`` / ``torchx`` export ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. A plain ``python -m trainer``
has none of them and runs as a world of one on a free local port, through the same code path.

Device and backend default from the machine: CUDA present → ``cuda:LOCAL_RANK`` with nccl,
otherwise CPU with gloo; both can be overridden (``dist.device`` / ``dist.backend``).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_device(device: str, local_rank: int) -> torch.device:
    """``auto`` → ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``."""
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"dist.device={device!r} but CUDA is not available on this machine; "
                             f"use 'cpu' or 'auto'")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("dist.backend='nccl' needs a CUDA device; use 'gloo' (or 'auto') on CPU")
    return backend


def _cgroup_cpu_limit() -> Optional[float]:
    """CPUs allowed by this container's CFS quota (cgroup v2, then v1), ``None`` if unlimited.

    Kubernetes and docker ``--cpus`` limit a pod by quota, not by affinity, so
    ``os.sched_getaffinity`` still reports every host core; without this, ranks in a 4-CPU pod
    on a 64-core host would each start 64 / local-ranks threads and thrash.
    """
    candidates = (("/sys/fs/cgroup/cpu.max", None),
                  ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"))
    for quota_path, period_path in candidates:
        try:
            with open(quota_path) as fh:
                fields = fh.read().split()
            if period_path is not None:
                with open(period_path) as fh:
                    fields.append(fh.read().strip())
        except OSError:
            continue
        if len(fields) < 2 or fields[0] in ("max", "-1"):
            return None
        try:
            quota, period = float(fields[0]), float(fields[1])
        except ValueError:
            return None
        return quota / period if quota > 0 and period > 0 else None
    return None


def available_cpus() -> int:
    """Cores this process may use: its CPU affinity (slurm/cpuset), capped by a CFS quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, max(1, int(limit)))
    return max(1, cores)


def cpu_threads_per_rank(local_world_size: int, requested: Optional[int] = None) -> int:
    """Intra-op threads for one CPU rank: ``requested``, else usable cores / local ranks (>= 1)."""
    if requested:
        return requested
    return max(1, available_cpus() // max(1, local_world_size))


def init_distributed(backend: str = "auto", device: str = "auto",
                     cpu_threads: Optional[int] = None, timeout_s: float = 600.0) -> DistContext:
    """Join (or create) the default process group and pick this rank's device.

    Args:
        backend: ``auto`` | ``gloo`` | ``nccl``.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
        cpu_threads: intra-op threads per rank on CPU; ``None`` = usable cores (affinity,
            container CPU quota) / local ranks, so co-located ranks do not oversubscribe them.
        timeout_s: collective timeout.
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", rank)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    if "MASTER_ADDR" not in os.environ:
        if world_size != 1:
            raise RuntimeError("WORLD_SIZE > 1 but MASTER_ADDR is unset: launch with torchrun "
                               "or torchx, which set the rendezvous variables")
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(free_port())
    dev = resolve_device(device, local_rank)
    backend = resolve_backend(backend, dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    else:
        torch.set_num_threads(cpu_threads_per_rank(local_world_size, cpu_threads))
    # One line a user can check against the launcher they used (rank 0 logs at INFO).
    logger.info("rank %d/%d (local %d/%d): device %s, backend %s, %d intra-op threads",
                rank, world_size, local_rank, local_world_size, dev, backend,
                torch.get_num_threads())
    restarts = _env_int("TORCHELASTIC_RESTART_COUNT", 0)
    if restarts:
        # The visible trace of a torchrun --max-restarts recovery in the job's log.
        logger.info("torchelastic restart %d of at most %s: joining a new process group",
                    restarts, os.environ.get("TORCHELASTIC_MAX_RESTARTS", "?"))
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        dist.init_process_group(backend=backend, store=_group_store(rank, world_size, timeout),
                                rank=rank, world_size=world_size, timeout=timeout)
    return DistContext(rank, world_size, local_rank, local_world_size, dev, backend)


def restart_store_prefix() -> str:
    """Key prefix that keeps each torchelastic restart attempt's process group apart.

    ``torchrun``'s agent hosts one TCPStore (static and c10d rendezvous, ``--standalone``
    included) and hands the same ``MASTER_ADDR:MASTER_PORT`` to every restart attempt, and
    ``init_process_group`` always writes the same keys (``default_pg/0//cpu//0/R``). gloo
    publishes each rank's listening address there, so a restarted rank that read before its
    new peer wrote got the killed attempt's address: ``Gloo connectFullMesh ... Connection
    refused``, or a hang until the timeout when both ranks, each comparing its own address
    with a different generation of the other's, took gloo's listening side and waited for
    the other to connect (both stacks in ``gloo::transport::tcp::Pair::waitUntilConnected``).
    ``TORCHELASTIC_RESTART_COUNT`` is the same on every rank of an attempt and grows with
    every failure restart, so it makes the keys unique per attempt. (Restarts for a
    membership change, ``--nnodes MIN:MAX``, do not bump it; shardrec jobs have a fixed size.)
    """
    return f"shardrec/restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _group_store(rank: int, world_size: int, timeout: timedelta) -> dist.Store:
    """The launcher's ``env://`` store (agent-hosted under torchrun, else rank 0 hosts it),
    with keys under :func:`restart_store_prefix`."""
    store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    return dist.PrefixStore(restart_store_prefix(), store)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
