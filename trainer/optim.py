"""The optimizers of a sharded model: the fused embedding optimizers (already inside DMP,
stepping in backward), each data-parallel table's own optimizer, and the dense optimizer over
the remaining parameters, with per-pattern learning-rate groups
(``[training.dense_lr_scale]``), combined into one ``CombinedOptimizer`` the pipeline steps.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Dict, List, Mapping

import torch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from sharding.constraints import TableSettings
from sharding.table_optimizers import data_parallel_table_optimizers
from trainer.config import Config, ConfigError

DENSE_OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
}


def build_optimizer(cfg: Config, dmp: DistributedModelParallel,
                    tables: Dict[str, TableSettings]) -> CombinedOptimizer:
    """Fused embedding optimizer (already in DMP) + each data-parallel table's own optimizer
    + the dense optimizer over the rest."""
    t = cfg.training
    opt_cls = DENSE_OPTIMIZERS[t.dense_optimizer]
    dp_tables, dp_params = data_parallel_table_optimizers(dmp, tables)
    dense_params = {k: v for k, v in in_backward_optimizer_filter(dmp.named_parameters())
                    if k not in dp_params}
    dense = KeyedOptimizerWrapper(
        dense_params,
        lambda params: opt_cls(dense_param_groups(params, t.dense_lr, t.dense_lr_scale),
                               lr=t.dense_lr, weight_decay=t.dense_weight_decay),
        pass_params_dict=True,
    )
    return CombinedOptimizer([dmp.fused_optimizer, dense, *dp_tables])


def dense_param_groups(params: Mapping[str, torch.Tensor], lr: float,
                       scales: Mapping[str, float]) -> List[Dict[str, Any]]:
    """The dense optimizer's parameter groups: one at ``lr`` for every parameter no pattern
    of ``[training.dense_lr_scale]`` matches, and one per pattern at ``lr × multiplier``.

    A pattern matches a parameter's own name (the last part of its dotted name, shell
    wildcards). Why: a few parameters can need a larger step than the rest — e.g. HSTU's
    relative attention bias, scalars that Adam moves by about ``lr`` per step while they
    must travel O(1) before the time-gap signal switches attention on and off.
    Raises ``ConfigError`` for a pattern that matches nothing (naming the parameter names
    there are) and for a parameter two patterns match."""
    owner: Dict[str, str] = {}
    for name in params:
        leaf = name.rsplit(".", 1)[-1]
        hits = [p for p in scales if fnmatch.fnmatchcase(leaf, p)]
        if len(hits) > 1:
            raise ConfigError(f"training.dense_lr_scale: parameter {name} matches several "
                              f"patterns ({', '.join(hits)}); make them disjoint")
        if hits:
            owner[name] = hits[0]
    unused = [p for p in scales if p not in owner.values()]
    if unused:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in params})
        raise ConfigError(f"training.dense_lr_scale.{unused[0]}: matches no dense parameter "
                          f"of this model; their names are {', '.join(leaves)} (embedding "
                          "tables set their lr in [sharding.tables.NAME])")
    groups: List[Dict[str, Any]] = [
        {"params": [v for k, v in params.items() if k not in owner]}]
    groups += [{"params": [v for k, v in params.items() if owner.get(k) == p],
                "lr": lr * scales[p]} for p in scales]
    return [g for g in groups if g["params"]]
