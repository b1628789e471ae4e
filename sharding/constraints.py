"""Per-table sharding settings from config → planner constraints.

Each embedding table gets a :class:`TableSettings`: the ``[sharding]`` defaults
(:class:`ShardingSettings`), overridden by ``[sharding.tables.NAME]``, with the default fused
optimizer (:class:`SparseOptimizerDefaults`, which the trainer fills from ``[training]
sparse_*``) unless the table names its own. From those settings:

* :func:`build_constraints` makes torchrec ``ParameterConstraints`` keyed by table name
  (allowed sharding types, compute kernel, pooling-factor hint per feature, cache load
  factor of ``fused_uvm_caching``), checked against the compute device;
* the same settings give each table its optimizer: :mod:`sharding.table_optimizers`.

Example::

    sparse = SparseOptimizerDefaults("rowwise_adagrad", lr=0.05)
    settings = resolve_table_settings(schema, cfg.sharding, sparse)
    apply_table_optimizers(model, settings)   # sharding.table_optimizers; before DMP
    constraints = build_constraints(settings, "cuda")     # {"t_cat_2": ParameterConstraints}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import CacheParams

from data.schema import Schema, TableSpec
from sharding.sharders import (
    FUSED_OPTIMIZERS,
    POOLED_SHARDING_TYPES,
    SEQUENCE_SHARDING_TYPES,
)

# Kernels that need a GPU (UVM = host memory mapped into the GPU's address space).
GPU_ONLY_KERNELS = ("fused_uvm", "fused_uvm_caching")
# fbgemm's CPU fused kernels implement only the exact SGD / Adagrad family (Adam asserts).
CPU_FUSED_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")


class ShardingSettings(Protocol):
    """What table resolution reads of the ``[sharding]`` section (the trainer's
    ``ShardingConfig`` has these fields; tests may pass any object that has them)."""

    tables: Mapping[str, Mapping[str, Any]]
    sharding_types: Sequence[str]
    compute_kernel: Optional[str]
    cache_load_factor: Optional[float]
    pooling_factor: Optional[float]
    min_partition: Optional[int]


@dataclass(frozen=True)
class SparseOptimizerDefaults:
    """The fused optimizer of every table that does not name its own.

    Args:
        optimizer: one of :data:`sharding.sharders.FUSED_OPTIMIZERS`.
        lr / weight_decay / eps: its hyper-parameters.
    """

    optimizer: str = "rowwise_adagrad"
    lr: float = 0.05
    weight_decay: float = 0.0
    eps: float = 1e-8


class ShardingConfigError(ValueError):
    """Per-table sharding settings that do not fit the model or the device; the message
    lists every problem with its fix."""


@dataclass(frozen=True)
class TableSettings:
    """Resolved sharding and optimizer settings of one embedding table.

    Args:
        table: the schema's table (name, rows, dim, features, kind).
        sharding_types: allowed types; ``None`` lets the sharder offer all it supports.
        compute_kernel: the kernel, or ``None`` for the planner's choice.
        cache_load_factor: fraction of rows cached in HBM (``fused_uvm_caching`` only).
        pooling_factor: average ids per example per feature (planner estimate).
        min_partition: narrowest column-wise shard.
        optimizer / lr / weight_decay / eps: the fused optimizer that updates the table.
    """

    table: TableSpec
    sharding_types: Optional[Tuple[str, ...]]
    compute_kernel: Optional[str]
    cache_load_factor: Optional[float]
    pooling_factor: float
    min_partition: Optional[int]
    optimizer: str
    lr: float
    weight_decay: float
    eps: float

    @property
    def name(self) -> str:
        return self.table.name


def resolve_table_settings(schema: Schema, sharding: ShardingSettings,
                           sparse: SparseOptimizerDefaults) -> Dict[str, TableSettings]:
    """Settings of every table of ``schema`` (pooled and sequence), in schema order.

    Raises:
        ShardingConfigError: listing every ``[sharding.tables.NAME]`` that names no table
            (with the valid names) and every sharding type / kernel a table cannot use.
    """
    settings, errors = _resolve(schema, sharding, sparse)
    if errors:
        raise ShardingConfigError("invalid sharding settings:\n  - " + "\n  - ".join(errors))
    return settings


def table_settings_errors(schema: Schema, sharding: ShardingSettings,
                          sparse: SparseOptimizerDefaults) -> List[str]:
    """The problems :func:`resolve_table_settings` would raise, as a list (for the config
    validator, which reports every problem at once)."""
    return _resolve(schema, sharding, sparse)[1]


def _resolve(schema: Schema, sharding: ShardingSettings, sparse: SparseOptimizerDefaults
             ) -> Tuple[Dict[str, TableSettings], List[str]]:
    tables = schema.tables()
    errors: List[str] = []
    for name in sharding.tables:
        if name not in tables:
            errors.append(f"sharding.tables.{name}: the model has no table {name!r}; its "
                          f"tables are: {', '.join(tables) or '(none)'}")
    out: Dict[str, TableSettings] = {}
    for name, table in tables.items():
        override: Dict[str, Any] = sharding.tables.get(name, {})

        def pick(key: str, default: Any) -> Any:
            value = override.get(key)
            return default if value is None else value

        types = pick("sharding_types", sharding.sharding_types or None)
        kernel = pick("compute_kernel", sharding.compute_kernel or None)
        default_pf = float(_max_len(schema, table)) if table.kind == "sequence" else 1.0
        settings = TableSettings(
            table=table,
            sharding_types=tuple(types) if types else None,
            compute_kernel=kernel,
            cache_load_factor=pick("cache_load_factor", sharding.cache_load_factor),
            pooling_factor=float(pick("pooling_factor",
                                      sharding.pooling_factor
                                      if table.kind == "sparse" and sharding.pooling_factor
                                      else default_pf)),
            min_partition=pick("min_partition", sharding.min_partition),
            optimizer=pick("optimizer", sparse.optimizer),
            lr=float(pick("lr", sparse.lr)),
            weight_decay=float(pick("weight_decay", sparse.weight_decay)),
            eps=float(sparse.eps),
        )
        errors += _check_table(settings, where=_where(name, override))
        out[name] = settings
    return out, errors


def _where(name: str, override: Dict[str, Any]) -> str:
    return f"sharding.tables.{name}" if override else f"[sharding] defaults for table {name!r}"


def _max_len(schema: Schema, table: TableSpec) -> int:
    return max(schema.feature(f).max_len for f in table.features)


def _check_table(s: TableSettings, where: str) -> List[str]:
    """Problems that do not depend on the compute device."""
    errors: List[str] = []
    if s.table.kind == "sequence":
        bad = [t for t in (s.sharding_types or ()) if t not in SEQUENCE_SHARDING_TYPES]
        if bad:
            errors.append(
                f"{where}: sequence table {s.name!r} cannot use {', '.join(bad)}: sequence "
                f"(unpooled) tables support {', '.join(SEQUENCE_SHARDING_TYPES)} with a fused "
                f"kernel; data_parallel and the dense kernel give wrong results in torchrec "
                f"1.8.0 because fbgemm's CPU dense kernel ignores PoolingMode.NONE")
        if s.compute_kernel == "dense":
            errors.append(
                f"{where}: sequence table {s.name!r} cannot use the dense kernel (fbgemm's "
                f"dense kernel ignores PoolingMode.NONE in torchrec 1.8.0); use fused")
    else:
        bad = [t for t in (s.sharding_types or ()) if t not in POOLED_SHARDING_TYPES]
        if bad:
            errors.append(f"{where}: unknown sharding type(s) {', '.join(bad)}; choose from "
                          f"{', '.join(POOLED_SHARDING_TYPES)}")
    types = set(s.sharding_types or ())
    if s.compute_kernel == "dense" and types and types != {"data_parallel"}:
        errors.append(f"{where}: the dense kernel is only used by data_parallel; set "
                      f"sharding_types = [\"data_parallel\"] or compute_kernel = \"fused\"")
    if s.compute_kernel not in (None, "dense") and types == {"data_parallel"}:
        errors.append(f"{where}: data_parallel tables use the dense kernel, not "
                      f"{s.compute_kernel!r}; drop compute_kernel or pick another type")
    if s.cache_load_factor is not None and s.compute_kernel not in (None, "fused_uvm_caching"):
        errors.append(f"{where}: cache_load_factor only applies to compute_kernel = "
                      f"\"fused_uvm_caching\" (got {s.compute_kernel!r})")
    if s.optimizer not in FUSED_OPTIMIZERS:
        errors.append(f"{where}: unknown optimizer {s.optimizer!r}; choose from "
                      f"{', '.join(FUSED_OPTIMIZERS)}")
    return errors


def build_constraints(settings: Dict[str, TableSettings], compute_device: str
                      ) -> Dict[str, ParameterConstraints]:
    """Planner constraints keyed by table name for a ``compute_device`` (cpu | cuda) run.

    Raises:
        ShardingConfigError: a GPU-only kernel (UVM) or fused optimizer (Adam) requested for
            a CPU plan, naming the table.
    """
    errors: List[str] = []
    out: Dict[str, ParameterConstraints] = {}
    for name, s in settings.items():
        if compute_device != "cuda" and s.compute_kernel in GPU_ONLY_KERNELS:
            errors.append(f"table {name!r}: compute_kernel {s.compute_kernel!r} needs "
                          f"compute_device cuda (this plan is for {compute_device}); use "
                          f"\"fused\"")
            continue
        if (compute_device != "cuda" and s.optimizer not in CPU_FUSED_OPTIMIZERS
                and s.sharding_types != ("data_parallel",)):
            errors.append(f"table {name!r}: fused optimizer {s.optimizer!r} runs only on GPU "
                          f"(fbgemm's CPU kernels support {', '.join(CPU_FUSED_OPTIMIZERS)}); "
                          f"pick one of those for a {compute_device} run, or make the table "
                          f"data_parallel")
            continue
        cache = None
        # Also when the kernel is the planner's choice: should it pick UVM caching, the
        # table's load factor applies instead of torchrec's default.
        if s.cache_load_factor is not None and s.compute_kernel in (None, "fused_uvm_caching"):
            cache = CacheParams(load_factor=s.cache_load_factor)
        n_features = len(s.table.features)
        out[name] = ParameterConstraints(
            sharding_types=list(s.sharding_types) if s.sharding_types else None,
            compute_kernels=[s.compute_kernel] if s.compute_kernel else None,
            min_partition=s.min_partition,
            pooling_factors=[s.pooling_factor] * n_features,
            feature_names=list(s.table.features),
            cache_params=cache,
        )
    if errors:
        raise ShardingConfigError("invalid sharding settings:\n  - " + "\n  - ".join(errors))
    return out
