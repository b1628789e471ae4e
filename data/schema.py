"""Feature schema of a dataset directory: ``schema.json`` beside the parquet shards.

A schema lists every feature the model sees and the label(s):

* ``dense`` features are float32 columns; they form ``Batch.dense`` of shape ``[B, Dd]`` in
  schema order.
* ``sparse`` features are ``list<int64>`` columns of ids that are pooled (sum or mean) per
  row; they form the pooled ``KeyedJaggedTensor`` ``Batch.sparse`` (one key per feature).
* ``sequence`` features are ``list<int64>`` columns kept unpooled, truncated to the most
  recent ``max_len`` ids; they form ``Batch.sequence``. A sequence feature may name a
  ``timestamps`` column (``list<int64>``, same lengths) that becomes ``Batch.timestamps``.

Every sparse or sequence feature looks up an embedding ``table``; several features may share
one table (they must then agree on ``num_embeddings`` and ``embedding_dim``).

Example::

    schema = Schema(
        features=[
            FeatureSpec("d0", "dense"),
            FeatureSpec("user", "sparse", table="user", num_embeddings=1000, embedding_dim=16),
        ],
        labels=[LabelSpec("click")],
    )
    schema.save("datasets/x")          # writes datasets/x/schema.json
    Schema.load("datasets/x").tables()  # {"user": TableSpec(...)}
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from data.io import write_json_atomic

FEATURE_KINDS = ("dense", "sparse", "sequence")
POOLINGS = ("sum", "mean")
# What the reader does with an id >= num_embeddings: fail (the default: such ids usually mean
# the schema and the data disagree), hash it into range (id % num_embeddings), or clamp it to
# the last row. Negative ids are always an error.
OUT_OF_RANGE = ("error", "hash", "clamp")
LABEL_KINDS = ("binary", "regression")
SCHEMA_FILE = "schema.json"
META_FILE = "meta.json"
SCHEMA_VERSION = 1

# torchrec keeps tables in nn.ModuleDicts: a table named like a ModuleDict attribute
# (``items``, ``keys``, ...) silently breaks EmbeddingBagCollection / EmbeddingCollection.
RESERVED_NAMES = frozenset(
    {"items", "keys", "values", "update", "pop", "clear", "get", "copy", "fromkeys",
     "setdefault", "popitem", "type", "to", "forward", "training", "state_dict"}
)
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SchemaError(ValueError):
    """A schema that is malformed or inconsistent; the message names the offending entry."""


@dataclass
class FeatureSpec:
    """One input feature.

    Args:
        name: column name in the parquet files and key in the KJT.
        kind: ``dense`` | ``sparse`` | ``sequence``.
        table: embedding table looked up by a sparse/sequence feature (default: its name).
        num_embeddings: rows of that table; ids must lie in ``[0, num_embeddings)``.
        embedding_dim: columns of that table.
        pooling: ``sum`` | ``mean`` for sparse features.
        max_len: sequence features keep only their most recent ``max_len`` ids.
        timestamps: for sequence features, the ``list<int64>`` column of event times.
        out_of_range: ids ``>= num_embeddings``: ``error`` (default) | ``hash`` (modulo) |
            ``clamp`` (to ``num_embeddings - 1``).
    """

    name: str
    kind: str
    table: Optional[str] = None
    num_embeddings: int = 0
    embedding_dim: int = 0
    pooling: str = "sum"
    max_len: int = 0
    timestamps: Optional[str] = None
    out_of_range: str = "error"

    def __post_init__(self) -> None:
        if self.kind != "dense" and self.table is None:
            self.table = self.name


@dataclass
class LabelSpec:
    """A target column: ``binary`` (float32 0/1) or ``regression`` (float32).

    A dataset may have several labels (multi-task data); ``Batch.labels`` is then
    ``[B, T]`` in schema order. ``eval_only`` marks a label that is read but never trained
    on by default — e.g. the synthetic data's counterfactual "would convert if clicked",
    which no real log observes but which measures a CVR model over all impressions.
    """

    name: str
    kind: str = "binary"
    eval_only: bool = False


@dataclass(frozen=True)
class TableSpec:
    """An embedding table derived from the features that look it up."""

    name: str
    num_embeddings: int
    embedding_dim: int
    features: tuple
    kind: str  # "sparse" (pooled, EmbeddingBagCollection) or "sequence" (EmbeddingCollection)
    pooling: str = "sum"


@dataclass
class Schema:
    """Features and labels of a dataset; see the module docstring."""

    features: List[FeatureSpec]
    labels: List[LabelSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    # -- views -------------------------------------------------------------------------
    def of_kind(self, kind: str) -> List[FeatureSpec]:
        return [f for f in self.features if f.kind == kind]

    @property
    def dense_features(self) -> List[FeatureSpec]:
        return self.of_kind("dense")

    @property
    def sparse_features(self) -> List[FeatureSpec]:
        return self.of_kind("sparse")

    @property
    def sequence_features(self) -> List[FeatureSpec]:
        return self.of_kind("sequence")

    @property
    def dense_dim(self) -> int:
        return len(self.dense_features)

    def feature(self, name: str) -> FeatureSpec:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"no feature {name!r}; features are {[f.name for f in self.features]}")

    def tables(self, kind: Optional[str] = None) -> Dict[str, TableSpec]:
        """Embedding tables in first-use order, optionally only ``sparse`` or ``sequence``."""
        grouped: Dict[str, List[FeatureSpec]] = {}
        for f in self.features:
            if f.kind == "dense" or (kind is not None and f.kind != kind):
                continue
            grouped.setdefault(f.table, []).append(f)  # type: ignore[arg-type]
        return {
            name: TableSpec(
                name=name,
                num_embeddings=fs[0].num_embeddings,
                embedding_dim=fs[0].embedding_dim,
                features=tuple(f.name for f in fs),
                kind=fs[0].kind,
                pooling=fs[0].pooling,
            )
            for name, fs in grouped.items()
        }

    def project(self, names: List[str]) -> "Schema":
        """The schema restricted to the named features and labels (column projection);
        a kept sequence feature keeps its timestamps column."""
        valid = [f.name for f in self.features] + [label.name for label in self.labels]
        unknown = [n for n in names if n not in valid]
        if unknown:
            raise SchemaError(f"unknown column(s) {unknown} in the projection; features and "
                              f"labels are {valid}")
        return Schema(features=[f for f in self.features if f.name in names],
                      labels=[label for label in self.labels if label.name in names])

    def columns(self) -> List[str]:
        """Every parquet column the schema reads (features, timestamps, labels)."""
        cols = [f.name for f in self.features]
        cols += [f.timestamps for f in self.sequence_features if f.timestamps]
        cols += [label.name for label in self.labels]
        return cols

    # -- validation --------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`SchemaError` naming the first inconsistent feature, table or label."""
        seen: Dict[str, str] = {}
        for i, f in enumerate(self.features):
            where = f"feature #{i} {f.name!r}"
            if not _NAME_RE.match(f.name or ""):
                raise SchemaError(f"{where}: name must be an identifier ([A-Za-z_][A-Za-z0-9_]*)")
            if f.name in seen:
                raise SchemaError(f"{where}: duplicate feature name (also feature {seen[f.name]})")
            seen[f.name] = str(i)
            if f.kind not in FEATURE_KINDS:
                raise SchemaError(f"{where}: kind {f.kind!r} is not one of {list(FEATURE_KINDS)}")
            if f.kind == "dense":
                continue
            if f.name in RESERVED_NAMES or f.table in RESERVED_NAMES:
                raise SchemaError(
                    f"{where}: name/table {f.table!r} clashes with an nn.ModuleDict attribute "
                    f"and breaks torchrec embedding modules; rename it (e.g. '{f.table}_id')"
                )
            if not _NAME_RE.match(f.table or ""):
                raise SchemaError(f"{where}: table name {f.table!r} must be an identifier")
            if f.num_embeddings <= 0:
                raise SchemaError(f"{where}: num_embeddings must be > 0, got {f.num_embeddings}")
            if f.embedding_dim <= 0:
                raise SchemaError(f"{where}: embedding_dim must be > 0, got {f.embedding_dim}")
            if f.out_of_range not in OUT_OF_RANGE:
                raise SchemaError(f"{where}: out_of_range {f.out_of_range!r} is not one of "
                                  f"{list(OUT_OF_RANGE)}")
            if f.kind == "sparse" and f.pooling not in POOLINGS:
                raise SchemaError(f"{where}: pooling {f.pooling!r} is not one of {list(POOLINGS)}")
            if f.kind == "sequence" and f.max_len <= 0:
                raise SchemaError(f"{where}: sequence features need max_len > 0, got {f.max_len}")
            if f.kind != "sequence" and f.timestamps:
                raise SchemaError(f"{where}: only sequence features may name a timestamps column")
        by_table: Dict[str, FeatureSpec] = {}
        for f in self.features:
            if f.kind == "dense":
                continue
            first = by_table.setdefault(f.table, f)  # type: ignore[arg-type]
            for attr in ("kind", "num_embeddings", "embedding_dim", "pooling"):
                if getattr(first, attr) != getattr(f, attr):
                    raise SchemaError(
                        f"features {first.name!r} and {f.name!r} share table {f.table!r} but "
                        f"disagree on {attr} ({getattr(first, attr)!r} vs {getattr(f, attr)!r})"
                    )
        for j, label in enumerate(self.labels):
            if label.kind not in LABEL_KINDS:
                raise SchemaError(
                    f"label #{j} {label.name!r}: kind {label.kind!r} is not one of {list(LABEL_KINDS)}"
                )
            if label.name in seen:
                raise SchemaError(f"label {label.name!r} has the same name as a feature")
            if any(other.name == label.name for other in self.labels[:j]):
                raise SchemaError(f"label #{j} {label.name!r}: duplicate label name")

    # -- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        feats = []
        for f in self.features:
            d = dataclasses.asdict(f)
            # Keep the JSON readable: drop fields that do not apply to this kind.
            if f.kind == "dense":
                d = {"name": f.name, "kind": "dense"}
            else:
                if f.kind == "sparse":
                    d.pop("max_len")
                    d.pop("timestamps")
                else:
                    d.pop("pooling")
                if f.out_of_range == "error":
                    d.pop("out_of_range")  # the default; keeps older schema files identical
            feats.append(d)
        return {
            "version": SCHEMA_VERSION,
            "features": feats,
            # ``eval_only`` is written only when set, so single-task schema files stay
            # byte-identical to the ones older code wrote (and reads).
            "labels": [{k: v for k, v in dataclasses.asdict(label).items()
                        if k != "eval_only" or v} for label in self.labels],
        }

    @classmethod
    def from_dict(cls, d: Dict[str, Any], source: str = "schema") -> "Schema":
        check_schema_types(d, source)
        try:
            feats = [FeatureSpec(**f) for f in d["features"]]
            labels = [LabelSpec(**label) for label in d.get("labels", [])]
        except (KeyError, TypeError) as e:
            raise SchemaError(f"{source}: malformed schema ({e}); expected keys 'features' "
                              f"(list of {{name, kind, table, ...}}) and 'labels'") from e
        try:
            return cls(features=feats, labels=labels)
        except SchemaError as e:
            raise SchemaError(f"{source}: {e}") from None

    def save(self, directory: str) -> str:
        path = os.path.join(directory, SCHEMA_FILE)
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def load(cls, directory: str) -> "Schema":
        path = os.path.join(directory, SCHEMA_FILE)
        if not os.path.exists(path):
            raise SchemaError(
                f"{path} not found: a dataset directory needs schema.json beside its parquet "
                f"files (create one with `python -m data.synth` or `python -m data.convert`)"
            )
        return cls.from_file(path)

    @classmethod
    def from_file(cls, path: str) -> "Schema":
        """A schema from a JSON file; malformed JSON or entries raise naming ``path``."""
        with open(path) as fh:
            try:
                d = json.load(fh)
            except json.JSONDecodeError as e:
                raise SchemaError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=path)


