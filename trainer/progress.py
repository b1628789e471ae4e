"""Progress on the console: the training log line, evaluation progress, and their format.

Rank 0 prints one line every ``training.log_every`` steps::

    step 200/1000 (epoch 0.40) loss 0.4412 auc 0.8012 logloss 0.4410 lr 1.0e-03 ex/s 25310 elapsed 8s eta 32s

* ``loss``: mean training loss of the steps since the previous line (this rank's batches);
* the task kind's summary (``auc``/``logloss``, ``hr@10``…) over the metrics window, all ranks;
* ``lr``: the dense optimizer's learning rate (every optimizer's goes to TensorBoard);
* ``ex/s``: examples per second, all ranks, since the previous line;
* ``elapsed``: wall time since this process started training; ``eta``: the remaining steps
  at the average wall time per step so far (evaluations and checkpoints included).

:func:`parse_log_line` reads such a line back (tests, scripts). :func:`eval_progress` wraps
an evaluation's batches and logs ``eval 120/400 batches (30%) elapsed 12s eta 28s`` every
:data:`EVAL_PROGRESS_S` seconds, so a short evaluation prints nothing.
"""

from __future__ import annotations

import logging
import math
import re
import time
from typing import Any, Dict, Iterable, Iterator, Mapping, Optional, Tuple, TypeVar

import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Seconds between evaluation progress lines: a split read in less time prints none.
EVAL_PROGRESS_S = 10.0

