"""Value ranges of every numeric config key (and the one free-form string with a grammar,
``dist.device``), checked by :func:`trainer.config.validate` before any work.

``RANGES`` maps ``section.key`` to a bound. The keys whose range is checked elsewhere in
``trainer.config`` (cross-field checks such as ``training.epochs`` with ``training.steps``,
and the ``[sharding]`` checks of ``_validate_sharding``) are listed in ``CHECKED_ELSEWHERE``;
a unit test asserts that the two together cover every ``int``/``float`` field of every
section, so a new numeric key without a range fails the suite.

Example::

    cfg.training.dense_lr = -1.0
    range_errors(cfg)   # ["training.dense_lr must be > 0, got -1.0 (...)"]
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List


@dataclass(frozen=True)
class Bound:
    """``value > lo`` (``strict``) or ``value >= lo``; why the bound exists, for the message."""

    lo: float
    strict: bool
    why: str

    def ok(self, value: float) -> bool:
        return value > self.lo if self.strict else value >= self.lo

    def describe(self) -> str:
        lo = int(self.lo) if float(self.lo).is_integer() else self.lo
        return f"{'>' if self.strict else '>='} {lo}"


def _gt0(why: str) -> Bound:
    return Bound(0, True, why)


def _ge0(why: str) -> Bound:
    return Bound(0, False, why)


RANGES: Dict[str, Bound] = {
    "data.prefetch": _ge0("batches built ahead; 0 builds them inline"),
    "data.shuffle_buffer_rows": _ge0("0 shuffles within each row group"),
    "training.dense_lr": _gt0("a learning rate"),
    "training.dense_weight_decay": _ge0("0 turns weight decay off"),
    "training.sparse_lr": _gt0("a learning rate"),
    "training.sparse_weight_decay": _ge0("0 turns weight decay off"),
    "training.sparse_eps": _gt0("the adaptive optimizers divide by sqrt(state) + eps"),
    "training.eval_every": _ge0("0 evaluates only at the end"),
    "training.eval_batches": _ge0("0 reads the whole eval split"),
    "training.early_stop_patience": _ge0("0 never stops, only keeps the best"),
    "training.seed": _ge0("numpy seeds must be non-negative"),
    "training.fail_rank": _ge0("a rank"),
    "metrics.window_batches": _gt0("the training AUC/NE window needs at least one batch"),
    "checkpoint.every_steps": _ge0("0 turns step checkpoints off"),
    "checkpoint.every_minutes": _ge0("0 turns timed checkpoints off"),
    "dist.cpu_threads": _ge0("0 means cores / local ranks"),
    "dist.timeout_s": _gt0("a collective timeout in seconds"),
}

# Numeric keys whose range trainer.config checks itself (cross-field or section checks).
CHECKED_ELSEWHERE: FrozenSet[str] = frozenset({
    "data.batch_size", "data.eval_batch_size", "training.steps", "training.epochs",
    "training.log_every", "checkpoint.keep_last",
    "sharding.hbm_gb", "sharding.ddr_gb", "sharding.storage_reservation",
    "sharding.intra_host_bw_gbps", "sharding.inter_host_bw_gbps",
    "sharding.cache_load_factor", "sharding.pooling_factor", "sharding.min_partition",
    # data.lengths.length_options_errors
    "data.length_sampling_alpha", "data.length_sampling_min_len", "data.balance_batches",
})

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def range_errors(cfg: Any) -> List[str]:
    """One message per key of ``cfg`` (a ``trainer.config.Config``) outside its range."""
    errors: List[str] = []
    for key, bound in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None and not bound.ok(value):
            errors.append(f"{key} must be {bound.describe()}, got {value!r} ({bound.why})")
    if cfg.training.steps > 0 and cfg.training.epochs < 0:
        errors.append(f"training.epochs must be >= 0, got {cfg.training.epochs!r}")
    if not _DEVICE_RE.match(cfg.dist.device):
        errors.append(f"dist.device: {cfg.dist.device!r} is not auto, cpu, cuda or cuda:N "
                      f"(e.g. --dist.device=cpu)")
    return errors
