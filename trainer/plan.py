"""``python -m trainer.plan`` (also ``shardrec-plan`` and ``python -m sharding.plan``): plan a
config's tables for any cluster, from any machine.

    python -m trainer.plan --config launch/configs/deepfm_criteo.toml \\
        --world-size 64 --local-world-size 8 --compute-device cuda \\
        [--hbm-gb 80] [--ddr-gb 256] [--batch-size 2048] [--out plan.json] [--plot plan.png] \\
        [--sharding.tables.t_cat_2.sharding_types='["row_wise"]' ...]

No process group and no data: the model is built on the meta device from the schema
(``data.schema``, or ``data.path``/schema.json) through the trainer's own builder (so each
model kind gets its own task wrapper), the per-table settings of ``[sharding]`` become planner
constraints, and torchrec's ``EmbeddingShardingPlanner`` plans a hypothetical topology
(:func:`sharding.plan.dry_run_plan`). Prints each table's placement (type, kernel, ranks, shard
sizes), per-rank memory against capacity, and the planner's perf estimate and imbalance;
``--out`` saves the plan for ``sharding.plan_file``; ``--plot`` draws per-rank memory by table.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Optional, Sequence

from data.schema import SchemaError, load_schema
from sharding.constraints import ShardingConfigError, build_constraints, resolve_table_settings
from sharding.plan import dry_run_plan, format_report, parse_args, table_shapes
from sharding.planfile import save_plan
from sharding.planner import GB, PlanDoesNotFit
from sharding.table_optimizers import apply_table_optimizers
from trainer.config import ConfigError, sparse_optimizer_defaults
from trainer.trainer import build_model, model_task
from trainer.validation import load_checked_config


def run(argv: Sequence[str]) -> int:
    args, overrides = parse_args(argv)
    try:
        cfg = load_checked_config(args.config, overrides)
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

    start = time.perf_counter()
    schema_src = cfg.data.schema or cfg.data.path
    try:
        schema = load_schema(schema_src)
        task = model_task(cfg, schema)
        # The model's tables: the schema's, plus any its task kind adds (item features).
        settings = resolve_table_settings(task.table_schema(), cfg.sharding,
                                          sparse_optimizer_defaults(cfg.training))
        constraints = build_constraints(settings, args.compute_device)
    except (SchemaError, ShardingConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = build_model(cfg, schema, args.compute_device, task)
    # The planner sizes optimizer state from the optimizer attached to each weight.
    apply_table_optimizers(model, settings)
    try:
        plan, report, topology = dry_run_plan(model, constraints, cfg.sharding, args.world_size,
                                              local, args.compute_device, batch_size)
    except PlanDoesNotFit as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    shapes = table_shapes(model)
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
