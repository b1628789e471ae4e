"""The training log line (written, then parsed back), learning rates, evaluation progress,
calibration against its definition, and the quiet filters."""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest
import torch

from trainer.metrics import CTRMetrics
from trainer.progress import (
    TrainLogger,
    eval_progress,
    format_duration,
    learning_rates,
    parse_duration,
    parse_log_line,
)
from trainer.quiet import install_quiet_filters, remove_quiet_filters


class _Task:
    def summary(self, m: Dict[str, float]) -> str:
        return f"auc {m['auc']:.4f} logloss {m['logloss']:.4f}"


class _Metrics:
    def __init__(self) -> None:
        self.updates = 0

    def update(self, output: Tuple[Any, ...]) -> None:
        self.updates += 1

    def compute(self) -> Dict[str, float]:
        return {"auc": 0.75, "logloss": 0.5, "examples": 1.0}


class _Records:
    def __init__(self) -> None:
        self.records: List[Dict[str, Any]] = []

    def write(self, record: Dict[str, Any]) -> None:
        self.records.append(record)


def _optimizer() -> Any:
    """A stand-in of the trainer's CombinedOptimizer: [fused sparse, dense (two groups),
    a data-parallel table]."""
    p = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    sparse = torch.optim.SGD([p[0]], lr=0.05)
    dense = torch.optim.Adam([{"params": [p[1]]}, {"params": [p[2]], "lr": 0.03}], lr=1e-3)
    table = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    table.params = {"model.ebc.embedding_bags.t2.weight": None}  # type: ignore[attr-defined]

    class Combined:
        optimizers = [("", sparse), ("", dense), ("", table)]

    return Combined()


def test_durations_round_trip() -> None:
    for seconds, text in [(0, "0s"), (42.4, "42s"), (185, "3m05s"), (7620, "2h07m")]:
        assert format_duration(seconds) == text
        assert parse_duration(text) == pytest.approx(seconds, abs=0.5)
    assert format_duration(float("nan")) == "?"


def test_learning_rates_names_every_optimizer() -> None:
    assert learning_rates(_optimizer()) == {"lr/sparse": 0.05, "lr/dense": 1e-3,
                                            "lr/dense/group1": 0.03, "lr/table_t2": 0.1}


def test_log_line_is_written_and_parsed(caplog: pytest.LogCaptureFixture) -> None:
    """Steps 6..20 of a 40-step run resumed at step 5, 8 batches per epoch, a line every 5
    steps: the parsed line must give the step, the epoch fraction, the dense lr, the window's
    mean loss and an ETA of (elapsed / steps done) x steps left."""
    records = _Records()
    log = TrainLogger(_Task(), _Metrics(), records, _optimizer(), steps=40, log_every=5,
                      batches_per_epoch=8, start_step=5, is_main=True,
                      device=torch.device("cpu"))
    caplog.set_level(logging.INFO, logger="trainer.progress")
    logged = []
    for step in range(6, 21):
        time.sleep(0.01)
        loss = torch.tensor(float(step))
        if log.step(step, (loss,), examples=64):
            logged.append(step)
    assert logged == [10, 15, 20]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == 3
    last = parse_log_line(lines[-1])
    assert last["step"] == 20 and last["steps"] == 40
    assert last["epoch"] == pytest.approx(20 / 8, abs=0.005)
    assert last["loss"] == pytest.approx(np.mean([16, 17, 18, 19, 20]), abs=1e-4)
    assert last["auc"] == 0.75 and last["logloss"] == 0.5
    assert last["lr"] == pytest.approx(1e-3)
    assert last["examples_per_s"] > 0
    rec = records.records[-1]
    assert rec["split"] == "train" and rec["step"] == 20 and "examples" not in rec
    assert rec["lr/dense"] == pytest.approx(1e-3) and rec["lr/sparse"] == pytest.approx(0.05)
    expected_eta = rec["elapsed_s"] / (20 - 5) * (40 - 20)
    assert last["eta_s"] == pytest.approx(expected_eta, abs=1.0)
    with pytest.raises(ValueError, match="not a training log line"):
        parse_log_line("eval step 20 auc 0.7")


def test_eval_progress_logs_only_long_evaluations(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="trainer.progress")

    def slow(n: int) -> Any:
        for i in range(n):
            time.sleep(0.02)
            yield i

    assert list(eval_progress(slow(5), 5, every_s=0.03, is_main=True)) == list(range(5))
    lines = [r.getMessage() for r in caplog.records]
    assert lines and all(l.startswith("eval ") and "/5 batches (" in l and " eta " in l
                         for l in lines)
    caplog.clear()
    assert list(eval_progress(slow(3), 3, every_s=60, is_main=True)) == [0, 1, 2]
    assert not caplog.records