# Checked by tests/unit/test_progress.py against lines the logger writes.
LOG_LINE = re.compile(
    r"^step (?P<step>\d+)/(?P<steps>\d+) \(epoch (?P<epoch>\d+\.\d+)\) "
    r"loss (?P<loss>\S+) (?P<metrics>(?:\S+ \S+ )*?)lr (?P<lr>\S+) ex/s (?P<rate>\d+) "
    r"elapsed (?P<elapsed>\S+) eta (?P<eta>\S+)$")


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m`` (``?`` when unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def parse_duration(text: str) -> float:
    """Inverse of :func:`format_duration` (to the shown precision)."""
    m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    if not m or not text:
        raise ValueError(f"not a duration: {text!r}")
    h, mi, s = (int(g) if g else 0 for g in m.groups())
    return 3600.0 * h + 60.0 * mi + s


def parse_log_line(line: str) -> Dict[str, Any]:
    """The fields of a training log line (the message part, without the time prefix);
    raises ``ValueError`` for another line."""
    m = LOG_LINE.match(line.strip())
    if not m:
        raise ValueError(f"not a training log line: {line!r}")
    out: Dict[str, Any] = {
        "step": int(m["step"]), "steps": int(m["steps"]), "epoch": float(m["epoch"]),
        "loss": float(m["loss"]), "lr": float(m["lr"]), "examples_per_s": float(m["rate"]),
        "elapsed_s": parse_duration(m["elapsed"]), "eta_s": parse_duration(m["eta"]),
    }
    words = m["metrics"].split()
    for key, value in zip(words[::2], words[1::2]):
        out[key] = float(value)
    return out


def _optimizer_name(i: int, opt: Any) -> str:
    """The name of the ``i``-th optimizer of the trainer's ``CombinedOptimizer``: it is built
    as ``[fused sparse, dense, *one per data-parallel table]``
    (``trainer.optim.build_optimizer``); a data-parallel table's is named by its table."""
    if i == 0:
        return "sparse"
    if i == 1:
        return "dense"
    for key in getattr(opt, "params", {}) or {}:
        parts = key.split(".")
        for marker in ("embedding_bags", "embeddings"):
            if marker in parts and parts.index(marker) + 1 < len(parts):
                return f"table_{parts[parts.index(marker) + 1]}"
    return f"opt{i}"


def learning_rates(optimizer: Any) -> Dict[str, float]:
    """``lr/<name>`` of every sub-optimizer of the trainer's ``CombinedOptimizer`` (the first
    parameter group's; a later group with another lr, e.g. a ``[training.dense_lr_scale]``
    pattern, adds ``lr/<name>/group<i>``)."""
    out: Dict[str, float] = {}
    subs = getattr(optimizer, "optimizers", None) or [("", optimizer)]
    for i, (_, opt) in enumerate(subs):
        name = _optimizer_name(i, opt)
        first: Optional[float] = None
        for g, group in enumerate(getattr(opt, "param_groups", [])):
            lr = group.get("lr")
            if not isinstance(lr, (int, float)) and not torch.is_tensor(lr):
                continue
            lr = float(lr)
            if first is None:
                out[f"lr/{name}"] = first = lr
            elif lr != first:
                out[f"lr/{name}/group{g}"] = lr
    return out


class TrainLogger:
    """Owns the log window of the training loop: the running loss, the examples since the
    last line, the line itself and its record.

    ``step()`` is called once per training step on every rank; on a logging step it runs the
    metrics' ``compute()`` (a collective, so every rank must call it) and returns True.

    Args:
        task: the task kind (its ``summary`` of the metrics).
        metrics: running training metrics (``update(output)`` / ``compute()``).
        records: where records go (``metrics.jsonl`` + TensorBoard), ``write(dict)``.
        optimizer: read for learning rates on logging steps (no collective).
        steps: the step training ends at; ``log_every``: steps between lines.
        batches_per_epoch: training batches per rank per epoch (the epoch fraction).
        start_step: the step this process starts from (a resumed run's ETA counts only the
            steps it ran itself).
        is_main: rank 0 logs; every rank computes.
        device: where the running loss sum lives (no host sync per step on CUDA).
    """

    def __init__(self, task: Any, metrics: Any, records: Any, optimizer: Any, steps: int,
                 log_every: int, batches_per_epoch: int, start_step: int, is_main: bool,
                 device: torch.device, dense_lr_key: str = "lr/dense") -> None:
        self.task = task
        self.metrics = metrics
        self.records = records
        self.optimizer = optimizer
        self.steps = steps
        self.log_every = log_every
        self.batches_per_epoch = max(1, batches_per_epoch)
        self.start_step = start_step
        self.is_main = is_main
        self.dense_lr_key = dense_lr_key
        self.started = time.perf_counter()
        self._loss_sum = torch.zeros((), device=device)
        self._loss_n = 0
        self._window_start = self.started
        self._window_examples = 0

    def restart_window(self) -> None:
        """Start the ex/s window now (after an evaluation or checkpoint, so their time does
        not count as training time; ``elapsed`` and ``eta`` keep counting it)."""
        self._window_start = time.perf_counter()
        self._window_examples = 0

    def step(self, step: int, output: Tuple[Any, ...], examples: int) -> bool:
        """Account one step (``examples``: all ranks); log and return True on a log step."""
        self.metrics.update(output)
        self._loss_sum += output[0].detach()
        self._loss_n += 1
        self._window_examples += examples
        if step % self.log_every != 0 and step != self.steps:
            return False
        m = self.metrics.compute()  # collective: every rank reaches this step
        now = time.perf_counter()
        rate = self._window_examples / max(now - self._window_start, 1e-9)
        mean_loss = float(self._loss_sum) / max(self._loss_n, 1)
        lrs = learning_rates(self.optimizer)
        elapsed = now - self.started
        done = step - self.start_step
        eta = elapsed / done * (self.steps - step) if done > 0 else float("nan")
        epoch = step / self.batches_per_epoch
        if self.is_main:
            logger.info("%s", self.format_line(step, epoch, mean_loss, m, lrs, rate, elapsed,
                                               eta))
        self.records.write({"split": "train", "step": step, "epoch": round(epoch, 4),
                            "loss": mean_loss,
                            **{k: v for k, v in m.items() if k != "examples"},
                            **lrs, "examples_per_s": rate, "elapsed_s": round(elapsed, 3)})
        self._loss_sum.zero_()
        self._loss_n = 0
        self._window_start, self._window_examples = now, 0
        return True

    def format_line(self, step: int, epoch: float, loss: float, metrics: Mapping[str, float],
                    lrs: Mapping[str, float], rate: float, elapsed: float, eta: float) -> str:
        lr = lrs.get(self.dense_lr_key, next(iter(lrs.values()), float("nan")))
        return (f"step {step}/{self.steps} (epoch {epoch:.2f}) loss {loss:.4f} "
                f"{self.task.summary(metrics)} lr {lr:.1e} ex/s {rate:.0f} "
                f"elapsed {format_duration(elapsed)} eta {format_duration(eta)}")


def eval_progress(batches: Iterable[T], total: int, every_s: float = EVAL_PROGRESS_S,
                  is_main: Optional[bool] = None) -> Iterator[T]:
    """Yield ``batches``, logging ``eval i/total batches (p%) elapsed … eta …`` on rank 0
    each time ``every_s`` seconds have passed since the last line (never when ``every_s`` is
    0 or the evaluation is quicker than that)."""
    if is_main is None:
        import torch.distributed as dist

        is_main = not dist.is_initialized() or dist.get_rank() == 0
    start = last = time.perf_counter()
    done = 0
    for batch in batches:
        yield batch
        done += 1
        now = time.perf_counter()
        if is_main and every_s > 0 and now - last >= every_s and done < total:
            last = now
            elapsed = now - start
            logger.info("eval %d/%d batches (%d%%) elapsed %s eta %s", done, total,
                        100 * done // max(total, 1), format_duration(elapsed),
                        format_duration(elapsed / done * (total - done)))
