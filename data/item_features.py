"""Per-item categorical features of a retrieval dataset: the item → features lookup that an
item tower (``two_tower``, ``mind``: ``model.args.item_features``) reads for every item,
including items that no row mentions (the cold tail, and the full-corpus item matrix).

File: ``item_features.parquet`` at the dataset root (beside ``schema.json``), written by
``data.synth retrieval`` and ``data.convert movielens --task retrieval`` (with a movies
file). One row per item id ``0..N-1`` (``N`` = the item table's ``num_embeddings``; row 0 is
the padding id), column ``item_id`` (int64) and one ``list<int64>`` column per feature: the
item's ids in that feature's vocabulary ``1..rows-1`` (0 is never written; an item may have
none, one — ``category`` — or several — ``genres``). The parquet key-value metadata
``shardrec.item_features`` holds ``{"rows": {feature: rows}}``: the vocabulary size, the
embedding table's ``num_embeddings``.

In memory (:class:`ItemFeatures`): per feature a padded ``[N, G]`` int64 array, ``G`` the most
ids any item has, unused slots 0 (the item tower averages the slots whose id is > 0).

Example::

    feats = ItemFeatures({"category": np.array([[0], [3], [1]])}, {"category": 5})
    feats.save("datasets/x")
    ItemFeatures.load("datasets/x").tables["category"].shape   # (3, 1)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.io import atomic_path

ITEM_FEATURES_FILE = "item_features.parquet"
_META_KEY = b"shardrec.item_features"


class ItemFeaturesError(ValueError):
    """A missing or malformed item features file; the message names the file and the fix."""


@dataclass
class ItemFeatures:
    """``tables[f]``: ``[N, G_f]`` int64 ids (0 = empty slot); ``rows[f]``: vocabulary size
    (ids lie in ``[0, rows[f])``)."""

    tables: Dict[str, np.ndarray]
    rows: Dict[str, int]

    def __post_init__(self) -> None:
        sizes = {t.shape[0] for t in self.tables.values()}
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
        return list(self.tables)

    @property
    def num_items(self) -> int:
        return next(iter(self.tables.values())).shape[0] if self.tables else 0

    @staticmethod
    def from_lists(per_item: Dict[str, List[List[int]]], rows: Dict[str, int]
                   ) -> "ItemFeatures":
        """From ``per_item[f][j]`` = item ``j``'s ids (ragged lists)."""
        tables = {}
        for name, lists in per_item.items():
            width = max([len(x) for x in lists] + [1])
            t = np.zeros((len(lists), width), dtype=np.int64)
            for j, ids in enumerate(lists):
                t[j, :len(ids)] = ids
            tables[name] = t
        return ItemFeatures(tables, dict(rows))

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
        table = pa.table(cols).replace_schema_metadata(
            {_META_KEY: json.dumps({"rows": self.rows}).encode()})
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
        return ItemFeatures.from_lists(per_item, rows)
