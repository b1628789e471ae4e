"""``python -m sharding.plan``: plan a config's tables for any cluster, from any machine.

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
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from data.cli import ArgumentParser
from sharding.planner import GB

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


def run(argv: Sequence[str]) -> int:
    args, overrides = parse_args(argv)
    from trainer.config import ConfigError, load_config, sparse_optimizer_defaults

    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.world_size <= 0:
        print("error: --world-size must be > 0", file=sys.stderr)
        return 2
    local = args.local_world_size or min(args.world_size, 8)
    if local <= 0 or args.world_size % local:
        print(f"error: --local-world-size {local} must divide --world-size "
              f"{args.world_size}", file=sys.stderr)
        return 2
    if args.hbm_gb is not None:
        cfg.sharding.hbm_gb = args.hbm_gb
    if args.ddr_gb is not None:
        cfg.sharding.ddr_gb = args.ddr_gb
    batch_size = args.batch_size or cfg.data.batch_size

    from data.schema import SchemaError, load_schema
    from models import get_model_spec
    from models.blocks import CTRTask
    from sharding.constraints import (
        ShardingConfigError,
        apply_table_optimizers,
        build_constraints,
        resolve_table_settings,
    )
    from sharding.planfile import model_tables, save_plan
    from sharding.planner import (
        PlanDoesNotFit,
        build_planner,
        plan_model,
        plan_report,
        topology_from_config,
    )
    from sharding.sharders import build_sharders

    start = time.perf_counter()
    schema_src = cfg.data.schema or cfg.data.path
    try:
        schema = load_schema(schema_src)
        settings = resolve_table_settings(schema, cfg.sharding, sparse_optimizer_defaults(cfg.training))
        constraints = build_constraints(settings, args.compute_device)
    except (SchemaError, ShardingConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    spec = get_model_spec(cfg.model.name)
    model = CTRTask(spec.build(schema, spec.make_args(cfg.model.flavour, cfg.model.args),
                               "meta"))
    # The planner sizes optimizer state from the optimizer attached to each weight.
    apply_table_optimizers(model, settings)
    topology = topology_from_config(cfg.sharding, args.world_size, local, args.compute_device,
                                    dry_run=True)
    planner = build_planner(topology, batch_size, constraints, cfg.sharding.storage_reservation)
    try:
        plan = plan_model(model, build_sharders(), planner, topology,
                          cfg.sharding.storage_reservation)
    except PlanDoesNotFit as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    # The planner keeps its chosen sharding options (with per-shard storage and perf
    # estimates) only on this attribute; the ShardingPlan drops the estimates.
    report = plan_report(planner._best_plan, topology).to_dict()  # type: ignore[attr-defined]
    shapes = {t: shape for tables in model_tables(model).values() for t, shape in tables.items()}
    dev = topology.devices[0].storage
    print(f"plan for {args.world_size} {args.compute_device} ranks ({local} per host), batch "
          f"{batch_size} per rank: {cfg.model.name} with {len(shapes)} tables from "
          f"{schema_src}")
    print(f"per rank: HBM {dev.hbm / GB:.2f} GiB, DDR {dev.ddr / GB:.2f} GiB; storage "
          f"reservation {cfg.sharding.storage_reservation:.0%}")
    print()
    print("\n".join(format_report(report, shapes, args.world_size)))
    if args.out:
        save_plan(args.out, plan, args.world_size, local, args.compute_device, batch_size,
                  report)
        print(f"saved the plan to {args.out} (train with --sharding.plan_file={args.out})")
    if args.plot:
        from sharding.plot import plot_rank_memory

        renderer = plot_rank_memory(report, args.plot,
                                    f"{cfg.model.name}: {args.world_size} {args.compute_device} "
                                    f"ranks, memory by table")
        print(f"drew per-rank memory by table to {args.plot} ({renderer})")
    print(f"planned in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # torchrec's planner logs a stats table at INFO and, for every data-parallel table, a
    # root-logger warning that it has no sharding spec (expected: DP tables are replicated).
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    logging.getLogger().addFilter(
        lambda record: "Sharding spec not found" not in record.getMessage())
    return run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
