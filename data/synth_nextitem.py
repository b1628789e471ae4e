"""Synthetic next-item data with a planted sequential model and a known oracle HR@10.

``python -m data.synth seq --out DIR [--preset tiny|ci] [--seed 0] ...`` draws user histories
and writes them through the sequential converter (:func:`data.convert.sequential.
write_sequences`), so the layout is exactly that of ``data.convert movielens --task
sequential``: one row per user, ``item_seq`` with ``item_ts``, train rows without the last
item, eval rows with it (the held-out target).

The planted model (all parameters drawn from ``--seed``): items ``1..num_items`` fall into
``num_clusters`` clusters; inside a cluster items have Zipf popularity. Each cluster has
``successors`` successor clusters with Dirichlet weights (a sparse Markov chain over
clusters). A user's first item comes from a random cluster; every next item is, with
probability ``1 − noise``, drawn from a successor cluster of the previous item's cluster (by
the chain's weights, then by popularity inside it), else from the global popularity. Users
never repeat an item: the distribution is renormalised over the items they have not seen
(and falls back to the global popularity when the chain allows none of those).

Oracle: at a user's last step the true next-item distribution is known; its 10 most likely
unseen items are the oracle's top-10. ``meta.json`` stores ``oracle.hr@10`` (the fraction of
eval rows whose held-out item is in that top-10: the best HR@10 any model can expect under
the leave-one-out, history-excluded protocol) and ``oracle.expected_hr@10`` (the mean
probability mass of those top-10 lists, the same quantity without sampling noise).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Dict, Tuple

import numpy as np

from data.convert.common import DatasetWriter
from data.convert.sequential import write_sequences

logger = logging.getLogger(__name__)


@dataclass
class NextItemSynthArgs:
    """Arguments of the next-item generator (see the module docstring)."""

    num_users: int = 20_000
    num_items: int = 2000
    num_clusters: int = 100
    #: successor clusters per cluster (the chain's sparsity).
    successors: int = 3
    #: probability that a step ignores the chain and draws a globally popular item.
    noise: float = 0.1
    #: Zipf exponent of item popularity (inside a cluster and globally).
    zipf: float = 1.0
    #: Dirichlet concentration of the successor weights (small: a dominant successor).
    concentration: float = 0.5
    min_len: int = 10
    #: longest generated history (interactions per user).
    max_seq: int = 50
    #: the schema's ``max_len`` (the model's window).
    max_len: int = 50
    embedding_dim: int = 32
    rows_per_file: int = 100_000
    row_group_rows: int = 512
    seed: int = 0


NEXT_ITEM_PRESETS: Dict[str, Dict[str, object]] = {
    "ci": dict(num_users=6000, num_items=1000, num_clusters=50, min_len=10, max_seq=40,
               max_len=40, row_group_rows=256),
    "tiny": dict(num_users=256, num_items=120, num_clusters=12, min_len=3, max_seq=12,
                 max_len=10, embedding_dim=16, row_group_rows=32),
}


def _check(args: NextItemSynthArgs) -> None:
    if args.num_items < 20 or args.num_clusters < 1 or args.num_clusters > args.num_items:
        raise ValueError(f"--num-items ({args.num_items}) must be >= 20 and --num-clusters "
                         f"({args.num_clusters}) in [1, num_items]")
    if not 1 <= args.successors <= args.num_clusters:
        raise ValueError(f"--successors {args.successors} must lie in [1, num_clusters]")
    if not 0.0 <= args.noise <= 1.0:
        raise ValueError(f"--noise {args.noise} must lie in [0, 1]")
    if not 2 <= args.min_len <= args.max_seq or args.max_seq >= args.num_items:
        raise ValueError(f"need 2 <= --min-len ({args.min_len}) <= --max-seq ({args.max_seq}) "
                         f"< num_items ({args.num_items})")
    if args.max_len < 2 or args.num_users < 1:
        raise ValueError("--max-len must be >= 2 and --num-users >= 1")


class PlantedChain:
    """The planted cluster chain and popularities (``items`` indexed 1..N; column 0 unused)."""

    def __init__(self, args: NextItemSynthArgs, rng: np.random.Generator) -> None:
        n, c = args.num_items, args.num_clusters
        self.cluster = np.empty(n + 1, dtype=np.int64)
        self.cluster[0] = -1
        self.cluster[1:] = rng.permutation(np.arange(n) % c)
        pop = 1.0 / np.power(rng.permutation(n) + 1.0, args.zipf)  # Zipf by a random rank
        self.global_pop = np.concatenate(([0.0], pop / pop.sum()))
        # [C, N + 1]: popularity inside each cluster.
        self.in_cluster = np.zeros((c, n + 1))
        self.in_cluster[self.cluster[1:], np.arange(1, n + 1)] = pop
        self.in_cluster /= self.in_cluster.sum(1, keepdims=True)
        self.transition = np.zeros((c, c))
        for k in range(c):
            succ = rng.choice(c, size=args.successors, replace=False)
            self.transition[k, succ] = rng.dirichlet(np.full(args.successors,
                                                             args.concentration))
        # [C, N + 1]: next-item distribution given the previous item's cluster.
        self.next_given = (1.0 - args.noise) * (self.transition @ self.in_cluster) \
            + args.noise * self.global_pop[None, :]


def _draw(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One index per row of the (unnormalised, non-negative) rows of ``p``."""
    cdf = np.cumsum(p, axis=1)
    u = rng.random(p.shape[0]) * cdf[:, -1]
    return np.minimum((cdf < u[:, None]).sum(1), p.shape[1] - 1)


