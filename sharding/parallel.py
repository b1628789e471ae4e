"""Wrap an unsharded (meta-device) model with ``DistributedModelParallel``."""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ModuleSharder, ShardingEnv, ShardingPlan

from sharding.dist import DistContext
from sharding.planner import build_planner, build_topology, collective_plan, plan_summary
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
        plan = collective_plan(model, sharders, planner)
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
