"""MovieLens ratings → sequential or CTR dataset.

Inputs: the ratings file — ``u.data`` (ML-100K, tab-separated), ``ratings.dat`` (ML-1M /
ML-10M, ``::``) or ``ratings.csv`` (ML-20M / latest, with header) — plus, optionally, the
movies file (``u.item``, ``movies.dat``, ``movies.csv``) and users file (``u.user``,
``users.dat``), recognised by name. Ratings are streamed in blocks and kept as compact numpy
arrays (32 bytes per rating: ML-20M needs about 0.7 GB), since grouping by user needs them all.

``--task sequential`` (see ``data.convert.sequential``): one row per user with time-ordered
``item_seq``, ``item_ts`` and ``action_seq`` (rating as an action id: the rating for integer
ratings, ``2 × rating`` for the half-star ``ratings.csv``), leave-one-out train/eval split.

``--task ctr``: one row per rating, ``label`` = rating >= 4 (float32) and, with
``--love-label``, a second label ``love`` = rating >= 5 (multi-task); sparse ``user_id``,
``item_id``, ``genres`` (multi-valued, when a movies file is given) and ``gender``, ``age``,
``occupation``, ``zip3`` (when a users file is given; id 0 = unknown); ``hist_items`` with
``hist_ts``: the user's items rated strictly before this rating (most recent
``--history-len``). The eval split holds each user's last rating, train the others.
Items and users are renumbered ``1..N`` in raw-id order.

``--task retrieval`` (the ``two_tower`` / ``mind`` models): one row per rating (every rating
is an interaction), sparse ``user_id`` and, with a users file, ``gender``, ``age``,
``occupation``, ``zip3``; ``item_seq`` (table ``item``) = the user's earlier ratings (time
order, ties in file order; most recent ``--history-len``) **followed by this item**, the
positive. With a movies file, ``item_features.parquet`` (:mod:`data.item_features`) holds
every item's multi-hot ``genres`` and its release ``decade`` for the item tower
(``model.args.item_features = ["genres", "decade"]``), and the numeric release ``year``
(``model.args.item_dense_features = ["year"]``).
Leave-one-out: each user's last rating goes to ``test``, the one before to ``valid``, the
others to ``train``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa

from data.convert.common import (DEFAULT_SEQ_EMBEDDING_DIM, BadLines, check_embedding_dim,
                                 ConvertError, DatasetWriter, Progress, list_column,
                                 single_id_column)
from data.convert.sequential import renumber, sort_by_user_time, write_sequences
from data.convert.text import float_column, integer_column, read_delimited, report_bad_rows
from data.item_features import ItemFeatures
from data.schema import FeatureSpec, LabelSpec, Schema

logger = logging.getLogger(__name__)

RATINGS_FILES = ("u.data", "ratings.dat", "ratings.csv")
MOVIES_FILES = ("u.item", "movies.dat", "movies.csv")
USERS_FILES = ("u.user", "users.dat")
_YEAR = re.compile(r"\((\d{4})\)\s*$")
U_ITEM_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=("sequential", "ctr", "retrieval"), default="sequential")
    p.add_argument("--max-len", type=int, default=200,
                   help="sequential: max_len of item_seq in the schema (default 200)")
    p.add_argument("--history-len", type=int, default=50,
                   help="ctr: most recent earlier items kept in hist_items; retrieval: in "
                        "item_seq before the positive (default 50)")
    p.add_argument("--embedding-dim", type=int, default=DEFAULT_SEQ_EMBEDDING_DIM,
                   help=f"embedding width of every table, a multiple of 4 (default "
                        f"{DEFAULT_SEQ_EMBEDDING_DIM})")
    p.add_argument("--min-interactions", type=int, default=2,
                   help="sequential: drop users with fewer interactions (default 2)")
    p.add_argument("--love-label", action="store_true",
                   help="ctr: add a second binary label 'love' = rating >= 5 beside 'label' "
                        "(rating >= 4), for multi-task models")


def _classify(inputs: Sequence[str]) -> Tuple[str, Optional[str], Optional[str]]:
    ratings = movies = users = None
    for path in inputs:
        base = os.path.basename(path).lower()
        if base in RATINGS_FILES:
            ratings = path
        elif base in MOVIES_FILES:
            movies = path
        elif base in USERS_FILES:
            users = path
        else:
            raise ConvertError(f"{path}: not a MovieLens file name; expected a ratings file "
                               f"{list(RATINGS_FILES)}, movies {list(MOVIES_FILES)} or users "
                               f"{list(USERS_FILES)}")
    if ratings is None:
        raise ConvertError(f"no ratings file among the inputs; expected one of {list(RATINGS_FILES)}")
    return ratings, movies, users


def read_ratings(path: str, bad_lines: BadLines, progress: Optional[Progress]
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(user [N], item [N], rating float64 [N], ts [N]) raw values from any ratings format."""
    base = os.path.basename(path).lower()
    if base.endswith(".csv"):
        names, delim, header, pick = ["user", "item", "rating", "ts"], ",", True, [0, 1, 2, 3]
    elif base.endswith(".dat"):
        # "1::1193::5::978300760": with ':' as the delimiter the '::' leaves empty fields.
        names = ["user", "e1", "item", "e2", "rating", "e3", "ts"]
        delim, header, pick = ":", False, [0, 2, 4, 6]
    else:
        names, delim, header, pick = ["user", "item", "rating", "ts"], "\t", False, [0, 1, 2, 3]
    out: List[List[np.ndarray]] = [[], [], [], []]
    for first_row, batch, line_map in read_delimited(path, names, delim, bad_lines, header,
                                                     progress=progress):
        cols = [batch.column(i) for i in pick]
        user, bu = integer_column(cols[0], empty=-1)
        item, bi = integer_column(cols[1], empty=-1)
        rating, br = float_column(cols[2], empty=-1.0)
        ts, bt = integer_column(cols[3], empty=-1)
        bu |= user < 0
        bi |= item < 0
        br |= rating < 0
        bt |= ts < 0
        bad = bu | bi | br | bt

        def problem(i: int) -> str:
            for b, name, col in ((bu, "user", cols[0]), (bi, "item", cols[1]),
                                 (br, "rating", cols[2]), (bt, "timestamp", cols[3])):
                if b[i]:
                    return f"field {name}: expected a non-negative number, got {col[i].as_py()!r}"
            return "malformed"

        keep = report_bad_rows(path, bad, first_row, line_map, batch, problem, bad_lines)
        for acc, arr in zip(out, (user, item, rating, ts)):
            acc.append(arr[keep])
    if not out[0]:
        raise ConvertError(f"{path}: no ratings")
    return tuple(np.concatenate(a) for a in out)  # type: ignore[return-value]


