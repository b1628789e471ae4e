"""Sharders and the fused (in-backward) sparse optimizer.

torchrec's stock EBC sharder offers row-wise and table-row-wise only on CUDA, although both
give results equal to an unsharded reference on CPU/gloo; :class:`PooledSharder` lists them on
CPU too. Sequence tables (EC) support table-, row- and column-wise with the fused kernel only:
in torchrec 1.8.0 data-parallel and the dense kernel fail on CPU because fbgemm's CPU dense
TBE ignores ``PoolingMode.NONE``, so :class:`SequenceSharder` never proposes them.

Without an explicit fused optimizer, sharded tables silently train with SGD lr 0.01, so
:func:`sharding.table_optimizers.apply_table_optimizers` (per table) or
:func:`apply_sparse_optimizer` (one optimizer for all) must run on the unsharded model before
wrapping. Both sharders offer only the kernels in :data:`SUPPORTED_KERNELS`.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Type

import torch
from torch import nn
from torchrec import optim as trec_optim
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.types import ModuleSharder, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

FUSED_OPTIMIZERS: Dict[str, Type[torch.optim.Optimizer]] = {
    "rowwise_adagrad": trec_optim.RowWiseAdagrad,
    "adagrad": trec_optim.Adagrad,
    "adam": trec_optim.Adam,
    "sgd": trec_optim.SGD,
}

# The same optimizers as plain (after-backward) torch optimizers, for data-parallel tables:
# DDP replicates those, so no fused kernel updates them. torchrec.optim's SGD / Adam /
# Adagrad only name the fused update (their step does nothing); RowWiseAdagrad is a real one.
TABLE_OPTIMIZERS: Dict[str, Type[torch.optim.Optimizer]] = {
    "rowwise_adagrad": trec_optim.RowWiseAdagrad,
    "adagrad": torch.optim.Adagrad,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
}

POOLED_SHARDING_TYPES = [
    ShardingType.DATA_PARALLEL.value,
    ShardingType.TABLE_WISE.value,
    ShardingType.COLUMN_WISE.value,
    ShardingType.TABLE_COLUMN_WISE.value,
    ShardingType.ROW_WISE.value,
    ShardingType.TABLE_ROW_WISE.value,
]
SEQUENCE_SHARDING_TYPES = [
    ShardingType.TABLE_WISE.value,
    ShardingType.ROW_WISE.value,
    ShardingType.COLUMN_WISE.value,
]


# Kernels we offer: fbgemm's fused TBE (HBM or host memory), UVM with or without an HBM
# cache (GPU only), and the dense kernel of data-parallel tables. torchrec also lists its
# key-value / SSD kernels on CUDA, which need an SSD-backed fbgemm build we do not ship, so a
# dry-run plan for a GPU cluster must not pick them.
SUPPORTED_KERNELS = (
    EmbeddingComputeKernel.FUSED.value,
    EmbeddingComputeKernel.FUSED_UVM_CACHING.value,
    EmbeddingComputeKernel.FUSED_UVM.value,
    EmbeddingComputeKernel.DENSE.value,
)


class PooledSharder(EmbeddingBagCollectionSharder):
    """EBC sharder that also offers row-wise and table-row-wise on CPU."""

    def sharding_types(self, compute_device_type: str) -> List[str]:
        types = super().sharding_types(compute_device_type)
        if compute_device_type == "cpu":
            types += [t for t in (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value)
                      if t not in types]
        return types

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        return [k for k in super().compute_kernels(sharding_type, compute_device_type)
                if k in SUPPORTED_KERNELS]


class SequenceSharder(EmbeddingCollectionSharder):
    """EC sharder restricted to what works on every device: TW/RW/CW with the fused kernel."""

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return [t for t in super().sharding_types(compute_device_type)
                if t in SEQUENCE_SHARDING_TYPES]

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        kernels = super().compute_kernels(sharding_type, compute_device_type)
        return [k for k in kernels
                if k in SUPPORTED_KERNELS and k != EmbeddingComputeKernel.DENSE.value]


def fused_optimizer_kwargs(name: str, lr: float, weight_decay: float = 0.0, eps: float = 1e-8,
                           betas: Optional[List[float]] = None) -> Dict[str, Any]:
    kwargs: Dict[str, Any] = {"lr": lr}
    if name in ("rowwise_adagrad", "adagrad", "adam"):
        kwargs["eps"] = eps
        kwargs["weight_decay"] = weight_decay
    if name == "adam" and betas:
        kwargs["betas"] = tuple(betas)
    if name == "sgd" and weight_decay:
        kwargs["weight_decay"] = weight_decay
    return kwargs


def embedding_modules(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules()
            if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection))]


def apply_sparse_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float = 0.0,
                           eps: float = 1e-8, betas: Optional[List[float]] = None) -> None:
    """Attach the fused optimizer to every embedding table of the unsharded ``model``.

    The sharders turn it into fbgemm's fused update in backward; dense parameters are left
    to the dense optimizer (``in_backward_optimizer_filter`` separates them).
    """
    if name not in FUSED_OPTIMIZERS:
        raise ValueError(f"unknown sparse optimizer {name!r}; choose one of "
                         f"{', '.join(FUSED_OPTIMIZERS)}")
    params = [p for m in embedding_modules(model) for p in m.parameters()]
    if params:
        apply_optimizer_in_backward(FUSED_OPTIMIZERS[name], params,
                                    fused_optimizer_kwargs(name, lr, weight_decay, eps, betas))


def build_sharders() -> List[ModuleSharder[nn.Module]]:
    return [PooledSharder(), SequenceSharder()]  # type: ignore[list-item]
