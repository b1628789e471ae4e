"""Score a parquet dataset with an exported model, in one process, without torchrec.distributed.

``python -m trainer.predict --model EXPORT_DIR --data DATASET_DIR [--split eval]
[--out scores.parquet] [--batch-size 4096]``

Every row of the split is scored exactly once (``sample_id``, ``score`` = sigmoid(logit),
and the label when the dataset has one); with labels, the AUC and log-loss are printed as
``final auc=... logloss=... rows=...``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from data.reader import ParquetReader
from data.schema import Schema
from data.synth import log_loss, roc_auc
from models import get_model_spec
from models.blocks import CTRTask
from trainer.config import load_config
from trainer.export import MODEL_FILE


def load_exported(model_dir: str) -> tuple:
    """(unsharded task model with the exported weights, schema) from an export directory."""
    cfg = load_config(os.path.join(model_dir, "config.toml"))
    schema = Schema.load(model_dir)
    spec = get_model_spec(cfg.model.name)
    model = CTRTask(spec.build(schema, spec.make_args(cfg.model.flavour, cfg.model.args), "cpu"))
    weights = torch.load(os.path.join(model_dir, MODEL_FILE), weights_only=True)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{os.path.join(model_dir, MODEL_FILE)} does not fit model "
                         f"{cfg.model.name!r}: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    return model.eval(), schema


@torch.no_grad()
def predict(model_dir: str, data: str, split: str = "eval",
            batch_size: int = 4096) -> Dict[str, np.ndarray]:
    """Scores of every row of ``data/split``: ``sample_id``, ``score`` (and ``label``)."""
    model, schema = load_exported(model_dir)
    # remainder="pad" wraps the last batch around to the first rows; the duplicates are
    # dropped below so every row is scored exactly once.
    reader = ParquetReader(data, split, batch_size, prefetch=2, schema=schema, remainder="pad")
    ids, scores, labels = [], [], []
    for batch in reader:
        _, (_, logits, y) = model(batch)
        ids.append(batch.sample_ids.numpy())
        scores.append(torch.sigmoid(logits).numpy())
        labels.append(y.numpy())
    all_ids = np.concatenate(ids)
    _, first = np.unique(all_ids, return_index=True)
    out = {"sample_id": all_ids[first], "score": np.concatenate(scores)[first]}
    if schema.labels:
        out["label"] = np.concatenate(labels)[first]
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="directory written by python -m trainer.export")
    p.add_argument("--data", required=True, help="dataset directory to score")
    p.add_argument("--split", default="eval", help="subdirectory of parquet files (default eval)")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--out", default=None, help="write sample_id, score, label as parquet")
    ns = p.parse_args(argv)
    res = predict(ns.model, ns.data, ns.split, ns.batch_size)
    if ns.out:
        tmp = f"{ns.out}.tmp-{os.getpid()}"
        pq.write_table(pa.table(res), tmp)
        os.replace(tmp, ns.out)
    if "label" in res:
        print(f"final auc={roc_auc(res['score'], res['label']):.6g} "
              f"logloss={log_loss(res['score'], res['label']):.6g} rows={len(res['score'])}")
    else:
        print(f"final rows={len(res['score'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