def _read_lines(path: str) -> List[str]:
    # Metadata files are small (< 100k lines) and ML-1M's are latin-1 encoded.
    with open(path, encoding="latin-1") as fh:
        return [line.rstrip("\r\n") for line in fh if line.strip()]


def read_movies(path: str, titles: Optional[Dict[int, str]] = None) -> Dict[int, List[str]]:
    """raw movie id → genre names (and, into ``titles`` when given, raw id → title)."""
    titles = {} if titles is None else titles
    base = os.path.basename(path).lower()
    genres: Dict[int, List[str]] = {}
    if base.endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as fh:
            for lineno, rec in enumerate(csv.DictReader(fh), start=2):
                try:
                    genres[int(rec["movieId"])] = [g for g in rec["genres"].split("|")
                                                   if g and g != "(no genres listed)"]
                    titles[int(rec["movieId"])] = rec["title"] or ""
                except (KeyError, ValueError, TypeError):
                    raise ConvertError(f"{path}:{lineno}: expected movieId,title,genres") from None
        return genres
    for lineno, line in enumerate(_read_lines(path), start=1):
        if base.endswith(".dat"):
            parts = line.split("::")
            if len(parts) != 3 or not parts[0].isdigit():
                raise ConvertError(f"{path}:{lineno}: expected MovieID::Title::Genres")
            genres[int(parts[0])] = [g for g in parts[2].split("|") if g]
            titles[int(parts[0])] = parts[1]
        else:
            parts = line.split("|")
            if len(parts) != 24 or not parts[0].isdigit():
                raise ConvertError(f"{path}:{lineno}: expected 24 '|'-separated fields "
                                   f"(id|title|date|video date|url|19 genre flags)")
            genres[int(parts[0])] = [U_ITEM_GENRES[k] for k, flag in enumerate(parts[5:])
                                     if flag == "1"]
            titles[int(parts[0])] = parts[1]
    return genres


USER_FIELDS = ("gender", "age", "occupation", "zip3")


