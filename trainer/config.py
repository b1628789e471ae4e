"""Run configuration: dataclass sections, a TOML file, and ``--section.key=value`` overrides.

Precedence is CLI > file > defaults. Every problem — unknown section or key, wrong type,
value outside its choices — is collected and reported at once before any work starts, with
the valid keys or choices listed. The resolved config is written to the run directory as
TOML so a run can be repeated exactly.

Example::

    cfg = load_config("launch/configs/deepfm_synthetic.toml",
                      ["--training.steps=100", "--data.batch_size", "2048"])
    cfg.training.steps      # 100
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import tomllib
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import tomli_w

from data.io import write_text_atomic
from data.lengths import length_options_errors

if TYPE_CHECKING:  # the sharding layer pulls torchrec in; config parsing stays light
    from sharding.constraints import SparseOptimizerDefaults

from trainer.config_ranges import range_errors


class ConfigError(ValueError):
    """One or more invalid config entries; the message lists each with the fix."""


def _f(default: Any, help: str, choices: Optional[Sequence[Any]] = None,
       entries: Optional[type] = None, **kw: Any) -> Any:
    meta: Dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if entries is not None:  # a table of NAME -> dataclass entries (e.g. sharding.tables)
        meta["entries"] = entries
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class ModelConfig:
    """Which over-arch to train (``models.get_model_spec``) and its arguments."""

    name: str = _f("deepfm", "registered model name (see `python -m trainer --list-models`)")
    flavour: str = _f("default", "named argument preset of the model")
    args: Dict[str, Any] = _f({}, "overrides of the model's argument dataclass "
                                  "([model.args] table; keys depend on the model)")


@dataclass
class DataConfig:
    """Dataset directory and reader options."""

    path: str = _f("datasets/synthetic_ctr_demo",
                   "dataset directory (schema.json, meta.json, train/ valid/ test/ parquet; "
                   "older datasets: train/ eval/)")
    schema: str = _f("", "schema JSON file to use instead of PATH/schema.json (lets "
                         "`python -m sharding.plan` plan a model whose data is elsewhere)")
    train_split: str = _f("train", "subdirectory with the training parquet files")
    eval_split: str = _f("", "subdirectory of the final evaluation (empty: test/, or eval/ "
                             "in older datasets)")
    valid_split: str = _f("", "subdirectory of the periodic evaluations and early stopping "
                              "(empty: valid/ if the dataset has one, else the eval_split)")
    batch_size: int = _f(4096, "training examples per rank per step")
    eval_batch_size: int = _f(0, "evaluation examples per rank per step (0: batch_size)")
    shuffle: bool = _f(True, "shuffle row-group order and rows within row groups each epoch")
    prefetch: int = _f(4, "batches built ahead in a background thread (0: inline)")
    shuffle_buffer_rows: int = _f(0, "rows shuffled together across consecutive row groups "
                                     "(0: shuffle within each row group)")
    remainder: str = _f("drop", "rows that do not fill a batch on every rank: drop them, or "
                                "pad by wrapping around to the rank's first rows",
                        choices=("drop", "pad"))
    validate: bool = _f(True, "check ids, dense values, labels and timestamps while reading")
    length_sampling: str = _f("off", "train on a random recent suffix of long histories "
                                     "(docs/hstu-long.md): hstu keeps rows up to max_len^(alpha/2) "
                                     "and cuts longer ones to that with probability "
                                     "1 - max_len^alpha / L^2; uniform keeps U{min_len..L}",
                              choices=("off", "hstu", "uniform"))
    length_sampling_alpha: float = _f(1.6, "alpha of length_sampling=hstu, in (0, 2]")
    length_sampling_min_len: int = _f(64, "shortest suffix of length_sampling=uniform")
    balance_batches: int = _f(0, "deal the rows of every M consecutive training batches into M "
                                 "batches of near-equal cost (same batch size and count; 0: off)")
    balance_cost: str = _f("tokens", "cost balance_batches equalises: tokens (sum of lengths) "
                                     "or attention (sum of squared lengths)",
                           choices=("tokens", "attention"))


@dataclass
class TrainingConfig:
    """Length of training, optimizers and cadence."""

    steps: int = _f(0, "training steps (batches per rank); 0: derive from epochs")
    epochs: float = _f(1.0, "passes over the training split when steps = 0")
    dense_optimizer: str = _f("adam", "optimizer of dense (non-embedding) parameters",
                              choices=("adam", "adamw", "adagrad", "sgd"))
    dense_lr: float = _f(1e-3, "dense learning rate")
    dense_weight_decay: float = _f(0.0, "dense weight decay")
    dense_lr_scale: Dict[str, float] = _f({}, "per-parameter multipliers of dense_lr: "
                                          "[training.dense_lr_scale] maps a pattern of a "
                                          "parameter's own name (the last part of its dotted "
                                          "name, shell wildcards, e.g. 'rab_*' = 30) to a "
                                          "multiplier")
    sparse_optimizer: str = _f("rowwise_adagrad",
                               "fused optimizer of the embedding tables (runs in backward)",
                               choices=("rowwise_adagrad", "adagrad", "adam", "sgd"))
    sparse_lr: float = _f(0.05, "embedding learning rate")
    sparse_weight_decay: float = _f(0.0, "embedding weight decay")
    sparse_eps: float = _f(1e-8, "epsilon of the adaptive embedding optimizers")
    dense_dtype: str = _f("fp32", "autocast dtype of the dense and over-arch compute "
                                  "(embeddings, loss and optimizer state stay fp32)",
                          choices=("fp32", "bf16", "fp16"))
    eval_every: int = _f(0, "evaluate every N steps (0: only at the end)")
    eval_batches: int = _f(0, "evaluation batches per rank (0: the whole eval split)")
    log_every: int = _f(50, "rank-0 log line every N steps")
    early_stop_metric: str = _f("", "metric of the valid split that selects the best "
                                    "checkpoint and stops training (e.g. auc, ne, logloss, "
                                    "ndcg@10, hr@10; empty: off); evaluates every epoch when "
                                    "eval_every = 0")
    early_stop_patience: int = _f(3, "stop after this many evaluations without improving "
                                     "early_stop_metric (0: never stop, only keep the best)")
    seed: int = _f(0, "seed of model init and data shuffling")
    run_dir: str = _f("runs/default", "where the resolved config, logs and metrics go")
    fail_at: str = _f("", "fault injection for recovery drills: 'step:N' SIGKILLs rank "
                          "fail_rank after step N, 'save:N' during the checkpoint write of step "
                          "N, 'sigterm:N' sends SIGTERM to the launcher after step N (only on "
                          "a fresh start, never after a resume or restart)")
    fail_rank: int = _f(0, "the rank fail_at kills")


# Sharding types and compute kernels a table may be constrained to (torchrec's ShardingType /
# EmbeddingComputeKernel values; tests check they match sharding.sharders).
SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_row_wise",
                  "table_column_wise", "data_parallel")
COMPUTE_KERNELS = ("fused", "fused_uvm_caching", "fused_uvm", "dense")
SPARSE_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "adam", "sgd")



def sparse_optimizer_defaults(training: TrainingConfig) -> SparseOptimizerDefaults:
    """``[training] sparse_*`` as the sharding layer's default fused optimizer."""
    from sharding.constraints import SparseOptimizerDefaults

    return SparseOptimizerDefaults(training.sparse_optimizer, lr=float(training.sparse_lr),
                                   weight_decay=float(training.sparse_weight_decay),
                                   eps=float(training.sparse_eps))

