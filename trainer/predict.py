"""Score rows with an exported model, in one process, without torchrec.distributed.

Inference packages (``python -m trainer.export``'s default format): ``python -m
trainer.predict --package DIR --input rows.csv|.tsv|.parquet --out preds.parquet
[--top-k K --search exact|ann] [--passthrough COL ...] [--chunk-rows N]`` scores raw rows
through the stored preprocessing in bounded memory (see :mod:`trainer.batch_score`).

Weights exports (``--format weights``): ``python -m trainer.predict --model EXPORT_DIR
--data DATASET_DIR [--split test] [--out scores.parquet] [--batch-size 4096]``

Every row of the split is scored exactly once. CTR models (task kind ``ctr``): columns
``sample_id``, ``score`` = sigmoid(logit) and ``label`` when the dataset has one; with labels
the AUC and log-loss are printed as ``final auc=... logloss=... rows=...``.

Multi-task heads (task kind ``multitask``): one column per prediction, ``score_<name>``
(sigmoid(logit) for a binary prediction, the value for a regression one; names as in the
training ``final`` line: ``click``, ``conversion``, ESMM's ``ctr`` / ``cvr`` ...), and
``label_<label>`` per dataset label. With labels, each prediction is evaluated as the trainer
evaluates it (against its evaluation label, over its evaluation rows) and printed as
``final auc_<name>=... logloss_<name>=... [mse_<name>=...] rows=...``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from data.cli import ArgumentParser
from data.io import atomic_path
from data.metrics import log_loss, roc_auc
from data.reader import ParquetReader, split_files
from data.schema import Schema, load_meta
from models import get_model_spec
from trainer.tasks.ctr import CTRTrain
from models.multitask.common import Prediction
from trainer.tasks.multitask import MultiTaskTrain
from trainer.export import MODEL_FILE
from trainer.validation import load_checked_config

#: Task kinds this module scores, and the wrapper whose state-dict keys the export holds
#: (the trainer checkpoints the model inside its task wrapper: ``model.<param>``).
WRAPPERS = {"ctr": CTRTrain, "multitask": MultiTaskTrain}


def load_exported(model_dir: str) -> Tuple[nn.Module, Schema]:
    """(unsharded task model with the exported weights, schema) from an export directory;
    the task model is a :class:`CTRTrain` or a :class:`MultiTaskTrain`."""
    cfg = load_checked_config(os.path.join(model_dir, "config.toml"))
    schema = Schema.load(model_dir)
    spec = get_model_spec(cfg.model.name)
    if spec.task not in WRAPPERS:
        raise ValueError(f"model {cfg.model.name!r} is of task kind {spec.task!r}; "
                         f"trainer.predict scores task kinds {sorted(WRAPPERS)}")
    model = WRAPPERS[spec.task](spec.build(schema, spec.make_args(cfg.model.flavour,
                                                                  cfg.model.args), "cpu"))
    if not os.path.isfile(os.path.join(model_dir, MODEL_FILE)):
        raise FileNotFoundError(
            f"{model_dir}: no {MODEL_FILE}, so not a weights export; write one with "
            f"`python -m trainer.export --format weights` (an inference package, the export's "
            f"default format, is scored with `trainer.predict --package {model_dir}`)")
    weights = torch.load(os.path.join(model_dir, MODEL_FILE), weights_only=True)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{os.path.join(model_dir, MODEL_FILE)} does not fit model "
                         f"{cfg.model.name!r}: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    return model.eval(), schema


def predict(model_dir: str, data: str, split: str = "eval",
            batch_size: int = 4096) -> Dict[str, np.ndarray]:
    """Scores of every row of ``data/split`` by the exported model in ``model_dir`` (see
    :func:`score`)."""
    model, schema = load_exported(model_dir)
    return score(model, schema, data, split, batch_size)


@torch.no_grad()
def score(model: nn.Module, schema: Schema, data: str, split: str = "eval",
          batch_size: int = 4096) -> Dict[str, np.ndarray]:
    """Scores of every row of ``data/split``, one array per output column (see the module
    docstring): ``sample_id`` ``[N]`` plus ``score`` / ``label`` ``[N]`` (CTR) or
    ``score_<prediction>`` / ``label_<label>`` ``[N]`` each (multi-task).

    Args:
        model: a task model from :func:`load_exported`, in eval mode.
        schema: the schema it was trained on.
    """
    multitask = isinstance(model, MultiTaskTrain)
    # Rows converted for scoring only (``data.convert csv --no-label``) have no label column.
    labelled = bool(schema.labels) and bool(Schema.load(data).labels)
    if not labelled:
        schema = schema.project([f.name for f in schema.features])
    # remainder="pad" wraps the last batch around to the first rows; the duplicates are
    # dropped below so every row is scored exactly once.
    reader = ParquetReader(data, split, batch_size, prefetch=2, schema=schema, remainder="pad")
    ids, scores, labels = [], [], []
    for batch in reader:
        if not multitask and not labelled:
            logits = model.model(batch)
            scores.append(torch.sigmoid(logits).numpy())
            y = torch.zeros(logits.shape[0])
        elif multitask:
            # The head alone (scoring needs no loss): logits [B, P] → per column sigmoid
            # (binary) or the value (regression).
            logits = model.model(batch)
            y = batch.labels.reshape(logits.shape[0], len(schema.labels))  # [B, T], T >= 0
            binary = torch.tensor([p.kind == "binary" for p in model.predictions])
            scores.append(torch.where(binary, torch.sigmoid(logits), logits).numpy())
        else:
            _, (_, logits, y) = model(batch)
            scores.append(torch.sigmoid(logits).numpy())
        ids.append(batch.sample_ids.numpy())
        labels.append(y.numpy())
    all_ids = np.concatenate(ids)
    _, first = np.unique(all_ids, return_index=True)
    score_rows, label_rows = np.concatenate(scores)[first], np.concatenate(labels)[first]
    out = {"sample_id": all_ids[first]}
    out.update(passthrough_columns(data, split, out["sample_id"]))
    if not multitask:
        out["score"] = score_rows
        if labelled:
            out["label"] = label_rows
        return out
    for k, p in enumerate(model.predictions):
        out[f"score_{p.name}"] = score_rows[:, k]
    for j, lab in enumerate(schema.labels):
        out[f"label_{lab.name}"] = label_rows[:, j]
    return out


def passthrough_columns(data: str, split: str, sample_ids: np.ndarray
                        ) -> Dict[str, np.ndarray]:
    """The dataset's passthrough columns (``meta.json["preprocess"]["passthrough"]``, e.g.
    request ids) of the rows ``sample_ids`` — the row numbers of the split's files read in
    order, as the reader numbers them."""
    names = load_meta(data).get("preprocess", {}).get("passthrough", [])
    if not names:
        return {}
    table = pa.concat_tables([pq.read_table(f, columns=names)
                              for f in split_files(data, split)])
    return {n: table.column(n).to_numpy(zero_copy_only=False)[sample_ids] for n in names}


def evaluate(scores: Dict[str, np.ndarray], predictions: Optional[List[Prediction]],
             schema: Schema) -> Dict[str, float]:
    """The metrics of :func:`predict`'s columns: ``auc`` and ``logloss`` (CTR,
    ``predictions=None``), or per prediction ``auc_<name>`` and ``logloss_<name>`` (binary)
    or ``mse_<name>`` (regression) against its evaluation label over its evaluation rows, as
    the trainer's ``final`` line computes them. Empty without labels."""
    if predictions is None:
        if "label" not in scores:
            return {}
        return {"auc": roc_auc(scores["score"], scores["label"]),
                "logloss": log_loss(scores["score"], scores["label"])}
    out: Dict[str, float] = {}
    if not schema.labels:
        return out
    names = [lab.name for lab in schema.labels]
    for p in predictions:
        s, y = scores[f"score_{p.name}"], scores[f"label_{names[p.eval_label]}"]
        if p.eval_given >= 0:
            keep = scores[f"label_{names[p.eval_given]}"] == 1
            s, y = s[keep], y[keep]
        if p.kind == "binary":
            out[f"auc_{p.name}"] = roc_auc(s, y)
            out[f"logloss_{p.name}"] = log_loss(s, y)
        else:
            out[f"mse_{p.name}"] = float(np.mean((s.astype(np.float64) - y) ** 2))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = ArgumentParser(prog="python -m trainer.predict", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="weights export (trainer.export --format weights)")
    p.add_argument("--data", help="dataset directory to score with --model")
    p.add_argument("--package", help="inference package (trainer.export's default format)")
    p.add_argument("--input", help="raw rows to score with --package: CSV, TSV or parquet")
    p.add_argument("--chunk-rows", type=int, default=65_536,
                   help="rows per chunk (bounds memory) with --package")
    p.add_argument("--passthrough", action="append", default=[], metavar="COL",
                   help="input column copied to the output (default: the preprocessing's)")
    p.add_argument("--top-k", type=int, default=0, help="sequential packages: items per row")
    p.add_argument("--search", choices=("exact", "ann"), default="exact",
                   help="top-K by blocked exact matmul or through the package's FAISS index")
    p.add_argument("--index-param", action="append", default=[], metavar="NAME=INT",
                   help="query-time index parameter: nprobe (ivf_flat), efSearch (hnsw)")
    p.add_argument("--split", default="test",
                   help="subdirectory of parquet files (default test; eval in older datasets)")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--out", default=None,
                   help="write the score and label columns (and sample_id) as parquet")
    ns = p.parse_args(argv)
    if ns.package:
        return _predict_package(ns)
    if not (ns.model and ns.data):
        p.error("pass --package DIR --input FILE, or --model EXPORT_DIR --data DATASET_DIR")
    try:
        model, schema = load_exported(ns.model)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    split = ns.split
    if split == "test" and not os.path.isdir(os.path.join(ns.data, "test")) and \
            os.path.isdir(os.path.join(ns.data, "eval")):
        split = "eval"  # an older train/eval dataset
    res = score(model, schema, ns.data, split, ns.batch_size)
    if ns.out:
        with atomic_path(ns.out) as tmp:
            pq.write_table(pa.table(res), tmp)
    predictions = model.predictions if isinstance(model, MultiTaskTrain) else None
    metrics = evaluate(res, predictions, schema)
    rows = len(res["sample_id"])
    print("final " + " ".join([f"{k}={v:.6g}" for k, v in metrics.items()] + [f"rows={rows}"]))
    return 0


def _predict_package(ns: argparse.Namespace) -> int:
    from trainer.batch_score import score_file
    from trainer.export import _params
    from trainer.package import PackageError, load_package
    from trainer.topk import set_search_params

    if not (ns.input and ns.out):
        print("error: --package needs --input FILE and --out FILE", file=sys.stderr)
        return 2
    try:
        pkg = load_package(ns.package, load_index=ns.search == "ann")
        if pkg.index is not None and ns.index_param:
            set_search_params(pkg.index, _params(ns.index_param))
        res = score_file(pkg, ns.input, ns.out, ns.chunk_rows, ns.passthrough, ns.top_k,
                         ns.search)
    except (PackageError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("final " + " ".join(f"{k}={v:.6g}" for k, v in res.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
