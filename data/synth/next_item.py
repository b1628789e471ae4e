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

Time carries signal: histories are sessions. Each step after the first starts a new session
with probability ``session_break`` (its gap to the previous event is log-uniform in
[``break_gap_s``], hours to weeks) and otherwise continues the session (gap log-uniform in
[``session_gap_s``], seconds to minutes). A step inside a session follows the chain; the
first step of a new session returns to the previous item's own cluster instead (the user
picks up what they were browsing rather than moving on), with the same ``noise``. A model
that sees when the next event happens (HSTU's time-gap bias, with the query carrying the
next event's time) can tell the two apart; a model that sees only the item order (SASRec)
cannot and must hedge between them. ``session_break = 0`` gives the plain chain.

``time_signal`` chooses that: ``sessions`` (the above), ``none`` (every step follows the
chain; the timestamps still have session-like gaps, drawn independently of the items, so
they carry no information about the next item) or ``line_order`` (the chain, timestamps
0, 1, 2, … per user: what a converter writes for a dataset without times, such as the
SASRec-format Amazon sets). Without a time signal the time-blind oracle is the oracle. The
presets ``ci_notime`` and ``ci_lineorder`` are ``ci`` with these.

A long-range signal for long histories (``revisit > 0``, off by default): with probability
``revisit`` a step revisits, drawing a lag ``d`` uniformly from ``revisit_lags`` and then an
item from the cluster of the user's item ``d`` steps back (with the same ``noise``; a lag
longer than the history so far falls back to the chain). A model that attends only to the
last ``W`` events sees the lags below ``W`` and must guess the rest: the probe of semi-local
attention's window (preset ``long``: 512–8,192 events, log-uniform lengths, lags 48 / 200 /
800, no time signal). ``length_dist = "log_uniform"`` draws history lengths log-uniformly in
``[min_len, max_seq]`` instead of uniformly.

Oracle: at a user's last step the true next-item distribution is known; its 10 most likely
unseen items are the oracle's top-10. ``meta.json`` stores ``oracle.hr@10`` (the fraction of
eval rows whose held-out item is in that top-10: the best HR@10 any model can expect under
the leave-one-out, history-excluded protocol, given the held-out event's time) and
``oracle.expected_hr@10`` (the mean probability mass of those top-10 lists, the same
quantity without sampling noise); ``oracle.ndcg@10`` / ``expected_ndcg@10`` are the NDCG@10
of that ranking (sorted by probability). ``oracle.time_blind_*`` are the same for the best
model that does not know whether the held-out step starts a session (its top-10 of the
mixture ``session_break`` x return + the rest x chain): the ceiling of a model without
timestamps.
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
    #: probability that a step starts a new session (and returns to the previous cluster).
    session_break: float = 0.3
    #: (low, high) of the log-uniform gap inside a session, in seconds.
    session_gap_s: Tuple[int, int] = (30, 1800)
    #: (low, high) of the log-uniform gap before a new session, in seconds.
    break_gap_s: Tuple[int, int] = (4 * 3600, 14 * 86_400)
    min_len: int = 10
    #: longest generated history (interactions per user).
    max_seq: int = 50
    #: the schema's ``max_len`` (the model's window).
    max_len: int = 50
    embedding_dim: int = 32
    rows_per_file: int = 100_000
    row_group_rows: int = 512
    seed: int = 0
    #: what time tells: sessions (a session break returns to the previous cluster), none
    #: (uninformative gaps) or line_order (timestamps 0, 1, 2, ...).
    time_signal: str = "sessions"
    #: probability that a step revisits the cluster of the item ``d`` steps back.
    revisit: float = 0.0
    #: the lags ``d`` of a revisit (drawn uniformly).
    revisit_lags: Tuple[int, ...] = (48, 200, 800)
    #: history lengths: uniform or log_uniform in [min_len, max_seq].
    length_dist: str = "uniform"
    #: with revisits, meta.json also has the oracle of a model that sees only the last W
    #: events, for each W here (``oracle.window{W}_hr@10`` ...).
    oracle_windows: Tuple[int, ...] = (64, 256, 1024)


