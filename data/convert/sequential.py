"""Interactions → one row per user (time-ordered sequences) with a leave-one-out split.

Input: flat numpy arrays of interactions (``user``, ``item`` raw int64 keys, ``ts`` int64,
optional ``action`` int64), in any order. Users and items are renumbered densely in the order
of their raw keys: items get ids ``1..N`` (0 is padding), users ``1..U``.

Output rows (both splits have the same columns):

* ``user_id``: ``list<int64>`` with one id (sparse, table ``user``);
* ``item_seq``: the user's items oldest → newest (sequence, table ``item``, timestamps
  column ``item_ts``);
* ``action_seq``: the matching action ids (e.g. ratings), when given (sequence, ``action``).

Leave-one-out with a validation item: the ``test`` row of a user holds the whole sequence,
whose last item is the held-out target (the model sees the items before it); the ``valid``
row stops one item earlier (its target is the second-to-last item); the ``train`` row stops
before both (each position predicts the next item; users with fewer than 3 interactions have
no train row). Users with fewer than ``min_interactions`` interactions are dropped. Ties in
time keep their input order.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np
import pyarrow as pa

from data.convert.common import (ConvertError, DatasetWriter, check_embedding_dim, list_column,
                                 single_id_column)
from data.schema import FeatureSpec, Schema


def renumber(keys: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(dense ids 1..K in key order [N], sorted unique keys [K])."""
    uniq, inverse = np.unique(keys, return_inverse=True)
    return inverse.astype(np.int64) + 1, uniq


def sort_by_user_time(user: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Permutation ordering interactions by (user, ts), ties in input order (stable)."""
    return np.lexsort((np.arange(user.size), ts, user))


def sequence_schema(num_items: int, num_users: int, num_actions: int, max_len: int,
                    embedding_dim: int) -> Schema:
    feats = [
        FeatureSpec("user_id", "sparse", table="user", num_embeddings=num_users + 1,
                    embedding_dim=embedding_dim),
        FeatureSpec("item_seq", "sequence", table="item", num_embeddings=num_items + 1,
                    embedding_dim=embedding_dim, max_len=max_len, timestamps="item_ts"),
    ]
    if num_actions:
        feats.append(FeatureSpec("action_seq", "sequence", table="action",
                                 num_embeddings=num_actions, embedding_dim=embedding_dim,
                                 max_len=max_len))
    return Schema(features=feats, labels=[])


def write_sequences(writer: DatasetWriter, user: np.ndarray, item: np.ndarray, ts: np.ndarray,
                    action: Optional[np.ndarray], max_len: int, embedding_dim: int,
                    min_interactions: int = 2, users_per_chunk: int = 65_536
                    ) -> Tuple[Schema, Dict[str, Any]]:
    """Write train/eval user rows to ``writer``; returns the schema and meta facts."""
    check_embedding_dim(embedding_dim)
    if user.size == 0:
        raise ConvertError("no interactions in the inputs")
    if min_interactions < 2:
        raise ConvertError("--min-interactions must be >= 2 for a leave-one-out split")
    item_ids, item_keys = renumber(item)
    user_ids, user_keys = renumber(user)
    order = sort_by_user_time(user_ids, ts)
    u, it, t = user_ids[order], item_ids[order], ts[order]
    act = action[order] if action is not None else None
    counts = np.bincount(u, minlength=user_keys.size + 1)[1:]
    ends = np.cumsum(counts)
    starts = ends - counts
    kept_users = np.flatnonzero(counts >= min_interactions)
    if kept_users.size == 0:
        raise ConvertError(f"no user has >= {min_interactions} interactions")
    for c0 in range(0, kept_users.size, users_per_chunk):
        chunk = kept_users[c0:c0 + users_per_chunk]
        s, n = starts[chunk], counts[chunk]
        for split, lengths in (("train", n - 2), ("valid", n - 1), ("test", n)):
            # A train row of one item predicts nothing: such users only evaluate.
            keep = lengths >= (2 if split == "train" else 1)
            if not keep.any():
                continue
            chunk_s, s_k, lengths = chunk[keep], s[keep], lengths[keep]
            offsets = np.concatenate(([0], np.cumsum(lengths)))
            idx = np.repeat(s_k - offsets[:-1], lengths) + np.arange(offsets[-1])
            cols: Dict[str, pa.Array] = {
                "user_id": single_id_column(chunk_s.astype(np.int64) + 1),
                "item_seq": list_column(offsets, it[idx]),
                "item_ts": list_column(offsets, t[idx]),
            }
            if act is not None:
                cols["action_seq"] = list_column(offsets, act[idx])
            writer.write(split, pa.table(cols))
    num_actions = int(act.max()) + 1 if act is not None else 0
    schema = sequence_schema(item_keys.size, user_keys.size, num_actions, max_len, embedding_dim)
    facts = {
        "task": "sequential",
        "num_items": int(item_keys.size),
        "num_users": int(user_keys.size),
        "users_kept": int(kept_users.size),
        "interactions": int(user.size),
        "eval_protocol": "leave-one-out: the test row of a user is its full sequence and its "
                         "last item is the target; the valid row's target is the "
                         "second-to-last item; the train row stops before both",
    }
    return schema, facts