def test_calibration_is_mean_prediction_over_mean_label() -> None:
    """torchrec's CalibrationMetric definition (sum of predictions / sum of labels, unit
    weights) against the brute-force numbers."""
    g = torch.Generator().manual_seed(0)
    m = CTRMetrics(1, 0, 64, 256, torch.device("cpu"))
    logits, labels = [], []
    for _ in range(4):
        lg = torch.randn(64, generator=g)
        lb = (torch.rand(64, generator=g) < 0.3).float()
        m.update(lg, lb)
        logits.append(lg)
        labels.append(lb)
    want = float(torch.sigmoid(torch.cat(logits)).double().sum() / torch.cat(labels).sum())
    got = m.compute()
    assert got["calibration"] == pytest.approx(want, rel=1e-6)  # float32 batch sums
    assert got["examples"] == 256


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_quiet_filters_are_precise() -> None:
    """The known notes are dropped; the same kind of warning from another module, or
    another message from the same module, still shows."""
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            install_quiet_filters()
            for module, message, category in [
                ("torch.distributed.c10d_logger",
                 "`torch.distributed.reduce_scatter_tensor` is deprecated. Please use x",
                 FutureWarning),
                ("torchrec.distributed.embeddingbag", "`broadcast_buffers` is deprecated. x",
                 FutureWarning),
                ("torchrec.distributed.model_parallel", "`broadcast_buffers` is deprecated. x",
                 FutureWarning),
                ("torch.autograd.graph", "fbgemm::dense_embedding_codegen_lookup_function: an "
                 "autograd kernel was not registered to the Autograd key(s)", UserWarning),
                ("ours.module", "`broadcast_buffers` is deprecated. y", FutureWarning),
                ("torch.distributed.c10d_logger", "something else is deprecated", FutureWarning),
            ]:
                warnings.warn_explicit(message, category, "f.py", 1, module=module)
        assert [str(w.message) for w in seen] == ["`broadcast_buffers` is deprecated. y",
                                                  "something else is deprecated"]

        cases = [
            ("torch.fx._symbolic_trace", "is_fx_tracing will return true for both "
             "fx.symbolic_trace and torch.export.", "x.py", False),
            ("torchrec.distributed.utils",
             "Sharding Type is data_parallel, caching params will be ignored", "x.py", False),
            ("torchrec.distributed.planner.storage_reservations", "There is a known issue with "
             "TorchRec's dense tensor size calculation in dry run scenarios", "x.py", False),
            ("root", "Sharding spec not found for model.ebc.t2",
             "/site-packages/torchrec/distributed/planner/planners.py", False),
            ("torchrec.distributed.utils", "a real problem", "x.py", True),
            ("root", "Sharding spec not found for model.ebc.t2", "/elsewhere/ours.py", True),
        ]
        for name, message, path, shown in cases:
            log = logging.getLogger() if name == "root" else logging.getLogger(name)
            handler = _ListHandler()
            log.addHandler(handler)
            try:
                log.handle(logging.LogRecord(name, logging.WARNING, path, 1, message, None,
                                             None))
            finally:
                log.removeHandler(handler)
            assert handler.messages == ([message] if shown else []), (name, message)
    finally:
        remove_quiet_filters()


def test_multitask_calibration_respects_the_evaluation_mask() -> None:
    """Per prediction: sum of probabilities / sum of labels over the rows its mask keeps;
    ``examples`` counts every row (the final line's ``eval_rows``)."""
    from models.multitask.common import Prediction
    from trainer.tasks.multitask import MultiTaskMetrics

    g = torch.Generator().manual_seed(1)
    n = 256
    labels = torch.stack([(torch.rand(n, generator=g) < 0.4).float(),
                          (torch.rand(n, generator=g) < 0.5).float()], dim=1)
    logits = torch.randn(n, 2, generator=g) + labels
    preds = [Prediction("a", "binary", 0, 1.0),
             Prediction("b", "binary", 1, 1.0, given=0, eval_label=1, eval_given=0)]
    m = MultiTaskMetrics(preds, 1, 0, 64, n, torch.device("cpu"))
    for k in range(0, n, 64):
        m.update(logits[k:k + 64], labels[k:k + 64])
    out = m.compute()
    keep = labels[:, 0] == 1
    p = torch.sigmoid(logits).double()
    assert out["calibration_a"] == pytest.approx(float(p[:, 0].sum() / labels[:, 0].sum()),
                                                 rel=1e-6)
    assert out["calibration_b"] == pytest.approx(
        float(p[keep, 1].sum() / labels[keep, 1].sum()), rel=1e-6)
    assert out["examples"] == n


def test_training_logloss_and_calibration_follow_the_window() -> None:
    """Log-loss and calibration cover the same recent rows as torchrec's windowed AUC (here
    2 batches), not every row since the start."""
    m = CTRMetrics(1, 0, 4, 8, torch.device("cpu"))
    m.update(torch.full((4,), 3.0), torch.zeros(4))  # confidently wrong: left the window
    m.update(torch.zeros(4), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    m.update(torch.zeros(4), torch.tensor([1.0, 1.0, 0.0, 0.0]))
    out = m.compute()
    assert out["logloss"] == pytest.approx(float(np.log(2.0)), rel=1e-6)  # float32 BCE
    assert out["calibration"] == pytest.approx(1.0) and out["examples"] == 8