NEXT_ITEM_PRESETS: Dict[str, Dict[str, object]] = {
    "ci": dict(num_users=6000, num_items=1000, num_clusters=50, min_len=10, max_seq=40,
               max_len=40, row_group_rows=256),
    "ci_notime": dict(num_users=6000, num_items=1000, num_clusters=50, min_len=10, max_seq=40,
                      max_len=40, row_group_rows=256, time_signal="none"),
    "ci_lineorder": dict(num_users=6000, num_items=1000, num_clusters=50, min_len=10,
                         max_seq=40, max_len=40, row_group_rows=256, time_signal="line_order"),
    # Long histories with a long-range signal (semi-local attention's quality table,
    # docs/hstu-long.md); the no-repeat rule needs num_items well above max_seq.
    "long": dict(num_users=300, num_items=20_000, num_clusters=200, min_len=512,
                 max_seq=8192, max_len=8192, length_dist="log_uniform", revisit=0.5,
                 revisit_lags=(48, 200, 800), time_signal="none", row_group_rows=16),
    # The same at a fourth of the length and a fourth of the items (a CPU-sized table).
    "long_small": dict(num_users=300, num_items=5000, num_clusters=100, min_len=256,
                       max_seq=2048, max_len=2048, length_dist="log_uniform", revisit=0.5,
                       revisit_lags=(48, 200, 800), time_signal="none", row_group_rows=16),
    "tiny": dict(num_users=256, num_items=120, num_clusters=12, min_len=3, max_seq=12,
                 max_len=10, embedding_dim=16, row_group_rows=32),
}


TIME_SIGNALS = ("sessions", "none", "line_order")
LENGTH_DISTS = ("uniform", "log_uniform")


def _check(args: NextItemSynthArgs) -> None:
    if args.num_items < 20 or args.num_clusters < 1 or args.num_clusters > args.num_items:
        raise ValueError(f"--num-items ({args.num_items}) must be >= 20 and --num-clusters "
                         f"({args.num_clusters}) in [1, num_items]")
    if not 1 <= args.successors <= args.num_clusters:
        raise ValueError(f"--successors {args.successors} must lie in [1, num_clusters]")
    if not 0.0 <= args.noise <= 1.0:
        raise ValueError(f"--noise {args.noise} must lie in [0, 1]")
    if not 0.0 <= args.session_break <= 1.0:
        raise ValueError(f"--session-break {args.session_break} must lie in [0, 1]")
    for key in ("session_gap_s", "break_gap_s"):
        bounds = tuple(getattr(args, key))
        if len(bounds) != 2 or not 1 <= bounds[0] <= bounds[1]:
            raise ValueError(f"--{key.replace('_', '-')} {','.join(map(str, bounds))}: give "
                             "LOW,HIGH seconds with 1 <= LOW <= HIGH")
    if not 2 <= args.min_len <= args.max_seq or args.max_seq >= args.num_items:
        raise ValueError(f"need 2 <= --min-len ({args.min_len}) <= --max-seq ({args.max_seq}) "
                         f"< num_items ({args.num_items})")
    if args.time_signal not in TIME_SIGNALS:
        raise ValueError(f"--time-signal {args.time_signal!r} is not one of "
                         f"{', '.join(TIME_SIGNALS)}")
    if args.length_dist not in LENGTH_DISTS:
        raise ValueError(f"--length-dist {args.length_dist!r} is not one of "
                         f"{', '.join(LENGTH_DISTS)}")
    if not 0.0 <= args.revisit <= 1.0:
        raise ValueError(f"--revisit {args.revisit} must lie in [0, 1]")
    if args.revisit > 0 and (not args.revisit_lags or min(args.revisit_lags) < 1):
        raise ValueError(f"--revisit-lags {','.join(map(str, args.revisit_lags))}: give one "
                         "or more lags >= 1")
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
        # [C, N + 1]: next-item distribution given the previous item's cluster, inside a
        # session (the chain) and at the first step of a new one (the same cluster).
        self.next_given = (1.0 - args.noise) * (self.transition @ self.in_cluster) \
            + args.noise * self.global_pop[None, :]
        self.return_given = (1.0 - args.noise) * self.in_cluster \
            + args.noise * self.global_pop[None, :]


