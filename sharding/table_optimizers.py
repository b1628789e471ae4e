"""Each embedding table's optimizer, from its resolved :class:`~sharding.constraints.TableSettings`.

* :func:`apply_table_optimizers` attaches each table's fused optimizer to its weight with
  ``apply_optimizer_in_backward``; the sharders read it per table (``_optimizer_classes`` /
  ``_optimizer_kwargs``), so tables with different optimizers land in different fused kernels.
* data-parallel tables are not fused: DMP hands them to DDP like dense parameters, so
  :func:`data_parallel_table_optimizers` gives them their table's optimizer as a regular
  (after-backward, on DDP-averaged gradients) optimizer instead of the dense one.
* :func:`table_weights`: table name → unsharded weight, for every EBC / EC of a model.

Example::

    settings = resolve_table_settings(schema, cfg.sharding, sparse)   # sharding.constraints
    apply_table_optimizers(model, settings)    # the unsharded model, before DMP
"""

from __future__ import annotations

import re
from typing import Dict, List, Set, Tuple

from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import KeyedOptimizer, KeyedOptimizerWrapper

from sharding.constraints import TableSettings
from sharding.sharders import FUSED_OPTIMIZERS, TABLE_OPTIMIZERS, fused_optimizer_kwargs


def table_weights(model: nn.Module) -> Dict[str, nn.Parameter]:
    """Table name → its unsharded weight, for every EBC / EC in ``model``.

    torchrec keeps one ``nn.EmbeddingBag`` / ``nn.Embedding`` per table in the
    ``embedding_bags`` / ``embeddings`` ModuleDict, keyed by table name.
    """
    weights: Dict[str, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            tables = module.embedding_bags
        elif isinstance(module, EmbeddingCollection):
            tables = module.embeddings
        else:
            continue
        for name, emb in tables.items():
            if name in weights:
                raise ValueError(f"table {name!r} appears in two embedding modules; table "
                                 f"names must be unique across the model")
            weights[name] = emb.weight
    return weights


def apply_table_optimizers(model: nn.Module, settings: Dict[str, TableSettings]) -> None:
    """Attach each table's fused optimizer to its weight in the unsharded ``model``.

    Must run before ``DistributedModelParallel``: the sharders read the optimizer from the
    weight; a table without one would silently train with SGD lr 0.01.

    Raises:
        ValueError: a table of the model has no settings (names it).
    """
    for name, weight in table_weights(model).items():
        if name not in settings:
            raise ValueError(f"table {name!r} of the model is not in the schema's tables "
                             f"({', '.join(settings)})")
        s = settings[name]
        apply_optimizer_in_backward(
            FUSED_OPTIMIZERS[s.optimizer], [weight],
            fused_optimizer_kwargs(s.optimizer, s.lr, s.weight_decay, s.eps))


_TABLE_PARAM = re.compile(r"(?:^|\.)(?:embedding_bags|embeddings)\.([^.]+)\.weight$")


def data_parallel_table_optimizers(dmp: nn.Module, settings: Dict[str, TableSettings]
                                   ) -> Tuple[List[KeyedOptimizer], Set[str]]:
    """Optimizers for the data-parallel tables of a sharded model, and the parameter names
    they own (to keep them out of the dense optimizer).

    Sharded tables carry ``_in_backward_optimizers`` (their fused update); a table weight
    without it was replicated (data-parallel) and gets its gradient from DDP's all-reduce.
    """
    optimizers: List[KeyedOptimizer] = []
    owned: Set[str] = set()
    for fqn, param in dmp.named_parameters():
        m = _TABLE_PARAM.search(fqn)
        if m is None or m.group(1) not in settings or hasattr(param, "_in_backward_optimizers"):
            continue
        s = settings[m.group(1)]
        cls = TABLE_OPTIMIZERS[s.optimizer]
        kwargs = fused_optimizer_kwargs(s.optimizer, s.lr, s.weight_decay, s.eps)
        optimizers.append(KeyedOptimizerWrapper(
            {fqn: param}, lambda params, cls=cls, kwargs=kwargs: cls(params, **kwargs)))
        owned.add(fqn)
    return optimizers, owned