# JSON type of every schema entry key: a wrong type fails naming the file, entry and key
# instead of surfacing later as a bare TypeError in torchrec (e.g. num_embeddings "50").
_FEATURE_TYPES: Dict[str, Tuple[type, ...]] = {
    "name": (str,), "kind": (str,), "table": (str, type(None)), "num_embeddings": (int,),
    "embedding_dim": (int,), "pooling": (str,), "max_len": (int,),
    "timestamps": (str, type(None)), "out_of_range": (str,),
}
_LABEL_TYPES: Dict[str, Tuple[type, ...]] = {"name": (str,), "kind": (str,),
                                              "eval_only": (bool,)}
_TYPE_WORDS = {str: "a string", int: "an integer", bool: "true or false", type(None): "null",
               float: "a number", dict: "an object", list: "a list"}


def _json_type(v: Any) -> str:
    for t in (bool, int, float, str, dict, list):
        if isinstance(v, t):
            return f"{_TYPE_WORDS[t]} ({json.dumps(v)[:40]})"
    return "null" if v is None else type(v).__name__


def _check_entry(entry: Any, types: Dict[str, Tuple[type, ...]], where: str) -> None:
    if not isinstance(entry, dict):
        raise SchemaError(f"{where}: expected an object {{\"name\": ..., \"kind\": ...}}, got "
                          f"{_json_type(entry)}")
    for key, value in entry.items():
        if key not in types:
            raise SchemaError(f"{where}: unknown key {key!r}; valid keys: {', '.join(types)}")
        allowed = types[key]
        # bool is an int in Python; JSON true is never a count.
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            words = " or ".join(_TYPE_WORDS[t] for t in allowed)
            raise SchemaError(f"{where}: key {key!r} must be {words}, got {_json_type(value)}")


