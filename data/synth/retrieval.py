"""Synthetic retrieval data with planted user and item vectors and a known oracle recall@K.

``python -m data.synth retrieval --out DIR [--preset tiny|ci|multi] [--seed 0] ...`` writes
``train/``, ``valid/``, ``test/`` (one row = one user and one positive item), ``schema.json``
and ``meta.json`` with the oracle metrics.

The planted model (all parameters drawn from ``--seed``): item ``j`` (ids ``1..num_items``;
0 is padding) has a unit vector ``v_j ∈ R^true_dim`` and a Zipf popularity ``π_j``; user
``u`` has ``interests`` unit vectors ``w_u1..w_uM``, each one of ``prototypes`` shared unit
vectors (distinct per user) plus Gaussian noise of scale ``interest_noise``, normalised —
communities of taste that a model can learn from the population. The user's item
distribution is the mixture of one softmax per interest::

    P(j | u) = (1/M) Σ_m softmax_j(β ⟨w_um, v_j⟩ + γ log π_j)

so affinities come from the planted dot products, popular items are favoured (``γ``) and a
user with M > 1 wants M distinct regions of the item space (a single user vector can only
point at their mean: the multi-interest case MIND is for). Each user has one history of
``hist_len`` distinct items drawn from ``P(· | u)`` without replacement (Gumbel top-k), then
``train_per_user`` training positives, one valid and one test positive, each drawn from
``P(· | u)`` restricted to the items outside the history.

Rows: sparse ``user_id`` (table ``user``), sequence ``item_seq`` (table ``item``): the history
oldest first **followed by the positive** (the retrieval task strips that last id into the
label); train rows are shuffled.

Item features (``--item-features 1``, the default): ``item_features.parquet``
(:mod:`data.item_features`) gives every item a ``category`` — the prototype nearest to its
planted vector, ``1..prototypes`` (a coarse cluster of the item space that users' interests
also come from, as a shop's category tree groups what its customers want) — and a finer
``brand`` — the nearest of ``brands`` random unit centres — and the numeric
``log_popularity`` (the planted ``log π_j``, as observed sales would give it). They let an
item tower place items that few rows mention (the cold tail of the Zipf popularity). Their
draws come from their own seed stream (``log_popularity`` replays the planted one), so the
rows and oracle do not depend on them.

Oracle: the ``K`` most likely unseen items under ``P(· | u)``. ``meta.json`` stores
``oracle.recall@K`` (fraction of test rows whose positive is in that list — the best recall
any model can expect under the history-excluded protocol), ``oracle.expected_recall@K``
(the lists' mean probability mass, without sampling noise) and ``oracle.ndcg@10``, for
K in 10, 50, 100, 200. With M > 1 it also holds two planted bounds of the top-50's mass:
``one_vector_expected_recall@50`` (items ranked by the user's normalised mean interest, one
vector) and ``per_interest_expected_recall@50`` (by the best of the M interests: one vector
per interest, MIND's serving rule) — how much a single vector loses in the planted space.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import pyarrow as pa

from data.convert.common import DatasetWriter, list_column, single_id_column
from data.item_features import ItemFeatures
from data.schema import FeatureSpec, Schema

logger = logging.getLogger(__name__)

ORACLE_KS = (10, 50, 100, 200)


@dataclass
class RetrievalSynthArgs:
    """Arguments of the retrieval generator (see the module docstring)."""

    num_users: int = 4000
    num_items: int = 2000
    #: width of the planted vectors.
    true_dim: int = 16
    #: M, interest vectors per user.
    interests: int = 2
    #: interest prototypes shared by the users (each interest is a prototype plus noise:
    #: communities of taste a model can learn from the population); 0: every interest drawn
    #: independently.
    prototypes: int = 64
    #: noise scale of an interest around its prototype (before normalising).
    interest_noise: float = 0.05
    #: write the user feature ``segment``: the prototype ids of the user's interests (a
    #: cohort feature that carries most of the planted user vector, as demographics and
    #: declared tastes do in a real log); 0: only ``user_id`` and the history.
    segment_feature: int = 1
    #: β, sharpness of each interest's softmax over items.
    beta: float = 8.0
    #: γ, weight of log popularity.
    popularity: float = 0.5
    #: Zipf exponent of the popularity.
    zipf: float = 1.0
    hist_len: int = 20
    train_per_user: int = 20
    embedding_dim: int = 32
    #: write ``item_features.parquet`` (``category``, ``brand``; see the module docstring).
    item_features: int = 1
    #: brand centres (the finer item feature).
    brands: int = 256
    rows_per_file: int = 200_000
    row_group_rows: int = 512
    seed: int = 0


RETRIEVAL_PRESETS: Dict[str, Dict[str, object]] = {
    "ci": dict(num_users=3000, num_items=1000, interests=1, train_per_user=20),
    "multi": dict(num_users=3000, num_items=1000, interests=3, beta=12.0, train_per_user=20),
    "tiny": dict(num_users=200, num_items=120, true_dim=8, interests=2, hist_len=6,
                 train_per_user=4, embedding_dim=16, row_group_rows=64),
}


def _check(a: RetrievalSynthArgs) -> None:
    if a.num_items < 20 or a.num_users < 1 or a.true_dim < 1 or a.interests < 1:
        raise ValueError("--num-items must be >= 20 and --num-users, --true-dim, --interests "
                         ">= 1")
    if not 1 <= a.hist_len <= a.num_items // 2:
        raise ValueError(f"--hist-len {a.hist_len} must lie in [1, num_items / 2]")
    if a.prototypes and a.prototypes < a.interests:
        raise ValueError(f"--prototypes {a.prototypes} must be 0 or >= --interests")
    if a.train_per_user < 1 or a.embedding_dim % 4:
        raise ValueError("--train-per-user must be >= 1 and --embedding-dim a multiple of 4")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def user_item_probs(items: np.ndarray, log_pop: np.ndarray, interests: np.ndarray,
                    beta: float, gamma: float) -> np.ndarray:
    """``[U, N]`` mixture ``P(j | u)`` for interests ``[U, M, d]`` and items ``[N, d]``."""
    logits = beta * np.einsum("umd,nd->umn", interests, items) + gamma * log_pop
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    return p.mean(1)


def _draw(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cdf = np.cumsum(p, axis=1)
    u = rng.random(p.shape[0]) * cdf[:, -1]
    return np.minimum((cdf < u[:, None]).sum(1), p.shape[1] - 1)


def generate_interactions(a: RetrievalSynthArgs
                          ) -> Tuple[np.ndarray, Dict[str, np.ndarray], Dict[str, float],
                                     np.ndarray]:
    """(histories ``[U, hist_len]`` item ids, positives per split, oracle metrics, the
    prototype id of every user's interests ``[U, M]`` (0-based; zeros without prototypes))."""
    _check(a)
    rng = np.random.default_rng(a.seed)
    n = a.num_items
    items = _unit(rng.normal(size=(n, a.true_dim)))
    pop = 1.0 / np.power(rng.permutation(n) + 1.0, a.zipf)
    log_pop = np.log(pop / pop.sum())
    if a.prototypes > 0:
        protos = _unit(rng.normal(size=(a.prototypes, a.true_dim)))
        which = np.stack([rng.choice(a.prototypes, size=a.interests, replace=False)
                          for _ in range(a.num_users)])
        interests = _unit(protos[which] + a.interest_noise
                          * rng.normal(size=(a.num_users, a.interests, a.true_dim)))
    else:
        which = np.zeros((a.num_users, a.interests), dtype=np.int64)
        interests = _unit(rng.normal(size=(a.num_users, a.interests, a.true_dim)))
    hist = np.zeros((a.num_users, a.hist_len), dtype=np.int64)
    pos: Dict[str, np.ndarray] = {"train": np.zeros((a.num_users, a.train_per_user), np.int64),
                                  "valid": np.zeros(a.num_users, np.int64),
                                  "test": np.zeros(a.num_users, np.int64)}
    hits = {k: np.zeros(a.num_users) for k in ORACLE_KS}
    mass = {k: np.zeros(a.num_users) for k in ORACLE_KS}
    ndcg10 = np.zeros(a.num_users)
    # Planted bounds of the multi-interest case: the mass of the top-50 by the user's
    # normalised mean interest (one vector) and by its best interest (one vector each).
    one_vec, per_interest = np.zeros(a.num_users), np.zeros(a.num_users)
    discount = 1.0 / np.log2(np.arange(2, 12))
    chunk = max(1, 2_000_000 // n)
    for c0 in range(0, a.num_users, chunk):
        sl = slice(c0, min(a.num_users, c0 + chunk))
        p = user_item_probs(items, log_pop, interests[sl], a.beta, a.popularity)
        # History: hist_len distinct items by Gumbel top-k (sampling without replacement).
        g = np.log(p + 1e-300) + rng.gumbel(size=p.shape)
        h = np.argpartition(-g, a.hist_len, axis=1)[:, :a.hist_len]
        h = np.take_along_axis(h, np.argsort(-np.take_along_axis(g, h, 1), axis=1), 1)
        hist[sl] = h[:, ::-1] + 1  # oldest first; ids are 1-based
        q = p.copy()
        np.put_along_axis(q, h, 0.0, axis=1)
        q /= q.sum(1, keepdims=True)
        pos["train"][sl] = np.stack([_draw(q, rng) for _ in range(a.train_per_user)], 1) + 1
        pos["valid"][sl] = _draw(q, rng) + 1
        test = _draw(q, rng)
        pos["test"][sl] = test + 1
        order = np.argsort(-q, axis=1)[:, :max(ORACLE_KS)]
        at = order == test[:, None]
        for k in ORACLE_KS:
            hits[k][sl] = at[:, :k].any(1)
            mass[k][sl] = np.take_along_axis(q, order[:, :k], 1).sum(1)
        ndcg10[sl] = (at[:, :10] * discount).sum(1)
        if a.interests > 1:
            seen = q == 0.0
            mean = _unit(interests[sl].mean(1, keepdims=True))
            for out, w in ((one_vec, mean), (per_interest, interests[sl])):
                score = (a.beta * np.einsum("umd,nd->umn", w, items).max(1)
                         + a.popularity * log_pop)
                top = np.argsort(-np.where(seen, -np.inf, score), axis=1)[:, :50]
                out[sl] = np.take_along_axis(q, top, 1).sum(1)
    oracle = {**{f"recall@{k}": float(hits[k].mean()) for k in ORACLE_KS},
              **{f"expected_recall@{k}": float(mass[k].mean()) for k in ORACLE_KS},
              "ndcg@10": float(ndcg10.mean())}
    if a.interests > 1:
        oracle["one_vector_expected_recall@50"] = float(one_vec.mean())
        oracle["per_interest_expected_recall@50"] = float(per_interest.mean())
    return hist, pos, oracle, which


def planted_items(a: RetrievalSynthArgs) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(item vectors ``[N, d]``, prototypes ``[P, d]`` or None): the first draws of
    :func:`generate_interactions`' stream, replayed."""
    return _planted(a)[:2]


def _planted(a: RetrievalSynthArgs) -> Tuple[np.ndarray, Optional[np.ndarray], np.ndarray]:
    """(item vectors, prototypes or None, ``[N]`` log planted popularity ``log π_j``)."""
    rng = np.random.default_rng(a.seed)
    items = _unit(rng.normal(size=(a.num_items, a.true_dim)))
    pop = 1.0 / np.power(rng.permutation(a.num_items) + 1.0, a.zipf)
    protos = _unit(rng.normal(size=(a.prototypes, a.true_dim))) if a.prototypes > 0 else None
    return items, protos, np.log(pop / pop.sum())


def item_feature_table(a: RetrievalSynthArgs) -> ItemFeatures:
    """``category`` (nearest prototype, or of 64 random centres without prototypes) and
    ``brand`` (nearest of ``brands`` random centres) of every item, and the numeric
    ``log_popularity`` (``log π_j``, as a shop's sales counts would give it); row 0 (padding)
    empty / 0."""
    items, protos, log_pop = _planted(a)
    rng = np.random.default_rng([a.seed, 11])
    if protos is None:
        protos = _unit(rng.normal(size=(64, a.true_dim)))
    brands = _unit(rng.normal(size=(max(1, a.brands), a.true_dim)))
    category = np.argmax(items @ protos.T, axis=1) + 1
    brand = np.argmax(items @ brands.T, axis=1) + 1
    tables = {"category": np.concatenate(([0], category))[:, None].astype(np.int64),
              "brand": np.concatenate(([0], brand))[:, None].astype(np.int64)}
    dense = {"log_popularity": np.concatenate(([0.0], log_pop))}
    return ItemFeatures(tables, {"category": protos.shape[0] + 1, "brand": brands.shape[0] + 1},
                        dense)


def has_segments(a: RetrievalSynthArgs) -> bool:
    return bool(a.segment_feature) and a.prototypes > 0


def retrieval_schema(a: RetrievalSynthArgs) -> Schema:
    features = [FeatureSpec("user_id", "sparse", table="user", num_embeddings=a.num_users + 1,
                            embedding_dim=a.embedding_dim)]
    if has_segments(a):
        features.append(FeatureSpec("segment", "sparse", table="segment",
                                    num_embeddings=a.prototypes + 1,
                                    embedding_dim=a.embedding_dim, pooling="mean"))
    features.append(FeatureSpec("item_seq", "sequence", table="item",
                                num_embeddings=a.num_items + 1, embedding_dim=a.embedding_dim,
                                max_len=a.hist_len + 1))
    return Schema(features=features, labels=[])


def _rows(users: np.ndarray, hist: np.ndarray, positives: np.ndarray,
          segments: Optional[np.ndarray]) -> pa.Table:
    """One row per (user, positive): ``item_seq`` = the user's history then the positive;
    ``segment`` (when ``segments [U, M]`` is given) = the user's M interest prototype ids + 1."""
    seq = np.concatenate([hist[users - 1], positives[:, None]], axis=1)
    offsets = np.arange(users.size + 1, dtype=np.int64) * seq.shape[1]
    cols = {"user_id": single_id_column(users.astype(np.int64))}
    if segments is not None:
        seg = segments[users - 1] + 1
        cols["segment"] = list_column(np.arange(users.size + 1, dtype=np.int64) * seg.shape[1],
                                      seg.reshape(-1))
    cols["item_seq"] = list_column(offsets, seq.reshape(-1))
    return pa.table(cols)


def generate_retrieval(out: str, args: RetrievalSynthArgs, overwrite: bool = False,
                       progress: bool = True) -> Dict[str, object]:
    """Write the dataset to ``out`` (atomically, as the converters do); returns meta."""
    hist, pos, oracle, which = generate_interactions(args)
    segments = which if has_segments(args) else None
    users = np.arange(1, args.num_users + 1, dtype=np.int64)
    rng = np.random.default_rng([args.seed, 7])
    train_users = np.repeat(users, args.train_per_user)
    train_pos = pos["train"].reshape(-1)
    perm = rng.permutation(train_users.size)
    counts = np.bincount(train_pos, minlength=args.num_items + 1)
    with DatasetWriter(out, overwrite, args.rows_per_file, args.row_group_rows) as writer:
        for a in range(0, perm.size, args.rows_per_file):
            idx = perm[a:a + args.rows_per_file]
            writer.write("train", _rows(train_users[idx], hist, train_pos[idx], segments))
        writer.write("valid", _rows(users, hist, pos["valid"], segments))
        writer.write("test", _rows(users, hist, pos["test"], segments))
        meta: Dict[str, object] = {
            "generator": "data.synth retrieval", "args": asdict(args), "task": "retrieval",
            "num_items": args.num_items, "num_users": args.num_users,
            "eval_protocol": "one held-out positive per user (valid, test); the user's history "
                             "items are excluded from the ranking",
            "train_positive_items": int((counts > 0).sum()),
            "oracle": oracle}
        if args.item_features:
            features = item_feature_table(args)
            features.save(writer.tmp)
            meta["item_features"] = features.rows
        meta = writer.finish(retrieval_schema(args), meta)
    if progress:
        logger.info("dataset %s: %d users x %d train positives, oracle recall@50 %.4f "
                    "(expected %.4f)", out, args.num_users, args.train_per_user,
                    oracle["recall@50"], oracle["expected_recall@50"])
    return meta
