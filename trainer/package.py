"""The inference package: what ``python -m trainer.export`` writes and predict/serve load.

A package directory holds

* ``model.pt2``: the ``torch.export`` program of the unsharded model with the plain-tensor
  signature of :mod:`trainer.inference` (CTR / multi-task: scores ``[B, P]``; sequential: user
  vectors ``[B, D]``); ``model.aoti.pt2``: the same program compiled by AOTInductor, when the
  C++ toolchain worked at export time (loaded in preference, same signature);
* ``items.pt`` (sequential): the L2-normalised item matrix ``[num_items, D]`` (row 0 is
  padding and never recommended), a ``{"items": tensor}`` file read with
  ``torch.load(weights_only=True)``; ``items.faiss``: an optional FAISS index over it;
* ``schema.json``, ``preprocess.json`` (the dataset's preprocessing state, ``{}`` when it had
  none), ``config.toml`` (the training run's resolved config);
* ``package.json``: kind, model, step, input feature order, output columns, quantisation;
* ``manifest.json``: ``{file: sha256}`` of every other file, verified on every load; a file
  that does not match is refused by name.

Nothing in a package is unpickled: programs go through ``torch.export.load`` /
AOTInductor's loader, tensors through ``torch.load(weights_only=True)``, the rest is JSON/TOML.
Loading needs ``torch`` alone (plus ``faiss`` for ``items.faiss``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.export import Dim

from data.io import AtomicDirectory
from data.marker import EXPORT_MARKER
from data.schema import Schema

log = logging.getLogger(__name__)

PROGRAM_FILE = "model.pt2"
AOTI_FILE = "model.aoti.pt2"
ITEMS_FILE = "items.pt"
INDEX_FILE = "items.faiss"
PACKAGE_FILE = "package.json"
MANIFEST_FILE = "manifest.json"
PREPROCESS_FILE = "preprocess.json"
PACKAGE_VERSION = 1
#: batch size of the example inputs CTR / multi-task programs are exported (and compiled) with.
EXAMPLE_BATCH = 512


class PackageError(ValueError):
    """A package that is missing, incomplete or corrupted; the message names the file."""


# -- manifest -------------------------------------------------------------------------------

def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def write_manifest(directory: str) -> Dict[str, str]:
    """Checksum every file of ``directory`` (the manifest itself excepted) into
    ``manifest.json``; returns the mapping."""
    files = sorted(f for f in os.listdir(directory) if f != MANIFEST_FILE
                   and os.path.isfile(os.path.join(directory, f)))
    sums = {f: sha256_file(os.path.join(directory, f)) for f in files}
    with open(os.path.join(directory, MANIFEST_FILE), "w") as fh:
        json.dump({"version": PACKAGE_VERSION, "sha256": sums}, fh, indent=2)
    return sums


def verify_manifest(directory: str) -> Dict[str, str]:
    """Raise :class:`PackageError` naming the first file that is missing or whose checksum
    differs from ``manifest.json``."""
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise PackageError(f"{directory} is not an inference package (no {MANIFEST_FILE}); "
                           f"write one with `python -m trainer.export --checkpoint STEP_DIR "
                           f"--out {directory}`")
    with open(path) as fh:
        sums = json.load(fh)["sha256"]
    for name, want in sums.items():
        f = os.path.join(directory, name)
        if not os.path.isfile(f):
            raise PackageError(f"{f} is listed in {MANIFEST_FILE} but missing; re-export the "
                               f"package")
        got = sha256_file(f)
        if got != want:
            raise PackageError(f"{f} is corrupted: sha256 {got[:16]}… does not match "
                               f"{MANIFEST_FILE} ({want[:16]}…); re-export the package")
    return sums


# -- example inputs and export --------------------------------------------------------------

def example_inputs(schema: Schema, features: Sequence[str], batch: int = 5,
                   timestamps: bool = False, max_len: int = 0, seed: int = 0,
                   aligned: Sequence[str] = ()) -> Tuple[Any, ...]:
    """Random inputs of the program signature (lengths varied so no feature's size equals B
    by accident, which export would specialise on). The ``aligned`` features (sequences
    that describe the same events, e.g. DIN's item and category histories) share lengths."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(batch, schema.dense_dim, generator=g)
    values, lengths = [], []
    shared: Optional[torch.Tensor] = None
    for k, name in enumerate(features):
        f = schema.feature(name)
        hi = max(2, min(max_len or f.max_len or 3, 3))
        ln = torch.randint(1, hi + 1, (batch,), generator=g)
        ln[0] = hi  # total != batch
        if name in aligned:
            shared = ln if shared is None else shared
            ln = shared.clone()
        values.append(torch.randint(1, f.num_embeddings, (int(ln.sum()),), generator=g))
        lengths.append(ln)
    args: Tuple[Any, ...] = (dense, values, lengths)
    if timestamps:
        ts = torch.cat([torch.arange(int(n)) * 10 for n in lengths[0]])
        args = args + ([ts, torch.full((batch,), 1000, dtype=torch.int64)],)
    return args


def export_program(program: torch.nn.Module, args: Tuple[Any, ...],
                   features: Sequence[str] = (), aligned: Sequence[str] = ()) -> Any:
    """``torch.export`` of ``program`` with a dynamic batch and dynamic id counts (one per
    feature; the ``aligned`` ones among ``features`` share one)."""
    batch = Dim("batch", min=1, max=1 << 24)
    n = len(args[1])
    ids = [Dim(f"ids_{k}", min=1, max=1 << 30) for k in range(n)]
    together = [k for k, name in enumerate(features) if name in aligned]
    for k in together[1:]:
        ids[k] = ids[together[0]]
    shapes: Dict[str, Any] = {
        "dense": {0: batch},
        "values": [{0: d} for d in ids],
        "lengths": [{0: batch} for _ in range(n)],
    }
    if len(args) > 3:
        shapes["timestamps"] = [{0: Dim("ids_0", min=1, max=1 << 30)}, {0: batch}]
    with torch.no_grad():
        return torch.export.export(program, args, dynamic_shapes=shapes, strict=False)


def save_program(program: torch.nn.Module, args: Tuple[Any, ...], directory: str, compile: str,
                 info: Dict[str, Any], features: Sequence[str] = (),
                 aligned: Sequence[str] = ()) -> None:
    """Export ``program`` (:func:`export_program`) into ``directory`` as ``model.pt2`` and,
    unless ``compile`` is ``none``, AOTInductor-compile it beside (``aoti`` fails when the
    toolchain does, ``auto`` keeps the portable program alone); records ``export_s`` and
    ``compiled`` in ``info``."""
    t = time.time()
    ep = export_program(program, args, features, aligned)
    torch.export.save(ep, os.path.join(directory, PROGRAM_FILE))
    info["export_s"] = round(time.time() - t, 2)
    info["compiled"] = False
    if compile != "none":
        done = compile_aoti(ep, os.path.join(directory, AOTI_FILE))
        if done is None and compile == "aoti":
            raise RuntimeError("AOTInductor compilation failed (see the log); pass "
                               "--compile auto to package the portable program alone")
        info["compiled"] = done is not None


def write_package_files(directory: str, schema: Schema, preprocess: Optional[Dict[str, Any]],
                        config_toml: str, info: Dict[str, Any]) -> None:
    """The files every package holds beside its program: the schema, the preprocessing
    state, the run's config, ``package.json`` (``info``), then the checksum manifest of
    everything in ``directory`` (last, so it covers the rest)."""
    schema.save(directory)
    write_json(os.path.join(directory, PREPROCESS_FILE), preprocess or {})
    with open(os.path.join(directory, "config.toml"), "w") as fh:
        fh.write(config_toml)
    write_json(os.path.join(directory, PACKAGE_FILE), info)
    write_manifest(directory)


#: Inductor options of the AOTInductor build. ``freezing`` turns the weights into constants
#: so inductor can prepack them: every fp32 linear layer becomes a oneDNN
#: ``mkldnn._linear_pointwise`` on a weight reordered once at compile time, with its ReLU
#: fused, instead of ``addmm`` (MKL sgemm, which on this workplace's AMD EPYC ran a 512×432
#: by 432×256 product in 1.3 ms against oneDNN's 0.66 ms, one thread). Inductor only freezes
#: a graph compiled with autograd off, hence the ``no_grad`` below. ``cpp.threads = 1``: the
#: generated elementwise / reduction loops are serial (the matmuls and the embedding bag
#: still use the caller's torch threads). Left to itself inductor bakes the exporting
#: process's thread count into ``omp parallel`` regions, which then run at that count
#: whatever the server sets; on the shared 2-core machine such regions made batch-1 calls
#: take 0.8 s (each region waits for a descheduled thread) for loops worth microseconds.
AOTI_OPTIONS: Dict[str, Any] = {"freezing": True, "cpp.threads": 1}


def compile_aoti(ep: Any, path: str) -> Optional[str]:
    """AOTInductor-compile ``ep`` into ``path`` with :data:`AOTI_OPTIONS` (retried without
    them if that build fails); None (logged) when the toolchain fails."""
    for options in (AOTI_OPTIONS, {}):
        try:
            from torch._inductor import aoti_compile_and_package

            t = time.time()
            with torch.no_grad():
                aoti_compile_and_package(ep, package_path=path, inductor_configs=options)
            log.info("AOTInductor compiled %s in %.0fs (%s)", path, time.time() - t, options)
            return path
        except Exception as e:  # any toolchain failure: the portable program still serves
            log.warning("AOTInductor compilation with %s failed (%s: %s)", options,
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            if os.path.exists(path):
                os.remove(path)
            if not options:
                log.warning("the package keeps the portable torch.export program only")
    return None


# -- loading --------------------------------------------------------------------------------

@dataclass
class Package:
    """A loaded, verified package. ``program(dense, values, lengths[, timestamps])`` is the
    exported module (see :mod:`trainer.inference`)."""

    directory: str
    info: Dict[str, Any]
    schema: Schema
    preprocess: Dict[str, Any]
    program: Any
    items: Optional[torch.Tensor] = None
    index: Any = None
    compiled: bool = False
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return str(self.info["kind"])

    @property
    def features(self) -> List[str]:
        return list(self.info["inputs"]["features"])

    @property
    def outputs(self) -> List[str]:
        return list(self.info["outputs"])

    @torch.no_grad()
    def run(self, dense: torch.Tensor, values: List[torch.Tensor], lengths: List[torch.Tensor],
            timestamps: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        if timestamps is not None:
            return self.program(dense, values, lengths, timestamps)
        return self.program(dense, values, lengths)


def load_package(directory: str, prefer_compiled: bool = True, load_index: bool = True
                 ) -> Package:
    """Verify ``directory``'s manifest and load it (see the module docstring)."""
    verify_manifest(directory)
    with open(os.path.join(directory, PACKAGE_FILE)) as fh:
        info = json.load(fh)
    if info.get("version") != PACKAGE_VERSION:
        raise PackageError(f"{os.path.join(directory, PACKAGE_FILE)}: package version "
                           f"{info.get('version')} is not {PACKAGE_VERSION}; re-export it")
    schema = Schema.load(directory)
    with open(os.path.join(directory, PREPROCESS_FILE)) as fh:
        preprocess = json.load(fh)
    program, compiled = None, False
    aoti = os.path.join(directory, AOTI_FILE)
    if prefer_compiled and os.path.isfile(aoti):
        try:
            from torch._inductor import aoti_load_package

            program, compiled = aoti_load_package(aoti), True
        except Exception as e:  # e.g. compiled for another CPU: the portable program serves
            log.warning("cannot load %s (%s); using %s", aoti, e, PROGRAM_FILE)
    if program is None:
        program = torch.export.load(os.path.join(directory, PROGRAM_FILE)).module()
    pkg = Package(directory, info, schema, preprocess, program, compiled=compiled)
    if info["kind"] == "sequential":
        pkg.items = torch.load(os.path.join(directory, ITEMS_FILE), weights_only=True)["items"]
        idx = os.path.join(directory, INDEX_FILE)
        if load_index and os.path.isfile(idx):
            from trainer.topk import read_index

            pkg.index = read_index(idx)
    return pkg


def write_json(path: str, obj: Any) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)


def dataset_preprocess_state(dataset_dir: str) -> Dict[str, Any]:
    """``meta.json["preprocess"]`` of the training dataset, ``{}`` when it has none."""
    path = os.path.join(dataset_dir, "meta.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as fh:
        return dict(json.load(fh).get("preprocess") or {})


def to_numpy_scores(out: torch.Tensor) -> np.ndarray:
    return out.detach().float().numpy()


# -- writing --------------------------------------------------------------------------------

def _binary_outputs(model: torch.nn.Module, task: str) -> Tuple[List[str], List[bool]]:
    if task == "multitask":
        preds = list(model.predictions)  # type: ignore[attr-defined]
        return [f"score_{p.name}" for p in preds], [p.kind == "binary" for p in preds]
    return ["score"], [True]


def write_package(model: torch.nn.Module, task: str, schema: Schema, config_toml: str,
                  out: str, *, model_name: str, step: int = 0,
                  preprocess: Optional[Dict[str, Any]] = None, quant: str = "fp32",
                  compile: str = "auto", index: str = "none",
                  index_params: Optional[Dict[str, int]] = None,
                  overwrite: bool = False, extra: Optional[Dict[str, Any]] = None
                  ) -> Dict[str, Any]:
    """Write the package of the unsharded, weight-loaded ``model`` (the task wrapper's inner
    model: ``Batch → logits`` or a ``SequentialModel``) to ``out``; returns ``package.json``.

    Args:
        task: the model's task kind (``ctr`` | ``multitask`` | ``sequential``).
        config_toml: text of the training run's resolved config.
        quant: ``fp32`` | ``int8`` | ``int4`` row-wise tables.
        compile: ``auto`` (AOTInductor, falling back to the portable program alone on any
            toolchain failure) | ``aoti`` (failure is an error) | ``none``.
        index: ``none`` | ``ivf_flat`` | ``hnsw``: FAISS index over the items (sequential).
    """
    from trainer.inference import ScoringProgram, UserProgram, input_features

    if compile not in ("auto", "aoti", "none"):
        raise ValueError(f"--compile {compile!r} is not one of auto, aoti, none")
    # Refuses an existing ``out`` (without --overwrite, or one this tool did not write) before
    # any work; the package is built under a temporary name and renamed into place.
    target = AtomicDirectory(out, overwrite, marker=EXPORT_MARKER, what="export",
                             tool="trainer.export")
    model = model.eval()
    info: Dict[str, Any] = {"version": PACKAGE_VERSION, "kind": task, "model": model_name,
                            "step": step, "quantisation": quant,
                            "torch": torch.__version__, **(extra or {})}
    aligned: List[str] = []
    if task == "sequential":
        enc = model.encoder  # type: ignore[attr-defined]
        use_time = bool(getattr(enc, "use_time", False))
        feats = input_features(schema, enc.item_feature, enc.action_feature)
        program: torch.nn.Module = UserProgram(model, quant)
        # Only the history feeds the user encoder: dense is [B, 0].
        args = example_inputs(schema.project(feats), feats, timestamps=use_time,
                              max_len=enc.max_len)
        info["outputs"] = ["user"]
        info["inputs"] = {"features": feats, "timestamps": use_time, "max_len": enc.max_len,
                          "item_table": model.item_table,  # type: ignore[attr-defined]
                          "dim": enc.dim}
    elif task in ("ctr", "multitask"):
        names, binary = _binary_outputs(model, task)
        feats = input_features(schema)
        program = ScoringProgram(model, schema, binary, quant)
        # Sequences a model reads as one event stream (DIN / DIEN) have equal id counts.
        aligned = sorted({n for m in model.modules()
                          for n in getattr(m, "sequence_names", None) or []})
        # A serving-sized example batch: AOTInductor takes its loop-parallelisation hints
        # from the example's sizes, and with B = 5 it parallelised the 27-wide FM reduction
        # inside the loop over rows (one OpenMP region per row) instead of the rows.
        args = example_inputs(schema, feats, batch=EXAMPLE_BATCH, aligned=aligned)
        info["outputs"] = names
        info["inputs"] = {"features": feats, "timestamps": False,
                          "dense": [f.name for f in schema.dense_features]}
    else:
        raise ValueError(f"task kind {task!r} has no inference package")
    with target as d:
        tmp = d.path
        save_program(program, args, tmp, compile, info, feats, aligned)
        if task == "sequential":
            table = program.model.ec.tables[model.item_table]  # type: ignore[attr-defined,index]
            items = torch.nn.functional.normalize(table.dequantised(), dim=-1)
            torch.save({"items": items.contiguous()}, os.path.join(tmp, ITEMS_FILE))
            if index != "none":
                from trainer.topk import build_index, write_index

                write_index(build_index(items, index, dict(index_params or {})),
                            os.path.join(tmp, INDEX_FILE))
                info["index"] = {"kind": index, "params": dict(index_params or {})}
        write_package_files(tmp, schema, preprocess, config_toml, info)
        d.commit()
    return info


# -- rows → program inputs ------------------------------------------------------------------

@dataclass
class Inputs:
    """One batch of program inputs and the rows' passthrough columns."""

    dense: torch.Tensor
    values: List[torch.Tensor]
    lengths: List[torch.Tensor]
    timestamps: Optional[List[torch.Tensor]]
    rows: int
    #: sequential: the first feature's whole (untruncated) history, to exclude from top-K.
    history: Optional[Tuple[torch.Tensor, torch.Tensor]] = None


def table_inputs(pkg: Package, table: Any, query_time: Optional[np.ndarray] = None,
                 where: str = "<rows>", first_row: int = 0) -> Inputs:
    """Program inputs from an Arrow table in the dataset's column format (what the stored
    preprocessing produces): ids validated / hashed / clamped per the schema, sequences
    truncated to the most recent ``max_len`` ids. Labels are not needed."""
    import dataclasses

    from data.reader import Where, decode_table

    schema = dataclasses.replace(pkg.schema, labels=[])
    if pkg.kind == "sequential":
        # A user encoder reads its item (and action) history only.
        schema = schema.project(pkg.features)
    chunk = decode_table(table, schema, np.arange(table.num_rows),
                         Where(where, None, first_row))
    n = chunk.num_rows
    by_name: Dict[str, Any] = {}
    for f, j in zip(schema.sparse_features, chunk.sparse_jagged()):
        by_name[f.name] = j
    ts_by_name: Dict[str, Any] = {}
    for f, j, t in zip(schema.sequence_features, chunk.sequence, chunk.timestamps):
        by_name[f.name] = j
        ts_by_name[f.name] = t
    from data.reader import truncate_recent

    max_len = int(pkg.info["inputs"].get("max_len", 0))
    values, lengths = [], []
    history = None
    for name in pkg.features:
        j = by_name[name]
        ln, v = np.asarray(j.lengths, np.int64), np.asarray(j.values, np.int64)
        if history is None:
            history = (torch.from_numpy(v.copy()), torch.from_numpy(ln.copy()))
        if max_len:
            ln, v = truncate_recent(ln, v, max_len)
        values.append(torch.from_numpy(np.array(v, dtype=np.int64)))  # owns writable memory
        lengths.append(torch.from_numpy(np.ascontiguousarray(ln)))
    timestamps = None
    if pkg.info["inputs"].get("timestamps"):
        item = pkg.features[0]
        t = ts_by_name.get(item)
        if t is None:
            raise PackageError(f"{where}: the model uses the timestamps of {item!r}, but the "
                               f"rows have none")
        tl, tv = truncate_recent(np.asarray(t.lengths, np.int64),
                                 np.asarray(t.values, np.int64), max_len)
        if query_time is None:
            # No request time: the last event's (each position then measures gaps from itself).
            ends = np.cumsum(tl)
            query_time = np.where(tl > 0, tv[np.maximum(ends - 1, 0)] if tv.size else 0, 0)
        timestamps = [torch.from_numpy(np.ascontiguousarray(tv)),
                      torch.from_numpy(np.ascontiguousarray(query_time, dtype=np.int64))]
    return Inputs(torch.from_numpy(np.ascontiguousarray(chunk.dense)), values, lengths,
                  timestamps, n, history)


def run_inputs(pkg: Package, x: Inputs) -> torch.Tensor:
    """Program output for ``x`` (sequential: rows with an empty history get zero vectors
    without running the program on them)."""
    if pkg.kind != "sequential":
        return pkg.run(x.dense, x.values, x.lengths)
    has = x.lengths[0] > 0
    out = torch.zeros(x.rows, int(pkg.info["inputs"]["dim"]))
    if not bool(has.any()):
        return out
    if bool(has.all()):
        return pkg.run(x.dense, x.values, x.lengths, x.timestamps)
    # Drop the empty rows (their ids are none; other features share the item's lengths).
    keep = has.nonzero().squeeze(1)
    vals = [v for v in x.values]
    lens = [ln[keep] for ln in x.lengths]
    ts = None if x.timestamps is None else [x.timestamps[0], x.timestamps[1][keep]]
    out[keep] = pkg.run(x.dense[keep], vals, lens, ts)
    return out
