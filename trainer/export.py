"""Export a sharded checkpoint as plain, unsharded tensors for single-process inference.

``python -m trainer.export --checkpoint RUN/checkpoints/step_00001000 --out DIR``

``DIR`` gets ``model.pt`` (a ``{name: full tensor}`` dict of every table and dense weight,
loadable with ``torch.load(..., weights_only=True)`` into the unsharded model), the run's
``config.toml``, the dataset's ``schema.json`` and ``export.json`` (model name, flavour,
arguments, step). No process group and no ``torchrec.distributed`` are needed to read it back
(``python -m trainer.predict``). Written to ``DIR.tmp-<pid>`` and renamed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Dict, Optional, Sequence

import torch

from data.cli import ArgumentParser
from data.io import AtomicDirectory, write_json_atomic
from data.marker import EXPORT_MARKER, replace_refusal
from data.schema import SCHEMA_FILE, load_schema
from trainer.config import ConfigError, load_config

MODEL_FILE = "model.pt"
EXPORT_FILE = "export.json"


def export_checkpoint(checkpoint: str, out: str, overwrite: bool = False) -> Dict[str, object]:
    """Write the export of ``checkpoint`` to ``out``; returns what ``export.json`` holds.

    The checkpoint is verified first (its checksum manifest, and ``.metadata`` through the
    restricted unpickler of :mod:`trainer.safe_load`); nothing in it is unpickled with a
    general unpickler."""
    from trainer.checkpoint import MARKER, CheckpointError, Checkpointer
    from trainer.safe_load import load_full_state_dict

    if not os.path.exists(os.path.join(checkpoint, MARKER)):
        raise CheckpointError(f"{checkpoint} is not a complete checkpoint (no {MARKER} "
                              f"marker); pass a step_* directory that training finished")
    refusal = replace_refusal(out, overwrite, EXPORT_MARKER, "export")
    if refusal:
        raise FileExistsError(refusal)
    Checkpointer(os.path.dirname(os.path.abspath(checkpoint)), 0, 1, 0).verify(checkpoint)
    cfg = load_config(os.path.join(checkpoint, "config.toml"))
    schema = load_schema(cfg.data.schema or cfg.data.path)
    state = load_full_state_dict(checkpoint)
    weights = {k: v.contiguous() for k, v in state["model"].items()}
    with open(os.path.join(checkpoint, "trainer.json")) as fh:
        step = json.load(fh)["step"]
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = ArgumentParser(prog="python -m trainer.export", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a complete step_* checkpoint directory, or a run directory / "
                        "checkpoint directory: then its best-on-valid checkpoint "
                        "(checkpoint.keep_best) if it has one, else its newest")
    p.add_argument("--out", required=True, help="export directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export")
    ns = p.parse_args(argv)
    from trainer.selection import resolve_checkpoint

    try:
        info = export_checkpoint(resolve_checkpoint(ns.checkpoint), ns.out, ns.overwrite)
    except (FileNotFoundError, FileExistsError, ConfigError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {info['model']} step {info['step']} ({info['tensors']} tensors) to "
          f"{ns.out} ({SCHEMA_FILE}, {MODEL_FILE}, config.toml)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
