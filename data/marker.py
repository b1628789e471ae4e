"""Marker files that identify directories this tool wrote, so ``--overwrite`` replaces only
those (``data.convert``, ``data.synth``, ``trainer.export``) and never, say, a home directory
or a checkpoint tree someone pointed ``--out`` at by mistake.

A marker is a small JSON file (``{"tool": ..., "created": ...}``) written inside the
directory before it is renamed into place.

Example::

    refusal = replace_refusal("datasets/x", overwrite=True, marker=DATASET_MARKER,
                              what="dataset")
    if refusal:
        raise ConvertError(refusal)
    ...
    write_marker(tmp_dir, DATASET_MARKER, "data.convert criteo")
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

DATASET_MARKER = ".shardrec-dataset"
EXPORT_MARKER = ".shardrec-export"


def write_marker(directory: str, marker: str, tool: str) -> str:
    """Write ``directory/marker`` naming ``tool``; returns its path."""
    path = os.path.join(directory, marker)
    with open(path, "w") as fh:
        json.dump({"tool": tool, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, fh)
        fh.write("\n")
    return path


def replace_refusal(out: str, overwrite: bool, marker: str, what: str) -> Optional[str]:
    """Why ``out`` must not be replaced (a message naming the fix), or None when it may be:
    it does not exist, or ``overwrite`` is set and it is a directory holding ``marker``."""
    if not os.path.lexists(out):
        return None
    if not overwrite:
        return f"{out} already exists; pass --overwrite to replace it"
    if os.path.islink(out) or not os.path.isdir(out) \
            or not os.path.isfile(os.path.join(out, marker)):
        article = "an" if what[:1] in "aeiou" else "a"
        return (f"{out} exists and is not {article} {what} written by this tool (no {marker} "
                f"marker file inside), so --overwrite refuses to delete it; choose another "
                f"--out, or remove it yourself if you are sure ({article} {what} written before "
                f"markers existed has none either)")
    return None
