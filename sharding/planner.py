"""Topology, planning, and what a plan costs.

The topology is built through ``TopologyFactory`` with the real memory caps of this machine
(HBM of the GPU, host DDR split across the local ranks) unless the config overrides them,
and the planner gets the real per-rank batch size so its perf and memory estimates hold.
The same code plans a live job (collectively, rank 0 broadcasts) and a hypothetical cluster
from any machine (:func:`plan_model` needs no process group: the model is on meta).

When the tables cannot fit, :class:`PlanDoesNotFit` replaces the planner's generic error
with the largest tables, their bytes, the capacity per rank and the knobs that help.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import (
    HardwareConfig,
    KernelConfig,
    ParameterConstraints,
    PlannerError,
    PlannerErrorType,
    ShardingOption,
    Topology,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.types import ModuleSharder, ShardingPlan

from sharding.table_optimizers import table_weights

logger = logging.getLogger(__name__)

GB = 1024**3
# HBM per GPU assumed by a dry-run plan for a GPU cluster from a machine without one (an
# 80 GB H100 / A100); --hbm-gb / sharding.hbm_gb override it.
DRY_RUN_HBM_GB = 80.0


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
            hbm_gb = DRY_RUN_HBM_GB
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
    # Bandwidths go through HardwareConfig (GB/s → torchrec's bytes/ms), which the factory
    # reads only with use_hardware_based_bandwidth; unset ones keep torchrec's defaults.
    # (Setting Topology attributes afterwards would not reach its comms model.)
    hardware = HardwareConfig(
        intra_host_bw=intra_host_bw_gbps * GB / 1000 if intra_host_bw_gbps else None,
        inter_host_bw=inter_host_bw_gbps * GB / 1000 if inter_host_bw_gbps else None,
    )
    overridden = bool(intra_host_bw_gbps or inter_host_bw_gbps)
    topology = TopologyFactory.create_topology(
        trainer_config=trainer, hardware_config=hardware,
        kernel_config=KernelConfig(compute_device=compute_device,
                                   use_hardware_based_bandwidth=overridden))
    return topology


def topology_from_config(sharding: Any, world_size: int, local_world_size: int,
                         compute_device: str, dry_run: bool = False) -> Topology:
    """:func:`build_topology` with the ``[sharding]`` section's caps and bandwidths."""
    return build_topology(world_size, local_world_size, compute_device,
                          hbm_gb=sharding.hbm_gb, ddr_gb=sharding.ddr_gb,
                          intra_host_bw_gbps=sharding.intra_host_bw_gbps,
                          inter_host_bw_gbps=sharding.inter_host_bw_gbps, dry_run=dry_run)


