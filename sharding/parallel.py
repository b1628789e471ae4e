"""Wrap an unsharded (meta-device) model with ``DistributedModelParallel``.

:func:`shard_model_from_config` is the trainer's entry: a saved plan (``sharding.plan_file``,
checked against the model and the world) or a collective plan from the ``[sharding]``
section's topology and per-table constraints.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ModuleSharder, ShardingEnv, ShardingPlan

from sharding.constraints import TableSettings, build_constraints
from sharding.dist import DistContext
from sharding.planfile import check_plan, load_plan
from sharding.planner import (
    build_planner,
    build_topology,
    plan_model,
    plan_summary,
    topology_from_config,
)
from sharding.sharders import build_sharders

logger = logging.getLogger(__name__)


def shard_model(model: nn.Module, ctx: DistContext, batch_size: int,
                constraints: Optional[Dict[str, ParameterConstraints]] = None,
                plan: Optional[ShardingPlan] = None,
                sharders: Optional[List[ModuleSharder[nn.Module]]] = None,
                hbm_gb: Optional[float] = None, ddr_gb: Optional[float] = None,
                storage_reservation: float = 0.15,
                ) -> Tuple[DistributedModelParallel, ShardingPlan]:
    """Plan (collectively, unless ``plan`` is given) and wrap ``model`` in DMP.

    ``model`` should hold its embedding collections on the meta device; DMP materialises
    each rank's shards directly, so no rank ever allocates a full table. Dense parameters
    are replicated (DDP) on ``ctx.device``.
    """
    sharders = sharders or build_sharders()
    if plan is None:
        topology = build_topology(ctx.world_size, ctx.local_world_size, ctx.device.type,
                                  hbm_gb=hbm_gb, ddr_gb=ddr_gb)
        planner = build_planner(topology, batch_size, constraints, storage_reservation)
        plan = plan_model(model, sharders, planner, topology, storage_reservation,
                          collective=True)
    return wrap_model(model, ctx, plan, sharders)


def shard_model_from_config(model: nn.Module, ctx: DistContext, sharding: Any,
                            settings: Dict[str, TableSettings], batch_size: int,
                            ) -> Tuple[DistributedModelParallel, ShardingPlan]:
    """Shard ``model`` as the ``[sharding]`` section says (see the module docstring).

    Args:
        model: unsharded, embeddings on meta, fused optimizers attached
            (:func:`sharding.table_optimizers.apply_table_optimizers`).
        sharding: the ``ShardingConfig``.
        settings: per-table settings (:func:`sharding.constraints.resolve_table_settings`).
        batch_size: per-rank batch size, for the planner's estimates.
    """
    sharders = build_sharders()
    # Device checks of the per-table settings (GPU-only kernels and optimizers) hold for a
    # saved plan too.
    constraints = build_constraints(settings, ctx.device.type)
    if sharding.plan_file:
        plan, header = load_plan(sharding.plan_file)
        check_plan(plan, header, model, ctx.world_size, ctx.device.type,
                   source=sharding.plan_file, local_world_size=ctx.local_world_size)
        if ctx.is_main:
            logger.info("using the saved plan %s", sharding.plan_file)
    else:
        topology = topology_from_config(sharding, ctx.world_size, ctx.local_world_size,
                                        ctx.device.type)
        planner = build_planner(topology, batch_size,
                                constraints,
                                sharding.storage_reservation)
        plan = plan_model(model, sharders, planner, topology, sharding.storage_reservation,
                          collective=True)
    return wrap_model(model, ctx, plan, sharders)


def wrap_model(model: nn.Module, ctx: DistContext, plan: ShardingPlan,
               sharders: List[ModuleSharder[nn.Module]],
               ) -> Tuple[DistributedModelParallel, ShardingPlan]:
    """``DistributedModelParallel`` over the default process group with ``plan``."""
    if ctx.is_main:
        logger.info("sharding plan (%d ranks):\n  %s", ctx.world_size,
                    "\n  ".join(plan_summary(plan)))
    pg = dist.group.WORLD
    dmp = DistributedModelParallel(
        module=model,
        device=ctx.device,
        env=ShardingEnv.from_process_group(pg),  # type: ignore[arg-type]
        plan=plan,
        sharders=sharders,
    )
    return dmp, plan
