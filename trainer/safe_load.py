"""Reading DCP checkpoints without running code from them.

``torch.distributed.checkpoint`` keeps a checkpoint's index in a pickled ``.metadata`` file
and loads it with ``pickle.load``; its default load planner reads non-tensor values (an
optimizer's ``lr``, ``betas``...) with ``torch.load(..., weights_only=False)``. Either would
run whatever a crafted file asks for (``__reduce__`` → ``os.system``) the moment a run dir
auto-resumes or a checkpoint is exported. This module replaces both:

* :func:`read_metadata` unpickles ``.metadata`` with :class:`MetadataUnpickler`, which admits
  only DCP's metadata classes, ``torch.Size``, torch dtypes / layouts / memory formats,
  ``pathlib`` paths and builtin containers; any other global is refused with a
  :class:`UnsafeCheckpointError` naming the file and the refused ``module.name``;
* :class:`SafeFileSystemReader` is DCP's ``FileSystemReader`` with that metadata reader;
* :class:`SafeLoadPlanner` / :class:`SafeFullLoadPlanner` read non-tensor values with
  ``torch.load(..., weights_only=True)`` (tensors already are).

``safe_dcp_load(state, path)`` loads in place (every rank, like ``dcp.load``) and
``load_full_state_dict(path)`` returns the whole checkpoint as ``{fqn: tensor or value}``
(nested like the saved state) in one process, for export.

Example::

    >>> import tempfile, torch, torch.distributed.checkpoint as dcp
    >>> d = tempfile.mkdtemp()
    >>> _ = dcp.save({"w": torch.ones(2, 3)}, checkpoint_id=d, no_dist=True)
    >>> load_full_state_dict(d)["w"].shape
    torch.Size([2, 3])
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any, Dict, FrozenSet, Tuple

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    _EmptyStateDictLoadPlanner,
)
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

METADATA_FILE = ".metadata"

# Globals a DCP ``.metadata`` pickle legitimately names (torch 2.13 writes these; the list is
# closed on purpose: a class added by a future torch is refused until it is reviewed here).
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED: FrozenSet[Tuple[str, str]] = frozenset({
    (_DCP_METADATA, "Metadata"),
    (_DCP_METADATA, "TensorStorageMetadata"),
    (_DCP_METADATA, "BytesStorageMetadata"),
    (_DCP_METADATA, "ChunkStorageMetadata"),
    (_DCP_METADATA, "TensorProperties"),
    (_DCP_METADATA, "MetadataIndex"),
    (_DCP_METADATA, "StorageMeta"),
    (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    # Maps a layout's name ("torch.strided") to the layout object; calls nothing else.
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("collections", "OrderedDict"),
})


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file asked the unpickler for something other than plain metadata."""


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler for DCP metadata that refuses every global outside the allowlist."""

    def __init__(self, file: Any, path: str) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None),
                                            (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self.path}: refused to load type {module}.{name}: a DCP metadata file holds "
            f"only checkpoint metadata, sizes and dtypes, so this file was crafted or written "
            f"by something else; nothing from it was run. Do not use this checkpoint")


def read_metadata(path: str) -> Metadata:
    """The :class:`Metadata` in the file ``path``, read with :class:`MetadataUnpickler`.

    Raises :class:`UnsafeCheckpointError` for a refused type and :class:`CheckpointError`
    (naming the file) for a file that is not a metadata pickle."""
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        metadata = MetadataUnpickler(io.BytesIO(data), path).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # truncated or garbage bytes: many exception types
        raise CheckpointError(f"{path}: not a readable DCP metadata file ({type(e).__name__}: "
                         f"{e})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's file system reader with :func:`read_metadata` instead of ``pickle.load``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = os.fspath(self._get_metadata_path(kwargs.get("rank")))
        metadata = read_metadata(path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _load_value(value: io.BytesIO) -> Any:
    return torch.load(value, weights_only=True)


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that reads non-tensor values with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        loaded = _load_value(value)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn],
                        loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


class SafeFullLoadPlanner(_EmptyStateDictLoadPlanner):
    """Loads a whole checkpoint into an empty dict, non-tensor values ``weights_only``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        SafeLoadPlanner.load_bytes(self, read_item, value)  # type: ignore[arg-type]


def safe_dcp_load(state: Dict[str, Any], path: str) -> None:
    """``dcp.load(state, checkpoint_id=path)`` with the safe reader and planner."""
    import torch.distributed.checkpoint as dcp

    dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner())


def load_full_state_dict(path: str) -> Dict[str, Any]:
    """Every value of the DCP checkpoint ``path`` as full (unsharded) tensors, one process."""
    state: Dict[str, Any] = {}
    _load_state_dict(state, storage_reader=SafeFileSystemReader(path),
                     planner=SafeFullLoadPlanner(), no_dist=True)
    return state