@dataclass
class TableShardingConfig:
    """Per-table overrides (``[sharding.tables.NAME]``); unset keys take the defaults of
    ``[sharding]`` and the sparse optimizer of ``[training]``."""

    sharding_types: Optional[List[str]] = _f(None, "sharding types the planner may choose "
                                                   "for this table", choices=SHARDING_TYPES)
    compute_kernel: Optional[str] = _f(None, "embedding kernel of this table",
                                       choices=COMPUTE_KERNELS)
    cache_load_factor: Optional[float] = _f(None, "fraction of rows cached in HBM with "
                                                  "fused_uvm_caching (GPU only)")
    pooling_factor: Optional[float] = _f(None, "average ids per example per feature (planner "
                                               "hint for compute and comms estimates)")
    min_partition: Optional[int] = _f(None, "column_wise: narrowest column shard (a multiple "
                                            "of 4; torchrec's default keeps dims <= 128 whole)")
    optimizer: Optional[str] = _f(None, "fused optimizer of this table",
                                  choices=SPARSE_OPTIMIZERS)
    lr: Optional[float] = _f(None, "learning rate of this table")
    weight_decay: Optional[float] = _f(None, "weight decay of this table")


@dataclass
class ShardingConfig:
    """Planner inputs: topology, per-table constraints (defaults + [sharding.tables.NAME])."""

    hbm_gb: Optional[float] = _f(None, "per-rank GPU memory cap in GiB (default: the GPU's)")
    ddr_gb: Optional[float] = _f(None, "per-rank host memory cap in GiB "
                                       "(default: host memory / local ranks)")
    storage_reservation: float = _f(0.15, "fraction of memory the planner keeps free",
                                    )
    intra_host_bw_gbps: Optional[float] = _f(None, "bandwidth between ranks of one host in "
                                                   "GB/s (default: torchrec's)")
    inter_host_bw_gbps: Optional[float] = _f(None, "bandwidth between hosts in GB/s per rank "
                                                   "(default: torchrec's)")
    sharding_types: List[str] = _f([], "sharding types every table may use (empty: all the "
                                       "sharders support)", choices=SHARDING_TYPES)
    compute_kernel: str = _f("", "embedding kernel of every table (empty: planner's choice "
                                 "among those the device supports)",
                             choices=("",) + COMPUTE_KERNELS)
    cache_load_factor: Optional[float] = _f(None, "default cache load factor of "
                                                  "fused_uvm_caching tables")
    pooling_factor: Optional[float] = _f(None, "default ids per example per pooled feature "
                                               "(sequence tables default to max_len)")
    min_partition: Optional[int] = _f(None, "default narrowest column_wise shard")
    tables: Dict[str, Any] = _f({}, "per-table overrides: [sharding.tables.NAME] with keys "
                                    "of TableShardingConfig", entries=TableShardingConfig)
    plan_file: str = _f("", "use this saved plan (python -m sharding.plan --out) instead of "
                            "planning; must match the model's tables and the world size")


