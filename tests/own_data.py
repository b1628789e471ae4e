"""A user's own CSV for the end-to-end tests: 2,000 rows with a binary label, 3 numeric
columns (one raw age 18-70), 4 categorical strings, one ``|``-separated list, a request id
and a time column; the click logit is planted in age, city and the tags so a model must beat
chance by a margin."""

from __future__ import annotations

import json
from typing import Any, Dict

import numpy as np

CITIES = [f"city_{i}" for i in range(30)]
DEVICES = ["ios", "android", "web"]
TAGS = [f"t{i}" for i in range(12)]


def write_mixed_csv(path: str, rows: int = 2000, seed: int = 0, labelled: bool = True,
                    id_offset: int = 0) -> None:
    rng = np.random.default_rng(seed)
    age = rng.integers(18, 71, rows)
    price = np.round(rng.lognormal(3.0, 1.0, rows), 2)
    score = np.round(rng.normal(0.0, 1.0, rows), 3)
    city = rng.integers(0, len(CITIES), rows)
    device = rng.integers(0, len(DEVICES), rows)
    site = rng.integers(0, 500, rows)
    brand = rng.integers(0, 8, rows)
    city_w = np.random.default_rng(99).normal(0, 1.2, len(CITIES))
    tag_w = np.random.default_rng(98).normal(0, 0.8, len(TAGS))
    logit = 0.06 * (age - 44) + city_w[city] - 0.3
    lines = []
    header = (["click"] if labelled else []) + ["req_id", "ts", "age", "price", "score",
                                                "city", "device", "site", "brand", "tags"]
    lines.append(",".join(header))
    for i in range(rows):
        k = int(rng.integers(0, 4))
        tags = rng.choice(len(TAGS), k, replace=False)
        lg = logit[i] + tag_w[tags].sum()
        y = int(rng.random() < 1 / (1 + np.exp(-lg)))
        cells = ([str(y)] if labelled else []) + [
            f"r{id_offset + i:06d}", str(1_700_000_000 + 60 * i), str(age[i]),
            "" if i % 50 == 0 else str(price[i]), str(score[i]), CITIES[city[i]],
            DEVICES[device[i]], f"site{site[i]}.com", f"b{brand[i]}",
            "|".join(TAGS[t] for t in tags)]
        lines.append(",".join(cells))
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def mixed_spec(**extra: Any) -> Dict[str, Any]:
    """The spec a new user writes for :func:`write_mixed_csv` (the docs' template)."""
    return {
        "label": {"column": "click"},
        "dense": [{"column": "age", "transform": "standardize"},
                  {"column": "price", "transform": ["log1p", "standardize"]},
                  {"column": "score", "transform": ["clip", "standardize"], "min": -3, "max": 3},
                  {"column": "age", "name": "age_bucket", "transform": "bucketize",
                   "buckets": 8}],
        "categorical": [{"column": "city", "min_count": 5},
                        {"column": "device", "num_embeddings": 8},
                        {"column": "site", "num_embeddings": 1000},
                        {"column": "brand", "min_count": 1},
                        {"column": "tags", "separator": "|", "num_embeddings": 64}],
        "passthrough": ["req_id"],
        **extra,
    }


def write_spec(path: str, **extra: Any) -> None:
    with open(path, "w") as fh:
        json.dump(mixed_spec(**extra), fh, indent=2)