def _draw(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One index per row of the (unnormalised, non-negative) rows of ``p``."""
    cdf = np.cumsum(p, axis=1)
    u = rng.random(p.shape[0]) * cdf[:, -1]
    return np.minimum((cdf < u[:, None]).sum(1), p.shape[1] - 1)


def _unseen(p: np.ndarray, seen: np.ndarray, global_pop: np.ndarray) -> np.ndarray:
    """Rows of ``p`` restricted to unseen items and renormalised; a row the chain leaves
    empty falls back to the global popularity of the unseen items."""
    p = np.where(seen, 0.0, p)
    stuck = p.sum(1) <= 0
    if stuck.any():
        p[stuck] = np.where(seen[stuck], 0.0, global_pop[None, :])
    return p / p.sum(1, keepdims=True)


#: NDCG discount of ranks 1..10.
_DISCOUNT = 1.0 / np.log2(np.arange(2, 12))

#: the oracle metrics, each for the time-aware and (``time_blind_`` prefix) the blind oracle.
_ORACLE_KEYS = ("hr@10", "expected_hr@10", "ndcg@10", "expected_ndcg@10")


def _top10(score: np.ndarray, p: np.ndarray, drawn: np.ndarray) -> Tuple[np.ndarray, ...]:
    """The metrics of ranking by ``score`` (top-10 per row) when the truth is ``p`` and the
    held-out items are ``drawn``, per row, in :data:`_ORACLE_KEYS` order: hit, the top-10's
    true probability mass, NDCG@10 of ``drawn``, and its expectation under ``p``."""
    top = np.argpartition(-score, 10, axis=1)[:, :10]
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(score, top, 1), axis=1), 1)
    at = top == drawn[:, None]
    truth = np.take_along_axis(p, top, 1)
    return at.any(1), truth.sum(1), (at * _DISCOUNT).sum(1), (truth * _DISCOUNT).sum(1)


def _with_revisits(p: np.ndarray, chain: PlantedChain, items: np.ndarray, t: int,
                   lags: np.ndarray, revisit: float) -> np.ndarray:
    """Mix into the step-``t`` distributions ``p [U, N + 1]`` the revisits: each lag ``d`` of
    ``lags`` (no more than ``t``) with weight ``revisit / len(lags)``, the cluster of
    ``items[:, t − d]`` (``items [U, max_seq]``, the users' histories so far)."""
    valid = lags[lags <= t]
    if valid.size == 0:
        return p
    w = revisit / lags.size
    out = (1.0 - w * valid.size) * p
    for d in valid:
        out += w * chain.return_given[chain.cluster[items[:, t - d]]]
    return out


def _log_uniform(rng: np.random.Generator, bounds: Tuple[int, int],
                 shape: Tuple[int, ...]) -> np.ndarray:
    """Integer seconds, log-uniform in ``[low, high]``."""
    low, high = np.log(bounds[0]), np.log(bounds[1])
    return np.rint(np.exp(rng.uniform(low, high, size=shape))).astype(np.int64)


def generate_histories(args: NextItemSynthArgs
                       ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Dict[str, float]]:
    """(user, item, ts) interaction arrays and the oracle metrics of the last steps."""
    _check(args)
    rng = np.random.default_rng(args.seed)
    chain = PlantedChain(args, rng)
    u_n, n = args.num_users, args.num_items
    if args.length_dist == "log_uniform":
        lengths = np.minimum(_log_uniform(rng, (args.min_len, args.max_seq), (u_n,)),
                             args.max_seq)
    else:
        lengths = rng.integers(args.min_len, args.max_seq + 1, size=u_n)
    lags = np.asarray(args.revisit_lags if args.revisit > 0 else (), dtype=np.int64)
    items = np.zeros((u_n, args.max_seq), dtype=np.int64)
    seen = np.zeros((u_n, n + 1), dtype=bool)
    seen[:, 0] = True
    start = rng.integers(0, args.num_clusters, size=u_n)
    # breaks[u, t]: step t starts a new session (never the first step).
    breaks = rng.random((u_n, args.max_seq)) < args.session_break
    breaks[:, 0] = False
    # The session breaks the items follow: none when time carries no signal (the gaps below
    # still use `breaks`, so "none" keeps realistic but uninformative timestamps).
    returns = breaks if args.time_signal == "sessions" else np.zeros_like(breaks)
    b = args.session_break if args.time_signal == "sessions" else 0.0
    aware = np.zeros((len(_ORACLE_KEYS), u_n))
    blind = np.zeros((len(_ORACLE_KEYS), u_n))
    windows = tuple(args.oracle_windows) if lags.size else ()
    local = np.zeros((len(windows), len(_ORACLE_KEYS), u_n))
    for t in range(args.max_seq):
        active = np.flatnonzero(lengths > t)
        if t == 0:
            p = chain.in_cluster[start[active]].copy()
        else:
            prev = chain.cluster[items[active, t - 1]]
            p = np.where(returns[active, t, None], chain.return_given[prev],
                         chain.next_given[prev])
            p = _with_revisits(p, chain, items[active], t, lags, args.revisit)
        p = _unseen(p, seen[active], chain.global_pop)
        nxt = _draw(p, rng)
        last = lengths[active] == t + 1
        if last.any():
            # The oracle's top-10 at each user's final (held-out) step, knowing whether it
            # starts a session and, time-blind, not knowing it.
            pl, ended = p[last], active[last]
            aware[:, ended] = _top10(pl, pl, nxt[last])
            guess = pl
            if t > 0:
                guess = _with_revisits(b * chain.return_given[prev[last]]
                                       + (1.0 - b) * chain.next_given[prev[last]], chain,
                                       items[ended], t, lags, args.revisit)
                guess = _unseen(guess, seen[ended], chain.global_pop)
            blind[:, ended] = _top10(guess, pl, nxt[last])
            for w_i, w in enumerate(windows):
                # A model that sees the last w events (and the next event's time) knows
                # the revisits of the lags below w; for the others its best simple guess is
                # the global popularity (the clusters that far back are unknown to it), so
                # this is about, not exactly, its ceiling. History stays excluded: the
                # evaluation protocol excludes the whole history from the ranking.
                guess = pl
                if t > 0:
                    wt = args.revisit / lags.size
                    valid = lags[lags <= t]
                    base = np.where(returns[ended, t, None], chain.return_given[prev[last]],
                                    chain.next_given[prev[last]])
                    guess = (1.0 - wt * valid.size) * base \
                        + wt * int((valid >= w).sum()) * chain.global_pop[None, :]
                    for d in valid[valid < w]:
                        guess = guess + wt * chain.return_given[chain.cluster[items[ended,
                                                                                   t - d]]]
                local[w_i][:, ended] = _top10(_unseen(guess, seen[ended], chain.global_pop),
                                              pl, nxt[last])
        items[active, t] = nxt
        seen[active, nxt] = True
    user = np.repeat(np.arange(u_n, dtype=np.int64), lengths)
    keep = np.arange(args.max_seq)[None, :] < lengths[:, None]
    item = items[keep]
    gaps = np.where(breaks, _log_uniform(rng, args.break_gap_s, breaks.shape),
                    _log_uniform(rng, args.session_gap_s, breaks.shape))[keep]
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    csum = np.cumsum(gaps)
    ts = 1_600_000_000 + csum - np.repeat(csum[offsets[:-1]] - gaps[offsets[:-1]], lengths)
    if args.time_signal == "line_order":
        ts = np.arange(item.size) - np.repeat(offsets[:-1], lengths)
    oracle = {**{k: float(v) for k, v in zip(_ORACLE_KEYS, aware.mean(1))},
              **{f"time_blind_{k}": float(v) for k, v in zip(_ORACLE_KEYS, blind.mean(1))},
              **{f"window{w}_{k}": float(v) for w_i, w in enumerate(windows)
                 for k, v in zip(_ORACLE_KEYS, local[w_i].mean(1))}}
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