@dataclass
class MetricsConfig:
    """Training and evaluation metrics."""

    window_batches: int = _f(100, "training AUC/NE window, in batches per rank")
    record_sample_ids: bool = _f(False, "append each step's sample ids to "
                                        "<run_dir>/sample_ids.rank<R>.txt (audits exact resume)")


@dataclass
class CheckpointConfig:
    """Sharded DCP checkpoints and automatic resume."""

    dir: str = _f("", "checkpoint directory (empty: <training.run_dir>/checkpoints)")
    every_steps: int = _f(0, "save every N steps (0: off)")
    every_minutes: float = _f(0.0, "save every M minutes of training (0: off)")
    keep_last: int = _f(3, "complete checkpoints kept; older ones are deleted")
    keep_best: bool = _f(True, "with training.early_stop_metric: keep the best-on-valid "
                               "checkpoint in <dir>/best (outside the rotation); the final "
                               "test evaluation and trainer.export use it")
    save_at_end: bool = _f(True, "save when training finishes")
    resume: bool = _f(True, "resume from the newest complete checkpoint in dir, if any")
    resume_from: str = _f("", "resume from this step_* directory instead")
    reset_optimizer: bool = _f(False, "load weights only; optimizer state starts fresh (needed "
                                      "when column-wise shard counts changed)")


@dataclass
class DistConfig:
    """Process group and device."""

    backend: str = _f("auto", "collective backend (auto: nccl on CUDA, gloo on CPU)",
                      choices=("auto", "gloo", "nccl"))
    device: str = _f("auto", "auto | cpu | cuda | cuda:N (auto: cuda:LOCAL_RANK if available)")
    cpu_threads: int = _f(0, "intra-op threads per rank on CPU (0: cores / local ranks)")
    timeout_s: float = _f(600.0, "collective timeout in seconds")


