"""Sharding plans as JSON: save one made by ``python -m sharding.plan``, load it in the trainer.

File layout (``version`` 1)::

    {
      "version": 1,
      "world_size": 64, "local_world_size": 8, "compute_device": "cuda", "batch_size": 2048,
      "modules": {                                  # module path → table → placement
        "model.ebc": {
          "t_cat_2": {
            "sharding_type": "table_row_wise", "compute_kernel": "fused",
            "ranks": [0, 1, ...],
            "shards": [{"offsets": [0, 0], "sizes": [1266404, 128], "placement": "rank:0/cuda:0"}, ...],
            "cache_load_factor": null
          }, ...
        }
      },
      "report": {...}                               # planner estimates (sharding.planner.PlanReport)
    }

Data-parallel tables have no shards (every rank holds the whole table). Loading rebuilds
torchrec's ``ParameterSharding`` with an ``EnumerableShardingSpec`` of ``ShardMetadata``;
:func:`check_plan` compares a loaded plan with the model and the job before any rank uses it.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from torch import nn
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec, ShardMetadata
from torchrec.distributed.types import (
    CacheParams,
    EmbeddingModuleShardingPlan,
    ParameterSharding,
    ShardingPlan,
)
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from data.io import write_json_atomic

PLAN_VERSION = 1


class PlanFileError(ValueError):
    """A plan file that is malformed or does not match the model / job; names the table."""


def plan_to_dict(plan: ShardingPlan, world_size: int, local_world_size: int,
                 compute_device: str, batch_size: int,
                 report: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The JSON-able form of ``plan`` (see the module docstring)."""
    modules: Dict[str, Dict[str, Any]] = {}
    for path, module_plan in plan.plan.items():
        tables: Dict[str, Any] = {}
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            shards = []
            if ps.sharding_spec is not None:
                for s in ps.sharding_spec.shards:  # type: ignore[union-attr]
                    shards.append({"offsets": list(s.shard_offsets), "sizes": list(s.shard_sizes),
                                   "placement": str(s.placement)})
            tables[table] = {
                "sharding_type": ps.sharding_type,
                "compute_kernel": ps.compute_kernel,
                "ranks": list(ps.ranks) if ps.ranks is not None else None,
                "shards": shards,
                "cache_load_factor": ps.cache_params.load_factor if ps.cache_params else None,
            }
        modules[path] = tables
    return {"version": PLAN_VERSION, "world_size": world_size,
            "local_world_size": local_world_size, "compute_device": compute_device,
            "batch_size": batch_size, "modules": modules, "report": report or {}}


def save_plan(path: str, plan: ShardingPlan, world_size: int, local_world_size: int,
              compute_device: str, batch_size: int,
              report: Optional[Dict[str, Any]] = None) -> str:
    """Write ``plan`` to ``path`` atomically (temporary file + rename)."""
    write_json_atomic(path, plan_to_dict(plan, world_size, local_world_size, compute_device,
                                         batch_size, report))
    return path


def plan_from_dict(d: Dict[str, Any], source: str = "plan") -> Tuple[ShardingPlan, Dict[str, Any]]:
    """``(ShardingPlan, header)``; the header has world_size, local_world_size,
    compute_device and batch_size."""
    if d.get("version") != PLAN_VERSION or "modules" not in d:
        raise PlanFileError(f"{source}: not a shardrec plan (version {PLAN_VERSION} with "
                            f"'modules'); write one with `python -m sharding.plan --out`")
    plan: Dict[str, EmbeddingModuleShardingPlan] = {}
    for path, tables in d["modules"].items():
        module_plan = EmbeddingModuleShardingPlan()
        for table, t in tables.items():
            try:
                spec = None
                if t["shards"]:
                    spec = EnumerableShardingSpec([
                        ShardMetadata(shard_offsets=list(s["offsets"]),
                                      shard_sizes=list(s["sizes"]),
                                      placement=s["placement"])
                        for s in t["shards"]])
                clf = t.get("cache_load_factor")
                module_plan[table] = ParameterSharding(
                    sharding_type=t["sharding_type"],
                    compute_kernel=t["compute_kernel"],
                    ranks=list(t["ranks"]) if t.get("ranks") is not None else None,
                    sharding_spec=spec,
                    cache_params=CacheParams(load_factor=clf) if clf is not None else None,
                )
            except (KeyError, TypeError, ValueError) as e:
                raise PlanFileError(f"{source}: table {table!r} of {path!r} is malformed "
                                    f"({type(e).__name__}: {e})") from None
        plan[path] = module_plan
    header = {k: d.get(k) for k in ("world_size", "local_world_size", "compute_device",
                                    "batch_size")}
    return ShardingPlan(plan), header  # type: ignore[arg-type]


