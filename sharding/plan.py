"""Planning a config's tables for a cluster you don't have: the command's arguments, the
dry-run planning itself and the text report. The command is ``python -m trainer.plan``
(``shardrec-plan``); ``python -m sharding.plan`` is the same command under its first name,
forwarded by module name (building the model needs the trainer's config and task wrappers,
a layer above this one).

    python -m sharding.plan --config launch/configs/deepfm_criteo.toml \\
        --world-size 64 --local-world-size 8 --compute-device cuda \\
        [--hbm-gb 80] [--ddr-gb 256] [--batch-size 2048] [--out plan.json] [--plot plan.png] \\
        [--sharding.tables.t_cat_2.sharding_types='["row_wise"]' ...]

No process group and no data: the model is built on the meta device from the schema
(``data.schema``, or ``data.path``/schema.json), the per-table settings of ``[sharding]``
become planner constraints, and torchrec's ``EmbeddingShardingPlanner`` plans a hypothetical
topology. Prints each table's placement (type, kernel, ranks, shard sizes), per-rank memory
against capacity, and the planner's perf estimate and imbalance; ``--out`` saves the plan for
``sharding.plan_file``; ``--plot`` draws per-rank memory by table.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, Dict, List, Sequence, Tuple

from torch import nn
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingPlan

from data.cli import ArgumentParser
from sharding.planfile import model_tables
from sharding.planner import (
    GB,
    build_planner,
    plan_model,
    plan_report,
    topology_from_config,
)
from sharding.sharders import build_sharders

logger = logging.getLogger(__name__)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m sharding.plan",
        description="Plan embedding sharding for a hypothetical cluster (no GPUs or process "
                    "group needed). Extra --section.key=value arguments override the config.")
    p.add_argument("--config", required=True, help="trainer TOML config")
    p.add_argument("--world-size", type=int, required=True, help="ranks in the cluster")
    p.add_argument("--local-world-size", type=int, default=None,
                   help="ranks per host (default: min(world size, 8))")
    p.add_argument("--compute-device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--hbm-gb", type=float, default=None,
                   help="GPU memory per rank in GiB (default: sharding.hbm_gb, this GPU's, "
                        "or 80 without a GPU)")
    p.add_argument("--ddr-gb", type=float, default=None,
                   help="host memory per rank in GiB (default: sharding.ddr_gb or this "
                        "host's memory / local ranks)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="per-rank batch size (default: data.batch_size)")
    p.add_argument("--out", default=None, help="save the plan as JSON (for sharding.plan_file)")
    p.add_argument("--plot", default=None, help="draw per-rank memory by table to this PNG")
    return p


def parse_args(argv: Sequence[str]) -> Tuple[argparse.Namespace, List[str]]:
    return build_parser().parse_known_args(list(argv))


def _ranks_text(ranks: List[int], world_size: int) -> str:
    """Compact rank list: ``all 64``, ``0-7``, ``3``, ``0-3,8-11``."""
    uniq = sorted(set(ranks))
    if len(uniq) == world_size and world_size > 1:
        return f"all {world_size}"
    runs: List[str] = []
    start = prev = uniq[0]
    for r in uniq[1:] + [None]:  # type: ignore[list-item]
        if r is not None and r == prev + 1:
            prev = r
            continue
        runs.append(f"{start}-{prev}" if prev != start else f"{start}")
        if r is not None:
            start = prev = r
    return ",".join(runs)


def _shards_text(shards: List[Dict[str, Any]]) -> str:
    """``8 x 1266404x128`` for equal shards, else the distinct sizes with counts."""
    sizes: Dict[str, int] = {}
    for s in shards:
        key = "x".join(map(str, s["sizes"]))
        sizes[key] = sizes.get(key, 0) + 1
    return " + ".join(f"{n} x {k}" if n > 1 else k for k, n in sizes.items())


def format_report(report: Dict[str, Any], table_shapes: Dict[str, Tuple[int, int]],
                  world_size: int) -> List[str]:
    """Human-readable plan: per-table placement, per-rank memory, perf and imbalance."""
    lines = [f"{'table':<16} {'rows x dim':>18}  {'sharding type':<16} {'kernel':<18} "
             f"{'ranks':<12} shards"]
    for t in report["tables"]:
        rows, dim = table_shapes.get(t["table"], (0, 0))
        shards = _shards_text(t["shards"])
        if t["sharding_type"] == "data_parallel":
            shards = f"whole table on every rank ({rows}x{dim})"
        lines.append(f"{t['table']:<16} {f'{rows:,} x {dim}':>18}  {t['sharding_type']:<16} "
                     f"{t['compute_kernel']:<18} {_ranks_text(t['ranks'], world_size):<12} "
                     f"{shards}")
    tier = "hbm" if report["compute_device"] == "cuda" else "ddr"
    lines.append("")
    also = "; DDR used" if tier == "hbm" else ""
    lines.append(f"per-rank memory ({tier.upper()} used / capacity{also}) and estimated "
                 f"embedding time per step:")
    for r in report["ranks"]:
        used, cap = r[tier], r[f"{tier}_cap"]
        extra = f"  ddr {r['ddr'] / GB:7.2f} GiB" if tier == "hbm" else ""
        lines.append(f"  rank {r['rank']:>3}: {used / GB:8.2f} / {cap / GB:7.2f} GiB "
                     f"({100.0 * used / cap if cap else 0.0:5.1f}%){extra}  "
                     f"{r['perf_ms']:8.3f} ms  {len(r['by_table']):>2} tables")
    lines.append("")
    lines.append(f"planner estimate: {report['perf_ms']:.3f} ms of embedding work per step on "
                 f"the slowest rank; perf imbalance {report['perf_imbalance']:.2f}, memory "
                 f"imbalance {report['memory_imbalance']:.2f} (max / mean over ranks)")
    return lines


def dry_run_plan(model: nn.Module, constraints: Dict[str, ParameterConstraints],
                 sharding: Any, world_size: int, local_world_size: int, compute_device: str,
                 batch_size: int) -> Tuple[ShardingPlan, Dict[str, Any], Any]:
    """Plan ``model`` (unsharded, tables on meta, fused optimizers attached) for a
    hypothetical topology of ``world_size`` ranks, no process group.

    Returns the plan, the per-rank report (:func:`sharding.planner.plan_report` as a dict)
    and the topology. Raises ``sharding.planner.PlanDoesNotFit`` naming what does not fit.
    """
    topology = topology_from_config(sharding, world_size, local_world_size, compute_device,
                                    dry_run=True)
    planner = build_planner(topology, batch_size, constraints, sharding.storage_reservation)
    plan = plan_model(model, build_sharders(), planner, topology, sharding.storage_reservation)
    # The planner keeps its chosen sharding options (with per-shard storage and perf
    # estimates) only on this attribute; the ShardingPlan drops the estimates.
    report = plan_report(planner._best_plan, topology).to_dict()  # type: ignore[attr-defined]
    return plan, report, topology


def table_shapes(model: nn.Module) -> Dict[str, Tuple[int, int]]:
    """``{table: (rows, dim)}`` over every embedding collection of ``model``."""
    return {t: shape for tables in model_tables(model).values() for t, shape in tables.items()}


if __name__ == "__main__":
    import runpy

    runpy.run_module("trainer.plan", run_name="__main__", alter_sys=True)