@dataclass
class LogConfig:
    """Console output and run records besides ``metrics.jsonl``."""

    verbose: bool = _f(False, "show third-party warnings and notes that quiet mode filters "
                              "(trainer.quiet lists them)")
    tensorboard: bool = _f(True, "write TensorBoard event files to <training.run_dir>/tb")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: Dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


# -- type checking / coercion --------------------------------------------------------------

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} or none"
    if origin in (list, List):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (dict, Dict):
        return "table"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise ``ConfigError`` naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return coerce(value, args[0], key)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def dataclass_from_dict(cls: type, values: Dict[str, Any], prefix: str,
                        errors: List[str]) -> Any:
    """Build ``cls`` from ``values``; append every problem to ``errors`` (names prefixed)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: Dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            errors.append(f"unknown key '{prefix}{key}'; valid keys in [{prefix.rstrip('.')}]: "
                          f"{', '.join(fields)}")
            continue
        try:
            v = coerce(value, hints[key], prefix + key)
        except ConfigError as e:
            errors.append(str(e))
            continue
        choices = fields[key].metadata.get("choices")
        bad = [x for x in (v if isinstance(v, list) else [v]) if x not in choices] \
            if choices and v is not None else []
        if bad:
            errors.append(f"{prefix}{key}: {', '.join(map(repr, bad))} is not one of "
                          f"{', '.join(map(repr, choices))}")
            continue
        entries = fields[key].metadata.get("entries")
        if entries is not None:
            v = _entries_from_dict(entries, v, f"{prefix}{key}.", errors)
        kwargs[key] = v
    return cls(**kwargs)


def _entries_from_dict(cls: type, table: Dict[str, Any], prefix: str,
                       errors: List[str]) -> Dict[str, Dict[str, Any]]:
    """Check each ``NAME = {...}`` entry against ``cls``; keep only the keys set, typed."""
    out: Dict[str, Dict[str, Any]] = {}
    for name, values in table.items():
        if not isinstance(values, dict):
            errors.append(f"{prefix}{name} must be a table ([{prefix}{name}]), got {values!r}")
            continue
        n = len(errors)
        parsed = dataclass_from_dict(cls, values, f"{prefix}{name}.", errors)
        if len(errors) == n:
            out[name] = {k: getattr(parsed, k) for k in values}
    return out


# -- CLI overrides -------------------------------------------------------------------------

def parse_value(text: str) -> Any:
    """A CLI value as a TOML literal (``3``, ``1e-3``, ``true``, ``[64, 32]``, ``"x"``), or
    the raw string when it is not one (so ``--data.path=datasets/x`` needs no quotes)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(argv: Sequence[str]) -> List[Tuple[str, Any]]:
    """``--a.b=c`` / ``--a.b c`` pairs → [("a.b", value)]."""
    out: List[Tuple[str, Any]] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like "
                              f"--section.key=value (e.g. --training.steps=100)")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"{arg} needs a value (--section.key=value)")
            key, text = arg[2:], argv[i + 1]
            i += 1
        out.append((key, parse_value(text)))
        i += 1
    return out