def build_planner(topology: Topology, batch_size: int,
                  constraints: Optional[Dict[str, ParameterConstraints]] = None,
                  storage_reservation: float = 0.15) -> EmbeddingShardingPlanner:
    # The heuristical reservation keeps room for the dense parameters (+ optimizer state) and
    # the input batches besides the percentage; torchrec warns that it can over-estimate the
    # dense part, which for our small dense arches errs on the safe side.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="HeuristicalStorageReservation",
                                category=FutureWarning)
        reservation = HeuristicalStorageReservation(percentage=storage_reservation)
    return EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size,
        constraints=constraints,
        storage_reservation=reservation,
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
                    planner: EmbeddingShardingPlanner,
                    topology: Optional[Topology] = None,
                    storage_reservation: float = 0.15) -> ShardingPlan:
    """Plan on rank 0 and broadcast, so every rank uses the identical plan.

    A planning failure on rank 0 is broadcast too and raised on every rank (torchrec's own
    ``collective_plan`` would leave the other ranks waiting in the broadcast until timeout).
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return _plan_or_explain(model, sharders, planner, topology, storage_reservation)
    box: List[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", _plan_or_explain(model, sharders, planner, topology,
                                             storage_reservation))
        except Exception as e:  # every rank must learn that rank 0 failed
            box[0] = ("error", type(e).__name__, str(e))
    dist.broadcast_object_list(box, src=0)
    if box[0][0] == "error":
        _, kind, message = box[0]
        if kind == "PlanDoesNotFit":
            raise PlanDoesNotFit(message)
        raise RuntimeError(f"sharding planner failed on rank 0: {kind}: {message}")
    return box[0][1]


def _plan_or_explain(model: nn.Module, sharders: List[ModuleSharder[nn.Module]],
                     planner: EmbeddingShardingPlanner, topology: Optional[Topology],
                     storage_reservation: float) -> ShardingPlan:
    try:
        return planner.plan(model, sharders)
    except PlannerError as e:
        if topology is not None and e.error_type in (PlannerErrorType.INSUFFICIENT_STORAGE,
                                                     PlannerErrorType.STRICT_CONSTRAINTS):
            raise PlanDoesNotFit(capacity_message(model, topology, storage_reservation,
                                                  str(e))) from e
        raise


# -- planning without a process group, and its failure message -----------------------------

class PlanDoesNotFit(RuntimeError):
    """The tables cannot be placed; the message lists the largest tables, the capacity per
    rank and the knobs that help."""


# Optimizer state per weight element (rowwise_adagrad keeps one value per row).
_OPTIMIZER_STATE = {"SGD": 0.0, "Adam": 2.0, "Adagrad": 1.0}


def table_bytes(model: nn.Module) -> Dict[str, Tuple[int, int, int]]:
    """Table name → (rows, dim, bytes of weights + fused optimizer state)."""
    out: Dict[str, Tuple[int, int, int]] = {}
    for name, w in table_weights(model).items():
        rows, dim = w.shape
        elems = rows * dim
        opt = getattr(w, "_optimizer_classes", [None])[0]
        opt_name = getattr(opt, "__name__", "")
        state = rows if opt_name == "RowWiseAdagrad" else elems * _OPTIMIZER_STATE.get(opt_name, 0)
        out[name] = (rows, dim, int((elems + state) * w.element_size()))
    return out


def _gib(n: float) -> str:
    return f"{n / GB:.2f} GiB"


def capacity_message(model: nn.Module, topology: Topology, storage_reservation: float,
                     planner_error: str, top: int = 5) -> str:
    """Why the tables do not fit, and what to change."""
    sizes = table_bytes(model)
    total = sum(b for _, _, b in sizes.values())
    device = topology.compute_device
    tier = "hbm" if device == "cuda" else "ddr"
    cap = getattr(topology.devices[0].storage, tier)
    usable = cap * (1.0 - storage_reservation)
    largest = sorted(sizes.items(), key=lambda kv: -kv[1][2])[:top]
    lines = [
        f"the embedding tables do not fit on {topology.world_size} {device} ranks: they need "
        f"{_gib(total)} (weights + fused optimizer state), and each rank has "
        f"{_gib(cap)} {tier.upper()} of which {_gib(usable)} is usable after the "
        f"{storage_reservation:.0%} storage reservation ({_gib(usable * topology.world_size)} "
        f"in all; dense parameters and batches need their share too)"
        + (f"; UVM kernels can also use {_gib(topology.devices[0].storage.ddr)} of host DDR "
           f"per rank." if device == "cuda" else "."),
        "largest tables:",
    ]
    for name, (rows, dim, b) in largest:
        flag = ("  <- larger than one rank: needs row_wise / table_row_wise / column_wise"
                if b > usable else "")
        lines.append(f"  {name:<24} {rows:>12,} x {dim:<5} {_gib(b):>12}{flag}")
    lines.append("knobs:")
    lines.append(f"  - more ranks (now {topology.world_size}) or more memory per rank "
                 f"(sharding.hbm_gb / sharding.ddr_gb, --hbm-gb / --ddr-gb)")
    if device == "cuda":
        big = largest[0][0] if largest else "NAME"
        lines.append(f"  - UVM caching for the big tables: [sharding.tables.{big}] "
                     f"compute_kernel = \"fused_uvm_caching\", cache_load_factor = 0.2 (rows "
                     f"live in host DDR, a fraction cached in HBM)")
    lines.append("  - smaller tables: a smaller embedding_dim (model.args.embedding_dim or the "
                 "schema), fewer rows (hash ids into fewer num_embeddings), or sgd / "
                 "rowwise_adagrad instead of adam (adam keeps 2 extra copies)")
    lines.append("  - a lower sharding.storage_reservation, or fewer sharding_types "
                 "constraints that pin tables to table_wise")
    lines.append(f"planner: {planner_error.strip().splitlines()[0] if planner_error else ''}")
    return "\n".join(lines)


def plan_model(model: nn.Module, sharders: List[ModuleSharder[nn.Module]],
               planner: EmbeddingShardingPlanner, topology: Topology,
               storage_reservation: float, collective: bool = False) -> ShardingPlan:
    """Plan ``model``: on this process only, or on rank 0 of a live job (``collective``).

    Raises:
        PlanDoesNotFit: the planner found no placement within the memory caps.
    """
    if collective:
        return collective_plan(model, sharders, planner, topology, storage_reservation)
    return _plan_or_explain(model, sharders, planner, topology, storage_reservation)


# -- what the plan costs: per-table shards, per-rank memory and perf ------------------------

@dataclass
class PlanReport:
    """The planner's estimates for its chosen plan (JSON-able via ``to_dict``).

    Args:
        tables: one entry per table: module, table, sharding_type, compute_kernel, ranks and
            shards (rank, offsets, sizes, hbm / ddr bytes, perf in ms).
        ranks: one entry per rank: hbm / ddr bytes used and capacity, perf in ms, and bytes
            per table.
        perf_ms: estimated time of the slowest rank's embedding work per step (the step is
            as slow as its slowest rank).
        perf_imbalance / memory_imbalance: max / mean over ranks (1.0 is perfectly even).
    """

    compute_device: str
    tables: List[Dict[str, Any]]
    ranks: List[Dict[str, Any]]
    perf_ms: float
    perf_imbalance: float
    memory_imbalance: float

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def plan_report(best_plan: List[ShardingOption], topology: Topology) -> PlanReport:
    """Summarise the planner's chosen sharding options (``planner._best_plan``)."""
    ranks = [{"rank": r, "hbm": 0, "ddr": 0, "hbm_cap": d.storage.hbm, "ddr_cap": d.storage.ddr,
              "perf_ms": 0.0, "by_table": {}} for r, d in enumerate(topology.devices)]
    tables = []
    for so in best_plan:
        shards = []
        for sh in so.shards:
            r = int(sh.rank)  # type: ignore[arg-type]
            hbm = int(sh.storage.hbm) if sh.storage else 0
            ddr = int(sh.storage.ddr) if sh.storage else 0
            perf = float(sh.perf.total) if sh.perf else 0.0
            shards.append({"rank": r, "offsets": list(sh.offset), "sizes": list(sh.size),
                           "hbm": hbm, "ddr": ddr, "perf_ms": perf})
            ranks[r]["hbm"] += hbm
            ranks[r]["ddr"] += ddr
            ranks[r]["perf_ms"] += perf
            ranks[r]["by_table"][so.name] = ranks[r]["by_table"].get(so.name, 0) + hbm + ddr
        tables.append({"module": so.path, "table": so.name, "sharding_type": so.sharding_type,
                       "compute_kernel": so.compute_kernel, "ranks": [s["rank"] for s in shards],
                       "shards": shards})
    perf = [r["perf_ms"] for r in ranks]
    mem = [r["hbm"] + r["ddr"] for r in ranks]
    mean_perf = sum(perf) / len(perf) if perf else 0.0
    mean_mem = sum(mem) / len(mem) if mem else 0.0
    return PlanReport(
        compute_device=topology.compute_device,
        tables=tables,
        ranks=ranks,
        perf_ms=max(perf) if perf else 0.0,
        perf_imbalance=max(perf) / mean_perf if mean_perf else 1.0,
        memory_imbalance=max(mem) / mean_mem if mean_mem else 1.0,
    )