def generate_histories(args: NextItemSynthArgs
                       ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Dict[str, float]]:
    """(user, item, ts) interaction arrays and the oracle metrics of the last steps."""
    _check(args)
    rng = np.random.default_rng(args.seed)
    chain = PlantedChain(args, rng)
    u_n, n = args.num_users, args.num_items
    lengths = rng.integers(args.min_len, args.max_seq + 1, size=u_n)
    items = np.zeros((u_n, args.max_seq), dtype=np.int64)
    seen = np.zeros((u_n, n + 1), dtype=bool)
    seen[:, 0] = True
    start = rng.integers(0, args.num_clusters, size=u_n)
    hit = np.zeros(u_n)
    mass = np.zeros(u_n)
    for t in range(args.max_seq):
        active = np.flatnonzero(lengths > t)
        if t == 0:
            p = chain.in_cluster[start[active]].copy()
        else:
            p = chain.next_given[chain.cluster[items[active, t - 1]]].copy()
        p[seen[active]] = 0.0
        # A user who has seen every item the chain allows falls back to global popularity.
        stuck = p.sum(1) <= 0
        if stuck.any():
            p[stuck] = np.where(seen[active[stuck]], 0.0, chain.global_pop[None, :])
        p /= p.sum(1, keepdims=True)
        nxt = _draw(p, rng)
        items[active, t] = nxt
        seen[active, nxt] = True
        last = lengths[active] == t + 1
        if last.any():
            # The oracle's top-10 at each user's final (held-out) step.
            pl = p[last]
            top = np.argpartition(-pl, 10, axis=1)[:, :10]
            hit[active[last]] = (top == nxt[last, None]).any(1)
            mass[active[last]] = np.take_along_axis(pl, top, 1).sum(1)
    user = np.repeat(np.arange(u_n, dtype=np.int64), lengths)
    item = items[np.arange(args.max_seq)[None, :] < lengths[:, None]]
    gaps = rng.integers(60, 86_400, size=item.size)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    csum = np.cumsum(gaps)
    ts = 1_600_000_000 + csum - np.repeat(csum[offsets[:-1]] - gaps[offsets[:-1]], lengths)
    oracle = {"hr@10": float(hit.mean()), "expected_hr@10": float(mass.mean())}
    return user, item, ts.astype(np.int64), oracle


def generate_next_item(out: str, args: NextItemSynthArgs, overwrite: bool = False,
                       progress: bool = True) -> Dict[str, object]:
    """Write the dataset to ``out`` (atomically, as the converters do); returns meta."""
    user, item, ts, oracle = generate_histories(args)
    with DatasetWriter(out, overwrite, args.rows_per_file, args.row_group_rows) as writer:
        schema, facts = write_sequences(writer, user, item, ts, None, args.max_len,
                                        args.embedding_dim)
        meta: Dict[str, object] = {"generator": "data.synth seq", "args": asdict(args),
                                   **facts, "oracle": oracle}
        meta = writer.finish(schema, meta)
    if progress:
        logger.info("dataset %s: %d users, %d interactions, oracle HR@10 %.4f (expected %.4f)",
                    out, args.num_users, item.size, oracle["hr@10"], oracle["expected_hr@10"])
    return meta
