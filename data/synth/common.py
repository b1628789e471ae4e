"""What the planted-model generators share: a Zipf id sampler, segment sums over jagged rows,
and the writer of a planted dataset (parquet parts drawn one at a time, the oracle metrics of
the generating probabilities in ``meta.json``), built on the converters' ``DatasetWriter``.

Example::

    >>> import numpy as np
    >>> segment_sum(np.array([1.0, 2.0, 3.0]), np.array([0, 2, 2, 3])).tolist()
    [3.0, 0.0, 3.0]
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa

from data.convert.common import ConvertError, DatasetWriter
from data.metrics import log_loss, roc_auc
from data.schema import Schema

logger = logging.getLogger(__name__)


class ZipfSampler:
    """Draws ids in ``[0, n)`` with P(rank r) ∝ (r + 1)^-a, ranks mapped to ids by a fixed
    random permutation."""

    def __init__(self, n: int, a: float, rng: np.random.Generator) -> None:
        p = 1.0 / np.power(np.arange(1, n + 1, dtype=np.float64), a)
        self.cdf = np.cumsum(p / p.sum())
        self.perm = rng.permutation(n).astype(np.int64)

    def __call__(self, size: int, rng: np.random.Generator) -> np.ndarray:
        ranks = np.searchsorted(self.cdf, rng.random(size), side="right")
        return self.perm[np.minimum(ranks, self.perm.size - 1)]


def segment_sum(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Sum of ``values[offsets[r]:offsets[r+1]]`` per row r (0 for empty rows)."""
    rows = offsets.size - 1
    out_shape = (rows,) + values.shape[1:]
    if values.shape[0] == 0:
        return np.zeros(out_shape, dtype=np.float64)
    csum = np.concatenate([np.zeros((1,) + values.shape[1:]), np.cumsum(values, axis=0)])
    return csum[offsets[1:]] - csum[offsets[:-1]]


SampleFn = Callable[[int, np.random.Generator], Tuple[pa.Table, np.ndarray, np.ndarray]]


def write_planted_dataset(out: str, generator: str, args: Any, schema: Schema,
                          sample: SampleFn, overwrite: bool = False,
                          progress: bool = True,
                          task_names: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Write ``train``/``eval`` parquet parts drawn by ``sample(rows, rng)`` (→ table, planted
    probabilities, labels), ``schema.json`` and ``meta.json`` with the oracle metrics, through
    a :class:`data.convert.common.DatasetWriter` (a temp dir renamed to ``out`` at the end;
    ``overwrite`` replaces only a dataset this tool wrote). ``args`` (a dataclass) needs
    ``seed``, ``train_rows``, ``eval_rows``, ``rows_per_file`` and ``row_group_rows``. Each
    part of ``rows_per_file`` rows is one file with row groups of ``row_group_rows``.

    With ``task_names`` (T names), ``sample`` returns probabilities and labels of shape
    ``[rows, T]`` and the oracle holds ``auc_<task>`` / ``logloss_<task>`` / ``rate_<task>``
    per task (eval split) besides ``auc`` / ``logloss`` of the first task."""
    t0 = time.time()
    oracle: Dict[str, float] = {}
    try:
        writer = DatasetWriter(out, overwrite, args.rows_per_file, args.row_group_rows)
    except ConvertError as e:  # an existing ``out`` (and the fix): not this call's to replace
        raise FileExistsError(str(e)) from None
    with writer:
        for split, rows, split_seed in (("train", args.train_rows, 1),
                                        ("eval", args.eval_rows, 2)):
            rng = np.random.default_rng([args.seed, split_seed])
            probs_all: List[np.ndarray] = []
            labels_all: List[np.ndarray] = []
            for start in range(0, rows, args.rows_per_file):
                n = min(args.rows_per_file, rows - start)
                table, probs, labels = sample(n, rng)
                name = writer.split(split).write_file(table)
                probs_all.append(probs)
                labels_all.append(labels)
                if progress:
                    logger.info("%s: wrote %s/%s (%d rows)", split, split, name, n)
            p, y = np.concatenate(probs_all), np.concatenate(labels_all)
            if task_names:
                for k, task in enumerate(task_names):
                    oracle[f"{split}_auc_{task}"] = roc_auc(p[:, k], y[:, k])
                    oracle[f"{split}_logloss_{task}"] = log_loss(p[:, k], y[:, k])
                    oracle[f"{split}_rate_{task}"] = float(y[:, k].mean())
                    if split == "eval":
                        oracle[f"auc_{task}"] = oracle[f"eval_auc_{task}"]
                        oracle[f"logloss_{task}"] = oracle[f"eval_logloss_{task}"]
                p, y = p[:, 0], y[:, 0]
            oracle[f"{split}_auc"] = roc_auc(p, y)
            oracle[f"{split}_logloss"] = log_loss(p, y)
            oracle[f"{split}_ctr"] = float(y.mean())
        meta = writer.finish(schema, {
            "generator": generator,
            "args": dataclasses.asdict(args),
            "oracle": {"auc": oracle["eval_auc"], "logloss": oracle["eval_logloss"], **oracle},
        })
    logger.info("dataset %s: %d train / %d eval rows, oracle eval AUC %.4f (%.1fs)", out,
                args.train_rows, args.eval_rows, oracle["eval_auc"], time.time() - t0)
    return meta