def read_users(path: str) -> Dict[int, Tuple[str, str, str, str]]:
    """raw user id → (gender, age, occupation, first 3 zip characters)."""
    base = os.path.basename(path).lower()
    users: Dict[int, Tuple[str, str, str, str]] = {}
    for lineno, line in enumerate(_read_lines(path), start=1):
        if base.endswith(".dat"):
            parts = line.split("::")
            ok = len(parts) == 5 and parts[0].isdigit()
            if ok:
                users[int(parts[0])] = (parts[1], parts[2], parts[3], parts[4][:3])
            expected = "UserID::Gender::Age::Occupation::Zip-code"
        else:
            parts = line.split("|")
            ok = len(parts) == 5 and parts[0].isdigit()
            if ok:
                users[int(parts[0])] = (parts[2], parts[1], parts[3], parts[4][:3])
            expected = "user id|age|gender|occupation|zip code"
        if not ok:
            raise ConvertError(f"{path}:{lineno}: expected {expected}")
    return users


def _lookup_table(mapping: Dict[int, Any], keys: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(position in ``mapping``'s key list or -1 for every key, the key list)."""
    known = np.array(sorted(mapping), dtype=np.int64)
    if known.size == 0:
        return np.full(keys.size, -1, np.int64), known
    pos = np.minimum(np.searchsorted(known, keys), known.size - 1)
    return np.where(known[pos] == keys, pos, -1), known


def convert(inputs: Sequence[str], out: str, args: argparse.Namespace) -> Dict[str, Any]:
    ratings_path, movies_path, users_path = _classify(inputs)
    bad_lines = BadLines(args.skip_bad_lines)
    progress = Progress([ratings_path], args.progress, desc="movielens")
    user, item, rating, ts = read_ratings(ratings_path, bad_lines, progress)
    progress.close()
    half_stars = ratings_path.lower().endswith(".csv")
    action = np.rint(rating * (2 if half_stars else 1)).astype(np.int64)
    meta: Dict[str, Any] = {
        "converter": "movielens",
        "inputs": list(inputs),
        "args": {k: v for k, v in vars(args).items() if k not in ("inputs", "func")},
        "bad_lines_skipped": bad_lines.count,
    }
    with DatasetWriter(out, args.overwrite, args.rows_per_file, args.row_group_rows,
                       args.compression) as writer:
        if args.task == "sequential":
            schema, facts = write_sequences(writer, user, item, ts, action, args.max_len,
                                            args.embedding_dim, args.min_interactions)
            meta.update(facts)
            meta["action"] = "2 x rating (half stars)" if half_stars else "rating"
        elif args.task == "retrieval":
            schema, facts = _write_retrieval(writer, user, item, ts, users_path, args)
            if movies_path:
                facts["item_features"] = _write_item_genres(writer.tmp, item, movies_path)
            meta.update(facts)
        else:
            schema, facts = _write_ctr(writer, user, item, rating, ts, movies_path, users_path,
                                       args)
            meta.update(facts)
        return writer.finish(schema, meta)


def _write_ctr(writer: DatasetWriter, user: np.ndarray, item: np.ndarray, rating: np.ndarray,
               ts: np.ndarray, movies_path: Optional[str], users_path: Optional[str],
               args: argparse.Namespace, chunk: int = 65_536) -> Tuple[Schema, Dict[str, Any]]:
    item_ids, item_keys = renumber(item)
    user_ids, user_keys = renumber(user)
    order = sort_by_user_time(user_ids, ts)
    u, it, t, r = user_ids[order], item_ids[order], ts[order], rating[order]
    raw_item, raw_user = item[order], user[order]
    n = u.size
    pos = np.arange(n, dtype=np.int64)
    new_user = np.ones(n, dtype=bool)
    new_user[1:] = u[1:] != u[:-1]
    new_run = new_user.copy()
    new_run[1:] |= t[1:] != t[:-1]
    user_start = np.maximum.accumulate(np.where(new_user, pos, 0))
    run_start = np.maximum.accumulate(np.where(new_run, pos, 0))
    last_of_user = np.ones(n, dtype=bool)
    last_of_user[:-1] = new_user[1:]
    # The rating before a user's last one (users with one rating only have a test row).
    second_last = np.zeros(n, dtype=bool)
    second_last[:-1] = last_of_user[1:] & ~new_user[1:]
    dim = args.embedding_dim
    check_embedding_dim(dim)
    feats = [FeatureSpec("user_id", "sparse", table="user", num_embeddings=user_keys.size + 1,
                         embedding_dim=dim),
             FeatureSpec("item_id", "sparse", table="item", num_embeddings=item_keys.size + 1,
                         embedding_dim=dim)]
    genre_lookup: Optional[Tuple[np.ndarray, ...]] = None
    facts: Dict[str, Any] = {"task": "ctr", "num_items": int(item_keys.size),
                             "num_users": int(user_keys.size), "label": "rating >= 4",
                             "eval_protocol": "each user's last rating is in test, the "
                                              "second-to-last in valid"}
    if movies_path:
        genres = read_movies(movies_path)
        names = sorted({g for gs in genres.values() for g in gs})
        gid = {g: k + 1 for k, g in enumerate(names)}
        # Per known movie (in sorted raw-id order): its genre ids as a jagged array.
        where, known = _lookup_table(genres, raw_item)
        per_movie = [[gid[g] for g in genres[int(m)]] for m in known]
        m_len = np.array([len(g) for g in per_movie], dtype=np.int64)
        m_off = np.concatenate(([0], np.cumsum(m_len)))
        m_val = np.array([x for g in per_movie for x in g], dtype=np.int64)
        genre_lookup = (where, m_len, m_off, m_val)
        feats.append(FeatureSpec("genres", "sparse", table="genre", num_embeddings=len(names) + 1,
                                 embedding_dim=dim, pooling="mean"))
        facts["genres"] = names
    user_cols: Dict[str, np.ndarray] = {}
    if users_path:
        users = read_users(users_path)
        where, known = _lookup_table(users, raw_user)
        for k, field_name in enumerate(USER_FIELDS):
            values = np.array([users[int(x)][k] for x in known], dtype=object)
            vocab, codes = np.unique(values.astype(str), return_inverse=True)
            ids = np.where(where >= 0, codes[np.maximum(where, 0)] + 1, 0).astype(np.int64)
            user_cols[field_name] = ids
            feats.append(FeatureSpec(field_name, "sparse", num_embeddings=vocab.size + 1,
                                     embedding_dim=dim))
    feats.append(FeatureSpec("hist_items", "sequence", table="hist_item",
                             num_embeddings=item_keys.size + 1, embedding_dim=dim,
                             max_len=args.history_len, timestamps="hist_ts"))
    love = bool(getattr(args, "love_label", False))
    labels = [LabelSpec("label", "binary")] + ([LabelSpec("love", "binary")] if love else [])
    if love:
        facts["labels"] = {"label": "rating >= 4", "love": "rating >= 5"}
    schema = Schema(features=feats, labels=labels)
    for c0 in range(0, n, chunk):
        sl = slice(c0, min(n, c0 + chunk))
        hist_len = np.minimum(run_start[sl] - user_start[sl], args.history_len)
        offsets = np.concatenate(([0], np.cumsum(hist_len)))
        idx = np.repeat(run_start[sl] - hist_len - offsets[:-1], hist_len) + np.arange(offsets[-1])
        cols: Dict[str, pa.Array] = {
            "user_id": single_id_column(u[sl]),
            "item_id": single_id_column(it[sl]),
        }
        if genre_lookup is not None:
            where, m_len, m_off, m_val = genre_lookup
            w = where[sl]
            lens = np.where(w >= 0, m_len[np.maximum(w, 0)], 0)
            g_off = np.concatenate(([0], np.cumsum(lens)))
            g_idx = np.repeat(m_off[np.maximum(w, 0)] - g_off[:-1], lens) + np.arange(g_off[-1])
            cols["genres"] = list_column(g_off, m_val[g_idx])
        for field_name, ids in user_cols.items():
            cols[field_name] = single_id_column(ids[sl])
        cols["hist_items"] = list_column(offsets, it[idx])
        cols["hist_ts"] = list_column(offsets, t[idx])
        cols["label"] = pa.array((r[sl] >= 4).astype(np.float32))
        if love:
            cols["love"] = pa.array((r[sl] >= 5).astype(np.float32))
        table = pa.table(cols)
        is_test = last_of_user[sl]
        is_valid = second_last[sl]
        writer.write("train", table.filter(pa.array(~is_test & ~is_valid)))
        writer.write("valid", table.filter(pa.array(is_valid)))
        writer.write("test", table.filter(pa.array(is_test)))
    return schema, facts


def _write_item_genres(directory: str, item: np.ndarray, movies_path: str) -> Dict[str, int]:
    """``item_features.parquet`` (:mod:`data.item_features`) of ``--task retrieval``: each
    renumbered item's ``genres`` (multi-hot, ids ``1..G`` in genre-name order) and ``decade``
    (the release year of the title's trailing ``(YYYY)`` in decades, ids ``1..`` in time
    order); none for a movie the movies file lacks or a title without a year. Also the
    numeric ``year`` (that release year; the median year of the dated movies where there is
    none: a numeric feature needs a value for every item, and the median places an undated
    movie in the middle rather than at 0 AD). Returns the vocabulary sizes."""
    titles: Dict[int, str] = {}
    genres = read_movies(movies_path, titles)
    names = sorted({g for gs in genres.values() for g in gs})
    gid = {g: k + 1 for k, g in enumerate(names)}
    decade_of = {m: int(y.group(1)) // 10 * 10 for m, t in titles.items()
                 if (y := _YEAR.search(t)) is not None}
    did = {d: k + 1 for k, d in enumerate(sorted(set(decade_of.values())))}
    _, item_keys = renumber(item)  # the same numbering as the rows (raw-id order)
    per_item: Dict[str, List[List[int]]] = {
        "genres": [[]] + [[gid[g] for g in genres.get(int(raw), [])] for raw in item_keys],
        "decade": [[]] + [[did[decade_of[int(raw)]]] if int(raw) in decade_of else []
                          for raw in item_keys]}
    rows = {"genres": len(names) + 1, "decade": len(did) + 1}
    year_of = {m: float(y.group(1)) for m, t in titles.items()
               if (y := _YEAR.search(t)) is not None}
    fill = float(np.median(list(year_of.values()))) if year_of else 0.0
    year = np.array([0.0] + [year_of.get(int(raw), fill) for raw in item_keys])
    ItemFeatures.from_lists(per_item, rows, {"year": year}).save(directory)
    return rows


def _write_retrieval(writer: DatasetWriter, user: np.ndarray, item: np.ndarray, ts: np.ndarray,
                     users_path: Optional[str], args: argparse.Namespace, chunk: int = 65_536
                     ) -> Tuple[Schema, Dict[str, Any]]:
    """Rows of ``--task retrieval`` (see the module docstring)."""
    item_ids, item_keys = renumber(item)
    user_ids, user_keys = renumber(user)
    order = sort_by_user_time(user_ids, ts)
    u, it, raw_user = user_ids[order], item_ids[order], user[order]
    n = u.size
    pos = np.arange(n, dtype=np.int64)
    new_user = np.ones(n, dtype=bool)
    new_user[1:] = u[1:] != u[:-1]
    user_start = np.maximum.accumulate(np.where(new_user, pos, 0))
    # Steps from the user's end: 0 = last rating (test), 1 = the one before (valid).
    ends = np.flatnonzero(np.append(new_user[1:], True))
    from_end = np.repeat(ends, np.diff(np.concatenate(([-1], ends)))) - pos
    dim = args.embedding_dim
    feats = [FeatureSpec("user_id", "sparse", table="user", num_embeddings=user_keys.size + 1,
                         embedding_dim=dim)]
    user_cols: Dict[str, np.ndarray] = {}
    if users_path:
        users = read_users(users_path)
        where, known = _lookup_table(users, raw_user)
        for k, field_name in enumerate(USER_FIELDS):
            values = np.array([users[int(x)][k] for x in known], dtype=object)
            vocab, codes = np.unique(values.astype(str), return_inverse=True)
            user_cols[field_name] = np.where(where >= 0, codes[np.maximum(where, 0)] + 1,
                                             0).astype(np.int64)
            feats.append(FeatureSpec(field_name, "sparse", num_embeddings=vocab.size + 1,
                                     embedding_dim=dim))
    feats.append(FeatureSpec("item_seq", "sequence", table="item",
                             num_embeddings=item_keys.size + 1, embedding_dim=dim,
                             max_len=args.history_len + 1))
    schema = Schema(features=feats, labels=[])
    for c0 in range(0, n, chunk):
        sl = slice(c0, min(n, c0 + chunk))
        # History (most recent history_len earlier ratings) then the positive itself.
        hist_len = np.minimum(pos[sl] - user_start[sl], args.history_len)
        lengths = hist_len + 1
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        idx = np.repeat(pos[sl] - hist_len - offsets[:-1], lengths) + np.arange(offsets[-1])
        cols: Dict[str, pa.Array] = {"user_id": single_id_column(u[sl])}
        for field_name, ids in user_cols.items():
            cols[field_name] = single_id_column(ids[sl])
        cols["item_seq"] = list_column(offsets, it[idx])
        table = pa.table(cols)
        fe = from_end[sl]
        writer.write("train", table.filter(pa.array(fe >= 2)))
        writer.write("valid", table.filter(pa.array(fe == 1)))
        writer.write("test", table.filter(pa.array(fe == 0)))
    facts: Dict[str, Any] = {
        "task": "retrieval", "num_items": int(item_keys.size), "num_users": int(user_keys.size),
        "eval_protocol": "leave-one-out: each user's last rating is the test positive, the one "
                         "before the valid positive; history items are excluded from rankings"}
    return schema, facts
