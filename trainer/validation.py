"""Checks of a config against its dataset, run by the trainer before any work.

Config parsing (:func:`trainer.config.load_config`) reads no file but the config itself: a
config can be checked on a machine that does not hold the data (the torchx components check
it on the submitting machine). What needs the dataset runs here, once the schema is loaded
and before readers, model or process-group work: every problem at once, as one
:class:`trainer.config.ConfigError` (exit code 2, no traceback).
"""

from __future__ import annotations

from typing import List

from data.schema import Schema
from sharding.constraints import table_settings_errors
from trainer.config import Config, ConfigError, sparse_optimizer_defaults


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