def load_plan(path: str) -> Tuple[ShardingPlan, Dict[str, Any]]:
    """Read a plan written by :func:`save_plan`."""
    import json

    try:
        with open(path) as fh:
            d = json.load(fh)
    except FileNotFoundError:
        raise PlanFileError(f"plan file {path} not found") from None
    except json.JSONDecodeError as e:
        raise PlanFileError(f"{path}: not valid JSON ({e})") from None
    return plan_from_dict(d, source=path)


def model_tables(model: nn.Module) -> Dict[str, Dict[str, Tuple[int, int]]]:
    """Module path → table → (rows, dim) for every EBC / EC of ``model``."""
    out: Dict[str, Dict[str, Tuple[int, int]]] = {}
    for path, module in model.named_modules():
        if isinstance(module, EmbeddingBagCollection):
            configs = module.embedding_bag_configs()
        elif isinstance(module, EmbeddingCollection):
            configs = module.embedding_configs()
        else:
            continue
        out[path] = {c.name: (c.num_embeddings, c.embedding_dim) for c in configs}
    return out


def check_plan(plan: ShardingPlan, header: Dict[str, Any], model: nn.Module, world_size: int,
               compute_device: str, source: str = "plan",
               local_world_size: Optional[int] = None) -> None:
    """Raise :class:`PlanFileError` listing every way ``plan`` does not fit this job.

    Checks the world size, device (and on GPUs the ranks per host) the plan was made for,
    that every table of the model has a placement and the plan names no other table, that
    ranks lie in the world, and that each table's shards tile exactly its ``rows x dim``.
    """
    errors: List[str] = []
    if header.get("world_size") != world_size:
        errors.append(f"the plan is for {header.get('world_size')} ranks, this job has "
                      f"{world_size}: re-plan with --world-size {world_size}")
    if header.get("compute_device") not in (None, compute_device):
        errors.append(f"the plan is for {header.get('compute_device')} and this job runs on "
                      f"{compute_device}: re-plan with --compute-device {compute_device}")
    if (compute_device == "cuda" and local_world_size is not None
            and header.get("local_world_size") not in (None, local_world_size)):
        # shards name their GPU as cuda:(rank % local world size)
        errors.append(f"the plan is for {header.get('local_world_size')} GPUs per host, this "
                      f"job has {local_world_size}: re-plan with --local-world-size "
                      f"{local_world_size}")
    if errors:  # a plan for another world or device: per-shard complaints would be noise
        raise PlanFileError(f"{source} does not match this job:\n  - " + "\n  - ".join(errors))
    tables = model_tables(model)
    for path, module_tables in tables.items():
        module_plan = plan.plan.get(path)
        if module_plan is None:
            errors.append(f"module {path!r} (tables {', '.join(module_tables)}) has no "
                          f"entry in the plan; plan modules: {', '.join(plan.plan) or '(none)'}")
            continue
        for table, (rows, dim) in module_tables.items():
            ps = module_plan.get(table)  # type: ignore[union-attr]
            if ps is None:
                errors.append(f"table {table!r} of {path!r} has no placement in the plan")
                continue
            errors += _check_table(f"{path}.{table}", ps, rows, dim, world_size)
        for table in module_plan:  # type: ignore[union-attr]
            if table not in module_tables:
                errors.append(f"the plan places table {table!r} in {path!r}, which has no such "
                              f"table; its tables are: {', '.join(module_tables)}")
    for path in plan.plan:
        if path not in tables:
            errors.append(f"the plan names module {path!r}, which the model does not have; "
                          f"embedding modules: {', '.join(tables) or '(none)'}")
    if errors:
        raise PlanFileError(f"{source} does not match this model / job:\n  - "
                            + "\n  - ".join(errors))


def _check_table(name: str, ps: ParameterSharding, rows: int, dim: int,
                 world_size: int) -> List[str]:
    errors: List[str] = []
    bad_ranks = [r for r in (ps.ranks or []) if not 0 <= r < world_size]
    if bad_ranks:
        errors.append(f"table {name!r}: ranks {bad_ranks} outside 0..{world_size - 1}")
    if ps.sharding_spec is None:
        if ps.sharding_type != "data_parallel":
            errors.append(f"table {name!r}: {ps.sharding_type} needs shards")
        return errors
    area = 0
    for s in ps.sharding_spec.shards:  # type: ignore[union-attr]
        (r0, c0), (nr, nc) = s.shard_offsets, s.shard_sizes
        area += nr * nc
        if r0 < 0 or c0 < 0 or r0 + nr > rows or c0 + nc > dim:
            errors.append(f"table {name!r}: shard at {s.shard_offsets} of size {s.shard_sizes} "
                          f"lies outside the table's {rows} x {dim}")
        rank = s.placement.rank() if s.placement is not None else None
        if rank is None or not 0 <= rank < world_size:
            errors.append(f"table {name!r}: shard placed on {s.placement}, outside ranks "
                          f"0..{world_size - 1}")
    if area != rows * dim:
        errors.append(f"table {name!r}: shards cover {area} of the table's {rows} x {dim} = "
                      f"{rows * dim} values (was the plan made for other table sizes?)")
    return errors
