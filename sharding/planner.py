"""Topology and sharding plans.

The topology is built through ``TopologyFactory`` with the real memory caps of this machine
(HBM of the GPU, host DDR split across the local ranks) unless the config overrides them,
and the planner gets the real per-rank batch size so its perf and memory estimates hold.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import (
    KernelConfig,
    ParameterConstraints,
    Topology,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.types import ModuleSharder, ShardingPlan

logger = logging.getLogger(__name__)

GB = 1024**3


def host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 64 * GB


def build_topology(world_size: int, local_world_size: int, compute_device: str,
                   hbm_gb: Optional[float] = None, ddr_gb: Optional[float] = None,
                   intra_host_bw_gbps: Optional[float] = None,
                   inter_host_bw_gbps: Optional[float] = None,
                   dry_run: bool = False) -> Topology:
    """Topology of ``world_size`` ranks, ``local_world_size`` per host.

    Memory caps are per rank: ``hbm_gb`` defaults to this GPU's memory (cuda), ``ddr_gb`` to
    host memory / local ranks. Bandwidths are in GB/s (torchrec wants bytes/ms).
    """
    if compute_device == "cuda" and hbm_gb is None:
        if torch.cuda.is_available():
            hbm_gb = torch.cuda.get_device_properties(0).total_memory / GB
        elif dry_run:
            hbm_gb = 80.0
        else:
            raise ValueError("compute_device='cuda' without a GPU: pass sharding.hbm_gb")
    if ddr_gb is None:
        ddr_gb = host_memory_bytes() / GB / max(1, local_world_size)
    trainer = TrainerConfig(
        world_size=world_size,
        local_world_size=local_world_size,
        hbm_cap_bytes=int(hbm_gb * GB) if hbm_gb is not None else 0,
        ddr_cap_bytes=int(ddr_gb * GB),
    )
    topology = TopologyFactory.create_topology(
        trainer_config=trainer, kernel_config=KernelConfig(compute_device=compute_device))
    # Bandwidth overrides: GB/s → bytes/ms.
    if intra_host_bw_gbps is not None:
        topology._intra_host_bw = intra_host_bw_gbps * GB / 1000  # type: ignore[attr-defined]
    if inter_host_bw_gbps is not None:
        topology._inter_host_bw = inter_host_bw_gbps * GB / 1000  # type: ignore[attr-defined]
    return topology


def build_planner(topology: Topology, batch_size: int,
                  constraints: Optional[Dict[str, ParameterConstraints]] = None,
                  storage_reservation: float = 0.15) -> EmbeddingShardingPlanner:
    return EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size,
        constraints=constraints,
        storage_reservation=HeuristicalStorageReservation(percentage=storage_reservation),
        debug=False,
    )


def plan_summary(plan: ShardingPlan) -> List[str]:
    """One line per table: module path, table, sharding type, kernel, ranks, shard sizes."""
    lines = []
    for module_path, module_plan in plan.plan.items():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            shards = ""
            if ps.sharding_spec is not None:
                shards = " ".join(
                    f"r{s.placement.rank()}:{s.shard_sizes[0]}x{s.shard_sizes[1]}"
                    for s in ps.sharding_spec.shards)  # type: ignore[union-attr]
            lines.append(f"{module_path or '<root>'}.{table}: {ps.sharding_type} "
                         f"kernel={ps.compute_kernel} ranks={ps.ranks} {shards}".rstrip())
    return lines


def collective_plan(model: nn.Module, sharders: List[ModuleSharder[nn.Module]],
                    planner: EmbeddingShardingPlanner) -> ShardingPlan:
    """Plan on rank 0 and broadcast, so every rank uses the identical plan."""
    pg = dist.group.WORLD if dist.is_initialized() else None
    if pg is None:
        return planner.plan(model, sharders)
    return planner.collective_plan(model, sharders, pg)