def check_schema_types(d: Any, source: str) -> None:
    """Raise :class:`SchemaError` naming ``source``, the entry and the key of the first value
    of the wrong JSON type in a schema dict."""
    if not isinstance(d, dict):
        raise SchemaError(f"{source}: expected a JSON object with 'features' and 'labels', got "
                          f"{_json_type(d)}")
    if not isinstance(d.get("features"), list):
        raise SchemaError(f"{source}: key 'features' must be a list of feature objects, got "
                          f"{_json_type(d.get('features'))}")
    if not isinstance(d.get("labels", []), list):
        raise SchemaError(f"{source}: key 'labels' must be a list of label objects, got "
                          f"{_json_type(d.get('labels'))}")
    def named(entry: Any, what: str) -> str:
        name = entry.get("name") if isinstance(entry, dict) else None
        return f"{source}: {what}" + (f" {name!r}" if isinstance(name, str) and name else "")

    for i, f in enumerate(d["features"]):
        _check_entry(f, _FEATURE_TYPES, named(f, f"feature #{i}"))
    for j, label in enumerate(d.get("labels", [])):
        _check_entry(label, _LABEL_TYPES, named(label, f"label #{j}"))


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def check_meta_types(meta: Any, path: str) -> None:
    """Type-check the ``meta.json`` keys the trainer reads (``rows``, ``oracle``, ``files``,
    ``preprocess``); other keys are free-form provenance."""
    if not isinstance(meta, dict):
        raise SchemaError(f"{path}: expected a JSON object, got {_json_type(meta)}")
    rows = meta.get("rows", {})
    if not isinstance(rows, dict):
        raise SchemaError(f"{path}: key 'rows' must be an object {{split: row count}}, got "
                          f"{_json_type(rows)}")
    for split, n in rows.items():
        if not _count(n):
            raise SchemaError(f"{path}: key 'rows.{split}' must be a non-negative integer, got "
                              f"{_json_type(n)}")
    oracle = meta.get("oracle", {})
    if not isinstance(oracle, dict):
        raise SchemaError(f"{path}: key 'oracle' must be an object {{metric: value}}, got "
                          f"{_json_type(oracle)}")
    for k, v in oracle.items():
        if isinstance(v, bool) or not isinstance(v, (int, float, dict, type(None))):
            raise SchemaError(f"{path}: key 'oracle.{k}' must be a number, got {_json_type(v)}")
    files = meta.get("files", {})
    if not isinstance(files, dict) or not all(
            isinstance(v, list) and all(isinstance(x, str) for x in v) for v in files.values()):
        raise SchemaError(f"{path}: key 'files' must be an object {{split: [file, ...]}}, got "
                          f"{_json_type(files)}")
    if not isinstance(meta.get("preprocess", {}), dict):
        raise SchemaError(f"{path}: key 'preprocess' must be an object, got "
                          f"{_json_type(meta.get('preprocess'))}")


def load_meta(directory: str) -> Dict[str, Any]:
    """``meta.json`` of a dataset directory ({} when absent); malformed JSON or a key of the
    wrong type raises :class:`SchemaError` naming the file and the key."""
    path = os.path.join(directory, META_FILE)
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SchemaError(f"{path}: not valid JSON ({e}); re-create the dataset or restore "
                          f"meta.json") from None
    check_meta_types(meta, path)
    return meta


def load_schema(path: str) -> Schema:
    """A schema from a dataset directory (its ``schema.json``) or from a schema JSON file,
    e.g. ``launch/configs/criteo_kaggle_schema.json`` for planning a model without its data."""
    if os.path.isdir(path):
        return Schema.load(path)
    if not os.path.exists(path):
        raise SchemaError(f"{path} not found: expected a dataset directory or a schema JSON "
                          f"file (config key data.schema or data.path)")
    return Schema.from_file(path)
