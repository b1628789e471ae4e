"""The trainer's validation step: checks of a config that need more than the config itself,
run before any work.

Config parsing (:func:`trainer.config.load_config`) reads no file but the config itself and
imports no model: a config can be parsed on a machine that does not hold the data, and
without the model registry's dependencies. Two kinds of checks run here instead, each
reporting every problem at once as one :class:`trainer.config.ConfigError` (exit code 2, no
traceback):

* against the model registry (:func:`model_errors`): ``model.name`` and ``model.flavour``
  exist, and ``[model.args]`` fit the model's argument dataclass (types coerced in place, then
  the model's own range checks). Entry points load configs with :func:`load_checked_config`,
  which adds these to the parse errors; :func:`trainer.trainer.train` runs them again first
  (a no-op on a checked config) for callers that built their config otherwise.
* against the dataset (:func:`check_against_data`), once the trainer has loaded the schema and
  before readers, model or process-group work: ``[sharding.tables.NAME]`` entries naming no
  table, and sharding types / kernels a table cannot use.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

from data.schema import Schema
from models import get_model_spec
from sharding.constraints import table_settings_errors
from trainer.config import (
    Config,
    ConfigError,
    dataclass_from_dict,
    load_config,
    raise_config_errors,
    sparse_optimizer_defaults,
)


def model_errors(cfg: Config) -> List[str]:
    """Problems of ``[model]`` against the model registry. When there are none,
    ``cfg.model.args`` keeps only the keys the user set, now with their checked types."""
    try:
        spec = get_model_spec(cfg.model.name)
    except KeyError as e:
        return [f"model.name: {e.args[0]}"]
    if cfg.model.flavour not in spec.flavours:
        return [f"model.flavour: {cfg.model.flavour!r} is not a flavour of {spec.name!r}; "
                f"flavours: {', '.join(sorted(spec.flavours))}"]
    errors: List[str] = []
    parsed = dataclass_from_dict(spec.args_cls, cfg.model.args, "model.args.", errors)
    if errors:
        return errors
    if hasattr(parsed, "validate"):
        # The model's own range checks (they name their model.args keys), before any work.
        try:
            parsed.validate()
        except ValueError as e:
            errors.append(str(e))
    cfg.model.args = {k: getattr(parsed, k) for k in cfg.model.args}
    return errors


def check_model(cfg: Config) -> None:
    """Raise :class:`ConfigError` listing every problem of :func:`model_errors`."""
    raise_config_errors(model_errors(cfg))


def load_checked_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """:func:`trainer.config.load_config` plus the model checks, all problems in one
    :class:`ConfigError`: how the entry points (``python -m trainer``, ``trainer.plan``, the
    torchx components, export and predict) read a config."""
    return load_config(path, overrides, checks=(model_errors,))


def errors_against_data(cfg: Config, schema: Schema) -> List[str]:
    """The config's problems that only the dataset shows: ``[sharding.tables.NAME]`` entries
    naming no table of the schema, and sharding types / kernels a table cannot use."""
    return table_settings_errors(schema, cfg.sharding, sparse_optimizer_defaults(cfg.training))


def check_against_data(cfg: Config, schema: Schema, source: str) -> None:
    """Raise :class:`ConfigError` listing every problem of :func:`errors_against_data`;
    ``source`` names the schema file in the message."""
    errors = errors_against_data(cfg, schema)
    if errors:
        raise ConfigError(f"the config does not fit the dataset {source}: " + "; ".join(errors))
