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
import tempfile
from typing import Dict, Optional, Sequence

import torch

from data.schema import SCHEMA_FILE, load_schema
from trainer.config import ConfigError, load_config

MODEL_FILE = "model.pt"
EXPORT_FILE = "export.json"


def export_checkpoint(checkpoint: str, out: str, overwrite: bool = False) -> Dict[str, object]:
    """Write the export of ``checkpoint`` to ``out``; returns what ``export.json`` holds."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from trainer.checkpoint import CheckpointError, MARKER

    if not os.path.exists(os.path.join(checkpoint, MARKER)):
        raise CheckpointError(f"{checkpoint} is not a complete checkpoint (no {MARKER} "
                              f"marker); pass a step_* directory that training finished")
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    cfg = load_config(os.path.join(checkpoint, "config.toml"))
    schema = load_schema(cfg.data.schema or cfg.data.path)
    with tempfile.TemporaryDirectory() as tmpdir:
        full = os.path.join(tmpdir, "full.pt")
        dcp_to_torch_save(checkpoint, full)
        state = torch.load(full, weights_only=True)
    weights = {k: v.contiguous() for k, v in state["model"].items()}
    with open(os.path.join(checkpoint, "trainer.json")) as fh:
        step = json.load(fh)["step"]
    info = {"model": cfg.model.name, "flavour": cfg.model.flavour, "args": cfg.model.args,
            "step": step, "checkpoint": os.path.abspath(checkpoint),
            "tensors": len(weights)}
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    torch.save(weights, os.path.join(tmp, MODEL_FILE))
    shutil.copy(os.path.join(checkpoint, "config.toml"), os.path.join(tmp, "config.toml"))
    schema.save(tmp)
    with open(os.path.join(tmp, EXPORT_FILE), "w") as fh:
        json.dump(info, fh, indent=2)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    return info


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__,
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