def _set_path(tree: Dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--{key}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def builtin_config_dir() -> str:
    """``launch/configs`` beside the ``trainer`` package: in a checkout, and in an installed
    wheel (which ships the configs as package data of ``launch``)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "launch", "configs")


def builtin_configs() -> List[str]:
    """Names of the built-in configs (``--config NAME``), sorted."""
    d = builtin_config_dir()
    if not os.path.isdir(d):
        return []
    return sorted(f[:-len(".toml")] for f in os.listdir(d) if f.endswith(".toml"))


def find_config(name: str) -> str:
    """The config file ``name``: a path, or else a built-in config's name
    (``deepfm_synthetic`` or ``deepfm_synthetic.toml`` → ``launch/configs/deepfm_synthetic.toml``)."""
    if os.path.exists(name):
        return name
    if "/" not in name and os.sep not in name:
        stem = name[:-len(".toml")] if name.endswith(".toml") else name
        candidate = os.path.join(builtin_config_dir(), stem + ".toml")
        if os.path.isfile(candidate):
            return candidate
    names = builtin_configs()
    raise ConfigError(f"config file {name} not found; give a TOML path or the name of a "
                      f"built-in config: {', '.join(names) if names else '(none installed)'}")


def load_config(path: Optional[str] = None, overrides: Sequence[str] = (),
                checks: Sequence[Callable[[Config], List[str]]] = ()) -> Config:
    """Defaults ← TOML file ← CLI overrides, validated all at once.

    Parsing checks types, choices, ranges and cross-field rules; it imports no model and reads
    no dataset. ``checks`` add the caller's own checks of the parsed config (each returns its
    problems), reported in the same one :class:`ConfigError`: the trainer's validation step
    passes the model registry's (:func:`trainer.validation.load_checked_config`)."""
    tree: Dict[str, Any] = {}
    if path is not None:
        path = find_config(path)
        with open(path, "rb") as fh:
            try:
                tree = tomllib.load(fh)
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{path}: invalid TOML ({e})") from None
    for key, value in parse_overrides(overrides):
        _set_path(tree, key, value)
    errors: List[str] = []
    sections: Dict[str, Any] = {}
    for name, values in tree.items():
        if name not in SECTIONS:
            errors.append(f"unknown section [{name}]; valid sections: {', '.join(SECTIONS)}")
            continue
        if not isinstance(values, dict):
            errors.append(f"[{name}] must be a table, got {values!r}")
            continue
        sections[name] = dataclass_from_dict(SECTIONS[name], values, f"{name}.", errors)
    cfg = Config(**sections)
    errors += validate(cfg)
    for check in checks:
        errors += check(cfg)
    raise_config_errors(errors, path)
    return cfg


def raise_config_errors(errors: Sequence[str], path: Optional[str] = None) -> None:
    """Raise one :class:`ConfigError` listing every problem in ``errors`` (none: return);
    ``path`` names the config file in the message."""
    if errors:
        src = f" ({path})" if path else ""
        raise ConfigError(f"invalid config{src}:\n  - " + "\n  - ".join(errors))


def validate(cfg: Config) -> List[str]:
    """Cross-field checks of the parsed sections (``[model.args]`` are checked against the
    model's own dataclass by the trainer's validation step, :mod:`trainer.validation`)."""
    errors: List[str] = []
    if cfg.data.batch_size <= 0:
        errors.append(f"data.batch_size must be > 0, got {cfg.data.batch_size}")
    if cfg.data.eval_batch_size < 0:
        errors.append("data.eval_batch_size must be >= 0")
    errors += length_options_errors(cfg.data)
    if cfg.training.steps < 0:
        errors.append("training.steps must be >= 0")
    if cfg.training.steps == 0 and cfg.training.epochs <= 0:
        errors.append("set training.steps > 0 or training.epochs > 0")
    if cfg.training.fail_at and not re.match(r"^(step|save|sigterm):\d+$", cfg.training.fail_at):
        errors.append(f"training.fail_at: {cfg.training.fail_at!r} is not 'step:N', 'save:N' "
                      f"or 'sigterm:N'")
    if cfg.checkpoint.keep_last < 1:
        errors.append("checkpoint.keep_last must be >= 1")
    if cfg.training.log_every <= 0:
        errors.append("training.log_every must be > 0")
    for pattern, scale in cfg.training.dense_lr_scale.items():
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
                or not math.isfinite(scale) or scale <= 0:
            errors.append(f"training.dense_lr_scale.{pattern}: expected a positive number, "
                          f"got {scale!r}")
    errors += range_errors(cfg)  # every numeric key's range, naming the key
    errors += _validate_sharding(cfg.sharding)
    return errors


