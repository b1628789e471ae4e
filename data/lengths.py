"""Length-aware training batches for long histories: stochastic length sampling and
length-balanced batches (used by :class:`data.reader.ParquetReader`).

* **Stochastic length sampling** trains on a random *suffix* (the most recent events) of a
  long history, so a step's cost does not follow its longest user and every part of a long
  history is still the recent context of some step. Per row, with ``L`` its length and ``N``
  the feature's ``max_len``:

  - ``hstu`` (HSTU, arXiv 2402.17152, §3.3, with a suffix instead of a subset): rows with
    ``L ≤ N^(α/2)`` are kept whole; a longer row is cut to its last ``⌈N^(α/2)⌉`` events
    with probability ``1 − N^α / L²`` (so the expected attention cost ``E[L²]`` of a long row
    is at most ``O(N^α)``), else kept whole. ``α ∈ (0, 2]``; ``α = 2`` keeps everything.
  - ``uniform``: a row longer than ``min_len`` keeps a suffix of length ``~ U{min_len … L}``.

* **Length-balanced batches** take ``M`` consecutive batches' worth of rows (a *superbatch*,
  ``M·B`` rows) and deal them back into ``M`` batches of exactly ``B`` rows whose costs
  (``tokens``: ``Σ Lᵢ``; ``attention``: ``Σ Lᵢ²``) are as equal as a greedy
  longest-first assignment gets them. The batch size and the number of batches per rank are
  unchanged, so ranks still agree on the batch count from the parquet footers alone (a rank
  with one more batch would hang the collectives), and batch ``k`` stays a pure function of
  ``(seed, epoch, rank, k)``: a resumed run rebuilds superbatch ``⌊k / M⌋`` and hands out its
  part ``k mod M``. The parts are handed out heaviest first: a row too long to share its
  cost (a whale) still makes its batch heavy, and ordering by cost on every rank puts the
  ranks' heavy batches on the same steps instead of making every rank wait for one rank's
  whale at a different step.

Shapes: ``lengths [N]`` int64 → ``[N]``; jagged columns are ``offsets [N + 1]`` (from 0) and
``values [offsets[-1]]``.

Example::

    >>> rng = np.random.default_rng(0)
    >>> LengthSampling("hstu", alpha=1.0).sample(np.array([3, 10, 400]), 100, rng).tolist()
    [3, 10, 10]
    >>> order = balanced_batches(np.array([9, 1, 8, 2, 7, 3]), 2)
    >>> [int(np.array([9, 1, 8, 2, 7, 3])[o].sum()) for o in order]
    [16, 14]
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import numpy as np

SAMPLING_MODES = ("off", "hstu", "uniform")
BALANCE_COSTS = ("tokens", "attention")


@dataclass(frozen=True)
class LengthSampling:
    """How training histories are cut to a random suffix (see the module docstring).

    Args:
        mode: ``off``, ``hstu`` or ``uniform``.
        alpha: the ``hstu`` exponent ``α`` (threshold ``N^(α/2)``), in ``(0, 2]``.
        min_len: the shortest suffix ``uniform`` keeps (rows up to it are kept whole).
    """

    mode: str = "off"
    alpha: float = 1.6
    min_len: int = 64

    def __post_init__(self) -> None:
        if self.mode not in SAMPLING_MODES:
            raise ValueError(f"length sampling mode {self.mode!r} is not one of "
                             f"{', '.join(SAMPLING_MODES)}")
        if not 0.0 < self.alpha <= 2.0:
            raise ValueError(f"length sampling alpha must be in (0, 2], got {self.alpha}")
        if self.min_len < 1:
            raise ValueError(f"length sampling min_len must be >= 1, got {self.min_len}")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def sample(self, lengths: np.ndarray, max_len: int, rng: np.random.Generator
               ) -> np.ndarray:
        """The suffix length to keep of each row (``≤ lengths``)."""
        lengths = lengths.astype(np.int64, copy=False)
        if self.mode == "hstu":
            keep = max(1, math.ceil(max_len ** (self.alpha / 2)))
            long = lengths > keep
            # 1 − N^α / L² for the long rows (L > N^(α/2) makes it a probability in (0, 1)).
            cut_p = np.where(long, 1.0 - float(max_len) ** self.alpha
                             / np.maximum(lengths, 1).astype(np.float64) ** 2, 0.0)
            cut = rng.random(lengths.size) < cut_p
            return np.where(cut, keep, lengths)
        if self.mode == "uniform":
            lo = np.minimum(lengths, self.min_len)
            return lo + np.floor(rng.random(lengths.size) * (lengths - lo + 1)).astype(np.int64)
        return lengths


def keep_suffix(offsets: np.ndarray, values: np.ndarray, keep: np.ndarray
                ) -> Tuple[np.ndarray, np.ndarray]:
    """The last ``min(keep[r], L_r)`` values of every row ``r`` (rows are oldest → newest)."""
    lengths = np.diff(offsets)
    new_lengths = np.minimum(lengths, keep)
    new_offsets = np.zeros_like(offsets)
    np.cumsum(new_lengths, out=new_offsets[1:])
    starts = offsets[1:] - new_lengths
    idx = np.repeat(starts - new_offsets[:-1], new_lengths) + np.arange(new_offsets[-1])
    return new_offsets, values[idx]


def batch_costs(lengths: np.ndarray, cost: str) -> np.ndarray:
    """Per-row cost: ``tokens`` = L, ``attention`` = L² (the quadratic attention term)."""
    if cost not in BALANCE_COSTS:
        raise ValueError(f"batch balance cost {cost!r} is not one of {', '.join(BALANCE_COSTS)}")
    lengths = lengths.astype(np.int64, copy=False)
    return lengths if cost == "tokens" else lengths * lengths


def balanced_batches(costs: np.ndarray, parts: int) -> List[np.ndarray]:
    """Split rows ``0 … N−1`` (``N`` a multiple of ``parts``) into ``parts`` sets of exactly
    ``N / parts`` rows with near-equal total cost: rows in decreasing cost go to the cheapest
    set that still has room (greedy LPT with a cardinality limit; ties broken by row index,
    so the result is deterministic). Each set is in increasing row order; the sets come
    heaviest first (ties: by their first row)."""
    n = costs.size
    if parts < 1 or n % parts:
        raise ValueError(f"{n} rows do not split into {parts} equal batches")
    size = n // parts
    order = np.lexsort((np.arange(n), -costs.astype(np.int64)))
    heap = [(0, p) for p in range(parts)]  # (load, part); full parts leave the heap
    fill = [0] * parts
    owner = np.empty(n, dtype=np.int64)
    for row, c in zip(order.tolist(), costs[order].tolist()):
        load, p = heapq.heappop(heap)
        owner[row] = p
        fill[p] += 1
        if fill[p] < size:
            heapq.heappush(heap, (load + int(c), p))
    sets = np.argsort(owner, kind="stable")
    out = [sets[p * size:(p + 1) * size] for p in range(parts)]
    loads = [int(costs[s].sum()) for s in out]
    return [out[p] for p in sorted(range(parts), key=lambda p: (-loads[p], int(out[p][0])))]


def length_options_errors(data: Any) -> List[str]:
    """Config errors of the ``data.length_sampling*`` / ``data.balance_*`` keys of a config
    section ``data`` (duck-typed: the trainer's ``DataConfig``)."""
    errors = []
    if not 0.0 < data.length_sampling_alpha <= 2.0:
        errors.append(f"data.length_sampling_alpha must be in (0, 2] (2 keeps every row "
                      f"whole), got {data.length_sampling_alpha}")
    if data.length_sampling_min_len < 1:
        errors.append(f"data.length_sampling_min_len must be >= 1, got "
                      f"{data.length_sampling_min_len}")
    if data.balance_batches < 0:
        errors.append(f"data.balance_batches must be >= 0 (0: off), got {data.balance_batches}")
    return errors


def train_reader_options(data: Any) -> Dict[str, Any]:
    """The training reader's length-aware keyword arguments from a ``data`` config section."""
    return {"length_sampling": LengthSampling(data.length_sampling, data.length_sampling_alpha,
                                              data.length_sampling_min_len),
            "balance_batches": data.balance_batches, "balance_cost": data.balance_cost}
