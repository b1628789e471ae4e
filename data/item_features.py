"""Per-item categorical features of a retrieval dataset: the item → features lookup that an
item tower (``two_tower``, ``mind``: ``model.args.item_features``) reads for every item,
including items that no row mentions (the cold tail, and the full-corpus item matrix).

File: ``item_features.parquet`` at the dataset root (beside ``schema.json``), written by
``data.synth retrieval`` and ``data.convert movielens --task retrieval`` (with a movies
file). One row per item id ``0..N-1`` (``N`` = the item table's ``num_embeddings``; row 0 is
the padding id), column ``item_id`` (int64), one ``list<int64>`` column per categorical
feature: the item's ids in that feature's vocabulary ``1..rows-1`` (0 is never written; an
item may have none, one — ``category`` — or several — ``genres``), and one float column per
numeric (dense) feature (a price, a release year, a log popularity: finite, one value per
item). The parquet key-value metadata ``shardrec.item_features`` holds ``{"rows": {feature:
rows}, "dense": [feature, ...]}``: each categorical feature's vocabulary size (the embedding
table's ``num_embeddings``) and the numeric features' names.

In memory (:class:`ItemFeatures`): per categorical feature a padded ``[N, G]`` int64 array,
``G`` the most ids any item has, unused slots 0 (the item tower averages the slots whose id is
> 0); per numeric feature an ``[N]`` float32 array (raw values; the item tower standardises
them).

Example::

    feats = ItemFeatures({"category": np.array([[0], [3], [1]])}, {"category": 5})
    feats.save("datasets/x")
    ItemFeatures.load("datasets/x").tables["category"].shape   # (3, 1)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.io import atomic_path
from data.reader import DataError

ITEM_FEATURES_FILE = "item_features.parquet"
_META_KEY = b"shardrec.item_features"


class ItemFeaturesError(DataError):
    """A missing or malformed item features file; the message names the file and the fix."""


@dataclass
class ItemFeatures:
    """``tables[f]``: ``[N, G_f]`` int64 ids (0 = empty slot); ``rows[f]``: vocabulary size
    (ids lie in ``[0, rows[f])``); ``dense[f]``: ``[N]`` float32 values of numeric feature f."""

    tables: Dict[str, np.ndarray]
    rows: Dict[str, int]
    dense: Dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.dense = {n: np.asarray(v, dtype=np.float32) for n, v in self.dense.items()}
        for name, v in self.dense.items():
            if v.ndim != 1 or name in self.tables:
                raise ItemFeaturesError(f"numeric item feature {name!r}: need one value per "
                                        f"item and a name no categorical feature has")
            bad = np.flatnonzero(~np.isfinite(v))
            if bad.size:
                raise ItemFeaturesError(f"numeric item feature {name!r}: item {int(bad[0])} "
                                        f"has {v[bad[0]]} ({bad.size} non-finite values); "
                                        f"fill them (e.g. with the column's median)")
        sizes = {t.shape[0] for t in self.tables.values()} | {
            v.shape[0] for v in self.dense.values()}
        if len(sizes) > 1:
            raise ItemFeaturesError(f"item feature tables disagree on the item count: {sizes}")
        for name, t in self.tables.items():
            if t.ndim != 2 or name not in self.rows:
                raise ItemFeaturesError(f"item feature {name!r}: need an [N, G] array and a "
                                        f"vocabulary size")
            if t.size and (t.min() < 0 or t.max() >= self.rows[name]):
                raise ItemFeaturesError(f"item feature {name!r}: ids outside [0, "
                                        f"{self.rows[name]})")

    @property
    def names(self) -> List[str]:
        """The categorical features."""
        return list(self.tables)

    @property
    def dense_names(self) -> List[str]:
        """The numeric features."""
        return list(self.dense)

    @property
    def num_items(self) -> int:
        for t in (*self.tables.values(), *self.dense.values()):
            return int(t.shape[0])
        return 0

    @staticmethod
    def from_lists(per_item: Dict[str, List[List[int]]], rows: Dict[str, int],
                   dense: Optional[Dict[str, np.ndarray]] = None) -> "ItemFeatures":
        """From ``per_item[f][j]`` = item ``j``'s ids (ragged lists) and the numeric
        features' ``[N]`` values."""
        tables = {}
        for name, lists in per_item.items():
            width = max([len(x) for x in lists] + [1])
            t = np.zeros((len(lists), width), dtype=np.int64)
            for j, ids in enumerate(lists):
                t[j, :len(ids)] = ids
            tables[name] = t
        return ItemFeatures(tables, dict(rows), dict(dense or {}))

    def save(self, directory: str) -> str:
        """Write ``directory/item_features.parquet`` (temp file, then rename)."""
        cols: Dict[str, pa.Array] = {"item_id": pa.array(np.arange(self.num_items,
                                                                     dtype=np.int64))}
        for name, t in self.tables.items():
            lengths = (t > 0).sum(1)
            # Slots are filled from the left (from_lists, the generators), so the ids of item
            # j are t[j, :lengths[j]].
            offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
            cols[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(t[t > 0]))
        for name, v in self.dense.items():
            cols[name] = pa.array(v)
        table = pa.table(cols).replace_schema_metadata(
            {_META_KEY: json.dumps({"rows": self.rows, "dense": self.dense_names}).encode()})
        path = os.path.join(directory, ITEM_FEATURES_FILE)
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        return path

    @staticmethod
    def load(directory: str, required: bool = True) -> Optional["ItemFeatures"]:
        """Read ``directory/item_features.parquet`` (None when absent and not ``required``)."""
        path = os.path.join(directory, ITEM_FEATURES_FILE)
        if not os.path.exists(path):
            if not required:
                return None
            raise ItemFeaturesError(
                f"{path} does not exist: model.args.item_features needs the dataset's item "
                f"feature table (written by `python -m data.synth retrieval` and by `python -m "
                f"data.convert movielens --task retrieval` given a movies file); or leave "
                f"model.args.item_features empty")
        try:
            table = pq.read_table(path)
            meta = json.loads((table.schema.metadata or {})[_META_KEY])
            rows = {str(k): int(v) for k, v in meta["rows"].items()}
            dense_names = [str(n) for n in meta.get("dense", [])]
        except (KeyError, ValueError, pa.ArrowException) as e:
            raise ItemFeaturesError(f"{path}: not an item features file ({e}); regenerate "
                                    f"the dataset") from None
        ids = np.asarray(table.column("item_id").to_numpy(), dtype=np.int64)
        if not np.array_equal(ids, np.arange(ids.size)):
            raise ItemFeaturesError(f"{path}: column item_id must be 0..N-1 in order")
        per_item = {}
        for name in rows:
            if name not in table.column_names:
                raise ItemFeaturesError(f"{path}: metadata names feature {name!r}, which has "
                                        f"no column")
            per_item[name] = table.column(name).to_pylist()
        dense = {}
        for name in dense_names:
            if name not in table.column_names:
                raise ItemFeaturesError(f"{path}: metadata names numeric feature {name!r}, "
                                        f"which has no column")
            col = table.column(name)
            if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)):
                raise ItemFeaturesError(f"{path}: numeric feature column {name!r} has type "
                                        f"{col.type}; write one number per item")
            if col.null_count:
                first = int(np.flatnonzero(np.asarray(col.is_null()))[0])
                raise ItemFeaturesError(f"{path}: numeric feature column {name!r} is empty at "
                                        f"item {first} ({col.null_count} empty); fill every "
                                        f"item (e.g. with the column's median)")
            dense[name] = np.asarray(col.to_numpy(), dtype=np.float32)
        try:
            return ItemFeatures.from_lists(per_item, rows, dense)
        except ItemFeaturesError as e:
            raise ItemFeaturesError(f"{path}: {e}") from None