def _validate_sharding(s: ShardingConfig) -> List[str]:
    """Value ranges of [sharding] and its per-table entries (table names are checked against
    the schema when the model is built: ``sharding.constraints``)."""
    errors: List[str] = []
    if not 0.0 <= s.storage_reservation < 1.0:
        errors.append(f"sharding.storage_reservation must be in [0, 1), got "
                      f"{s.storage_reservation}")
    for key in ("hbm_gb", "ddr_gb", "intra_host_bw_gbps", "inter_host_bw_gbps"):
        v = getattr(s, key)
        if v is not None and v <= 0:
            errors.append(f"sharding.{key} must be > 0, got {v}")
    if s.plan_file and not os.path.exists(s.plan_file):
        errors.append(f"sharding.plan_file: {s.plan_file} not found (write one with "
                      f"`python -m sharding.plan --config ... --out {s.plan_file}`)")
    entries: List[Tuple[str, Dict[str, Any]]] = [
        ("sharding.", {"cache_load_factor": s.cache_load_factor,
                       "pooling_factor": s.pooling_factor, "min_partition": s.min_partition})]
    entries += [(f"sharding.tables.{name}.", t) for name, t in s.tables.items()]
    for prefix, t in entries:
        clf = t.get("cache_load_factor")
        if clf is not None and not 0.0 < clf <= 1.0:
            errors.append(f"{prefix}cache_load_factor must be in (0, 1], got {clf}")
        for key in ("pooling_factor", "lr"):
            if t.get(key) is not None and t[key] <= 0:
                errors.append(f"{prefix}{key} must be > 0, got {t[key]}")
        mp = t.get("min_partition")
        if mp is not None and (mp <= 0 or mp % 4):
            errors.append(f"{prefix}min_partition must be a positive multiple of 4 (fbgemm "
                          f"needs 4-aligned column shards), got {mp}")
        if t.get("weight_decay") is not None and t["weight_decay"] < 0:
            errors.append(f"{prefix}weight_decay must be >= 0, got {t['weight_decay']}")
        if t.get("sharding_types") == []:
            errors.append(f"{prefix}sharding_types is empty: list at least one type or "
                          f"remove the key")
    return errors


# -- output ----------------------------------------------------------------------------------

def _drop_none(values: Dict[str, Any]) -> Dict[str, Any]:
    """TOML has no null: ``None`` (= "use the default") is left out, at any depth."""
    return {k: _drop_none(v) if isinstance(v, dict) else v
            for k, v in values.items() if v is not None}


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (``None`` values are omitted: they mean "default").
    Written by ``tomli_w``, which quotes keys that are not bare (e.g. the pattern ``"rab_*"``)."""
    return tomli_w.dumps(_drop_none(cfg.to_dict()))


def save_config(cfg: Config, run_dir: str) -> str:
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "config.toml")
    write_text_atomic(path, to_toml(cfg))
    return path


def help_text() -> str:
    """Every config key with its type, default and meaning (``python -m trainer --help``)."""
    out = ["usage: python -m trainer --config FILE.toml [--section.key=value ...]",
           "       torchrun --nproc_per_node N -m trainer --config FILE.toml [...]",
           "",
           "Values: CLI overrides > TOML file > defaults. Config keys:"]
    for name, cls in SECTIONS.items():
        out.append(f"\n[{name}]  {(cls.__doc__ or '').strip().splitlines()[0]}")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            choices = f.metadata.get("choices")
            extra = f" (one of: {', '.join(c or repr(c) for c in choices)})" if choices else ""
            out.append(f"  --{name}.{f.name} ({_type_name(hints[f.name])}, default "
                       f"{default!r}): {f.metadata.get('help', '')}{extra}")
            entries = f.metadata.get("entries")
            if entries is not None:
                entry_hints = typing.get_type_hints(entries)
                for e in dataclasses.fields(entries):
                    e_choices = e.metadata.get("choices")
                    e_extra = f" (one of: {', '.join(e_choices)})" if e_choices else ""
                    out.append(f"      --{name}.{f.name}.NAME.{e.name} "
                               f"({_type_name(entry_hints[e.name])}): "
                               f"{e.metadata.get('help', '')}{e_extra}")
    return "\n".join(out)


def print_help() -> None:
    sys.stdout.write(help_text() + "\n")
