"""Export a sharded checkpoint for single-process inference.

``python -m trainer.export --checkpoint RUN/checkpoints/step_00001000 --out DIR
[--format package|weights] [--quant fp32|int8|int4] [--compile auto|aoti|none]
[--index none|ivf_flat|hnsw] [--index-param nlist=1024 ...]``

``--format package`` (the default) writes the inference package of :mod:`trainer.package`:
``model.pt2`` (a ``torch.export`` program with a plain-tensor signature, see
:mod:`trainer.inference`; AOTInductor-compiled beside it where the toolchain works), schema,
preprocessing state, config, checksum manifest, and for sequential models the item matrix
and an optional FAISS index. With ``--quant int8|int4`` the AUC delta vs fp32 on the
dataset's evaluation split (``--eval-rows``) is measured and printed.

``--format weights`` writes the older layout: ``DIR`` gets ``model.pt`` (a
``{name: full tensor}`` dict of every table and dense weight,
loadable with ``torch.load(..., weights_only=True)`` into the unsharded model), the run's
``config.toml``, the dataset's ``schema.json`` and ``export.json`` (model name, flavour,
arguments, step). No process group and no ``torchrec.distributed`` are needed to read it back
(``python -m trainer.predict``). Written to ``DIR.tmp-<pid>`` and renamed; ``--overwrite``
replaces only a directory this tool wrote (its ``.shardrec-export`` marker). The checkpoint's
checksum manifest is verified first and nothing in it is unpickled with a general unpickler.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from data.cli import ArgumentParser
from data.io import AtomicDirectory, write_json_atomic
from data.marker import EXPORT_MARKER, replace_refusal
from data.schema import SCHEMA_FILE, Schema, load_schema
from trainer.config import Config, ConfigError
from trainer.validation import load_checked_config

MODEL_FILE = "model.pt"
EXPORT_FILE = "export.json"


def checkpoint_weights(checkpoint: str) -> Tuple[Config, Schema, Dict[str, torch.Tensor], int]:
    """(config, schema, full unsharded ``{name: tensor}`` state of the task model, step) of a
    complete DCP checkpoint.

    The checkpoint is verified first (its checksum manifest, and ``.metadata`` through the
    restricted unpickler of :mod:`trainer.safe_load`); nothing in it is unpickled with a
    general unpickler."""
    from trainer.checkpoint import MARKER, CheckpointError, Checkpointer
    from trainer.safe_load import load_full_state_dict

    if not os.path.exists(os.path.join(checkpoint, MARKER)):
        raise CheckpointError(f"{checkpoint} is not a complete checkpoint (no {MARKER} "
                              f"marker); pass a step_* directory that training finished")
    Checkpointer(os.path.dirname(os.path.abspath(checkpoint)), 0, 1, 0).verify(checkpoint)
    cfg = load_checked_config(os.path.join(checkpoint, "config.toml"))
    schema = load_schema(cfg.data.schema or cfg.data.path)
    state = load_full_state_dict(checkpoint)
    weights = {k: v.contiguous() for k, v in state["model"].items()}
    with open(os.path.join(checkpoint, "trainer.json")) as fh:
        step = int(json.load(fh)["step"])
    return cfg, schema, weights, step


def build_trained_model(cfg: Config, schema: Schema, weights: Dict[str, torch.Tensor]
                        ) -> Tuple[nn.Module, str]:
    """(the unsharded model inside the task wrapper, with ``weights`` loaded; its task kind).
    The trainer checkpoints the model inside its task wrapper, so keys are ``model.<param>``."""
    from models import get_model_spec

    spec = get_model_spec(cfg.model.name)
    model = spec.build(schema, spec.make_args(cfg.model.flavour, cfg.model.args), "cpu")
    inner = {k[len("model."):]: v for k, v in weights.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(inner, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint weights do not fit model {cfg.model.name!r}: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval(), spec.task


def export_checkpoint(checkpoint: str, out: str, overwrite: bool = False) -> Dict[str, object]:
    """Write the weights export of ``checkpoint`` to ``out``; returns what ``export.json``
    holds. Only a directory this tool wrote (its marker) is replaced with ``overwrite``."""
    refusal = replace_refusal(out, overwrite, EXPORT_MARKER, "export")
    if refusal:
        raise FileExistsError(refusal)
    cfg, schema, weights, step = checkpoint_weights(checkpoint)
    info = {"model": cfg.model.name, "flavour": cfg.model.flavour, "args": cfg.model.args,
            "step": step, "checkpoint": os.path.abspath(checkpoint),
            "tensors": len(weights)}
    with AtomicDirectory(out, overwrite=True, marker=EXPORT_MARKER, what="export",
                         tool="trainer.export") as d:
        torch.save(weights, os.path.join(d.path, MODEL_FILE))
        shutil.copy(os.path.join(checkpoint, "config.toml"), os.path.join(d.path, "config.toml"))
        schema.save(d.path)
        write_json_atomic(os.path.join(d.path, EXPORT_FILE), info)
        d.commit()
    return info


def eval_split(dataset: str) -> Optional[str]:
    """The split a quantisation check scores: ``test``, else ``eval``, else ``valid``."""
    for split in ("test", "eval", "valid"):
        if os.path.isdir(os.path.join(dataset, split)):
            return split
    return None


@torch.no_grad()
def quantisation_auc(model: nn.Module, task: str, schema: Schema, dataset: str, quant: str,
                     max_rows: int = 100_000, batch_size: int = 4096) -> Dict[str, float]:
    """AUC of each binary prediction with fp32 and with ``quant`` tables on up to
    ``max_rows`` rows of the dataset's evaluation split: ``{auc_fp32_<p>, auc_<quant>_<p>,
    auc_delta_<p>}``. Empty when the dataset or its labels are not there."""
    from data.reader import ParquetReader
    from data.metrics import roc_auc
    from trainer.inference import ScoringProgram
    from trainer.package import _binary_outputs

    split = eval_split(dataset)
    if split is None or not schema.labels:
        return {}
    names, binary = _binary_outputs(model, task)
    progs = {q: ScoringProgram(model, schema, binary, q) for q in ("fp32", quant)}
    feats = [f.name for f in schema.sparse_features] + [f.name for f in schema.sequence_features]
    scores: Dict[str, List[torch.Tensor]] = {q: [] for q in progs}
    labels: List[torch.Tensor] = []
    ids: List[torch.Tensor] = []
    rows = 0
    # remainder="pad" wraps the last batch around; duplicates are dropped by sample id below.
    for batch in ParquetReader(dataset, split, batch_size, schema=schema, remainder="pad"):
        ids.append(batch.sample_ids)
        kjts = {}
        for kjt in (batch.sparse, batch.sequence):
            if kjt is not None:
                kjts.update(kjt.to_dict())
        values = [kjts[n].values() for n in feats]
        lengths = [kjts[n].lengths().long() for n in feats]
        for q, prog in progs.items():
            scores[q].append(prog(batch.dense, values, lengths))
        labels.append(batch.labels.reshape(batch.dense.shape[0], -1))
        rows += batch.dense.shape[0]
        if rows >= max_rows:
            break
    _, first = np.unique(torch.cat(ids).numpy(), return_index=True)
    y = torch.cat(labels).numpy()[first]
    out: Dict[str, float] = {}
    preds = getattr(model, "predictions", None)
    for k, (name, is_bin) in enumerate(zip(names, binary)):
        if not is_bin:
            continue
        label = preds[k].eval_label if preds is not None else 0
        given = preds[k].eval_given if preds is not None else -1
        keep = y[:, given] == 1 if given >= 0 else slice(None)
        a = {q: roc_auc(torch.cat(scores[q])[:, k].numpy()[first][keep], y[keep, label])
             for q in progs}
        tag = name.replace("score_", "").replace("score", "ctr")
        out[f"auc_fp32_{tag}"], out[f"auc_{quant}_{tag}"] = a["fp32"], a[quant]
        out[f"auc_delta_{tag}"] = a[quant] - a["fp32"]
    out["rows"] = float(first.size)
    return out


def export_package(checkpoint: str, out: str, quant: str = "fp32", compile: str = "auto",
                   index: str = "none", index_params: Optional[Dict[str, int]] = None,
                   overwrite: bool = False, eval_rows: int = 100_000) -> Dict[str, Any]:
    """Write the inference package of ``checkpoint`` to ``out``; returns ``package.json``
    (with the quantisation's AUC check under ``quantisation_check`` when one ran)."""
    from trainer.package import dataset_preprocess_state, write_package

    refusal = replace_refusal(out, overwrite, EXPORT_MARKER, "export")
    if refusal:
        raise FileExistsError(refusal)
    cfg, schema, weights, step = checkpoint_weights(checkpoint)
    model, task = build_trained_model(cfg, schema, weights)
    check: Dict[str, float] = {}
    if quant != "fp32" and task != "sequential" and cfg.data.path:
        check = quantisation_auc(model, task, schema, cfg.data.path, quant, eval_rows)
    with open(os.path.join(checkpoint, "config.toml")) as fh:
        config_toml = fh.read()
    if task == "retrieval":  # the user tower + item embeddings + index (issue 19)
        from trainer.package_retrieval import write_retrieval_package

        return write_retrieval_package(
            model, schema, config_toml, out, model_name=cfg.model.name,  # type: ignore[arg-type]
            step=step, preprocess=dataset_preprocess_state(cfg.data.path), quant=quant,
            compile=compile, index=index, index_params=index_params, overwrite=overwrite)
    info = write_package(model, task, schema, config_toml, out, model_name=cfg.model.name,
                         step=step, preprocess=dataset_preprocess_state(cfg.data.path),
                         quant=quant, compile=compile, index=index, index_params=index_params,
                         overwrite=overwrite,
                         extra={"quantisation_check": check} if check else None)
    return info


def _params(items: Sequence[str]) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep or not v.lstrip("-").isdigit():
            raise ValueError(f"--index-param {it!r} must be NAME=INTEGER (e.g. nlist=1024, "
                             f"nprobe=32, M=32, efSearch=128)")
        out[k] = int(v)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = ArgumentParser(prog="python -m trainer.export", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a complete step_* checkpoint directory, or a run directory / "
                        "checkpoint directory: then its best-on-valid checkpoint "
                        "(checkpoint.keep_best) if it has one, else its newest")
    p.add_argument("--out", required=True, help="export directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export")
    p.add_argument("--format", choices=("package", "weights"), default="package",
                   help="package: the inference package (default); weights: model.pt tensors")
    p.add_argument("--quant", choices=("fp32", "int8", "int4"), default="fp32",
                   help="row-wise quantisation of the embedding tables in the package")
    p.add_argument("--compile", choices=("auto", "aoti", "none"), default="auto",
                   help="AOTInductor-compile the program too (auto: fall back on failure)")
    p.add_argument("--index", choices=("none", "ivf_flat", "hnsw"), default="none",
                   help="FAISS index over the items (sequential models)")
    p.add_argument("--index-param", action="append", default=[], metavar="NAME=INT",
                   help="index parameter: nlist, nprobe (ivf_flat); M, efConstruction, "
                        "efSearch (hnsw)")
    p.add_argument("--eval-rows", type=int, default=100_000,
                   help="rows of the evaluation split scored by the --quant AUC check")
    ns = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from trainer.selection import resolve_checkpoint

    try:
        checkpoint = resolve_checkpoint(ns.checkpoint)
        if ns.format == "weights":
            info = export_checkpoint(checkpoint, ns.out, ns.overwrite)
        else:
            info = export_package(checkpoint, ns.out, ns.quant, ns.compile, ns.index,
                                  _params(ns.index_param), ns.overwrite, ns.eval_rows)
    except (FileExistsError, FileNotFoundError, ConfigError, RuntimeError, ValueError,
            KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if ns.format == "weights":
        print(f"exported {info['model']} step {info['step']} ({info['tensors']} tensors) to "
              f"{ns.out} ({SCHEMA_FILE}, {MODEL_FILE}, config.toml)")
        return 0
    check = info.get("quantisation_check") or {}
    if check:
        print("quantisation " + " ".join(f"{k}={v:.6g}" for k, v in check.items()))
    print(f"packaged {info['model']} step {info['step']} ({info['kind']}, {info['quantisation']}"
          f" tables, {'AOTInductor + ' if info['compiled'] else ''}torch.export program"
          f"{', index ' + info['index']['kind'] if 'index' in info else ''}) to {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
