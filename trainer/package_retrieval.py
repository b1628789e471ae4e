"""Inference packages of the retrieval models (``two_tower``, ``mind``): the user tower as a
``torch.export`` program, the item tower's output for every item and a FAISS index over it.

``python -m trainer.export --checkpoint STEP_DIR --out DIR`` (the default ``--format
package``) dispatches a retrieval checkpoint here. ``DIR`` is a package of
:mod:`trainer.package` (``manifest.json`` checksums, ``package.json``, ``schema.json``,
``preprocess.json``, ``config.toml``) with ``kind = "retrieval"`` and

* ``model.pt2``: the user tower, ``program(dense, values, lengths) → user [B, K, D]``
  (L2-normalised; ``K = 1`` for two-tower, ``num_interests`` for MIND) over the plain-tensor
  signature of :mod:`trainer.inference`; the inputs (``package.json["inputs"]["features"]``)
  are the pooled user features the tower reads, in schema order, then the item feature
  (the history, at most ``max_len`` most recent ids: :class:`RetrievalPackage` truncates);
* ``items.pt``: ``{"items": [num_items, D]}``, the item tower's L2-normalised output for
  every item (the item table row plus, with ``model.args.item_features``, the mean rows of its
  feature ids and, with ``model.args.item_dense_features``, the linear map of its
  standardised numeric features; row 0 is padding and never returned);
* ``item_features.parquet`` (with item features only; :mod:`data.item_features`): the item →
  feature ids lookup and the standardised numeric values ``items.pt`` was made from. The user
  program holds the same lookup and values and adds the history's item features itself, so
  callers send item ids only;
* ``items.faiss``: a FAISS inner-product index over rows ``1..N-1`` (ids = rows; HNSW unless
  ``--index ivf_flat``).

A query retrieves, for each of its K vectors, ``k + |history|`` neighbours; their union,
ranked by an item's best interest and with the history removed, is the answer
(:meth:`RetrievalPackage.search`). Loading needs ``torch`` and ``faiss`` only; nothing is
unpickled.

Example::

    pkg = RetrievalPackage("exports/two_tower")
    ids, scores = pkg.search(batch, k=200)   # batch from trainer.tasks.retrieval's data path
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.batch import Batch
from data.schema import Schema
from models.retrieval import (
    RetrievalModel,
    item_feature_ids,
    item_feature_key,
    item_feature_table,
    truncate_recent_jagged,
)

KIND = "retrieval"


class RetrievalUserProgram(nn.Module):
    """Retrieval model → ``(dense, values, lengths) → user [B, K, D]`` (see the module
    docstring); histories must already be at most ``max_len`` long."""

    def __init__(self, model: RetrievalModel, quant: str = "fp32") -> None:
        from trainer.inference import plain_copy

        super().__init__()
        self.model = plain_copy(model, quant).eval()
        enc = self.model.encoder
        self.item = enc.item_feature
        self.user_features = list(enc.user_features)
        self.max_len = enc.max_len
        # Fixed widths under export: no data-dependent truncation or padding width.
        enc.truncate = False
        tower = enc.tower
        if hasattr(tower, "pad_to"):
            tower.pad_to = self.max_len

    @property
    def features(self) -> List[str]:
        return self.user_features + [self.item]

    def forward(self, dense: torch.Tensor, values: List[torch.Tensor],
                lengths: List[torch.Tensor]) -> torch.Tensor:
        from trainer.inference import PlainFeatures, PlainJagged

        n = len(self.user_features)
        b = lengths[-1].shape[0]
        sparse = PlainFeatures({f: PlainJagged(v, ln) for f, v, ln in
                                zip(self.user_features, values[:n], lengths[:n])}, lengths[-1])
        hist = {self.item: PlainJagged(values[n], lengths[n])}
        items = self.model.encoder.item_tower
        for name in items.features:
            # The history's item features, from the item tower's own lookup (the package's
            # callers send item ids only).
            hist[item_feature_key(self.item, name)] = PlainJagged(
                *item_feature_ids(items.lookup(name), values[n], lengths[n]))
        seq = PlainFeatures(hist, lengths[-1])
        enc = self.model(Batch(dense=dense, sparse=sparse,  # type: ignore[arg-type]
                               labels=dense.new_zeros(b), sequence=seq))  # type: ignore[arg-type]
        return enc.user


def write_retrieval_package(model: RetrievalModel, schema: Schema, config_toml: str, out: str,
                            *, model_name: str, step: int = 0,
                            preprocess: Optional[Dict[str, Any]] = None, quant: str = "fp32",
                            compile: str = "auto", index: str = "none",
                            index_params: Optional[Dict[str, int]] = None,
                            overwrite: bool = False) -> Dict[str, Any]:
    """Write the package of the unsharded, weight-loaded retrieval ``model``; returns
    ``package.json``. ``index`` ``none`` still builds the HNSW index (retrieval needs one)."""
    import time

    from data.io import AtomicDirectory
    from data.marker import EXPORT_MARKER
    from trainer.package import (
        INDEX_FILE,
        ITEMS_FILE,
        PACKAGE_VERSION,
        example_inputs,
        save_program,
        write_package_files,
    )
    from trainer.topk import build_index, write_index

    if compile not in ("auto", "aoti", "none"):
        raise ValueError(f"--compile {compile!r} is not one of auto, aoti, none")
    target = AtomicDirectory(out, overwrite, marker=EXPORT_MARKER, what="export",
                             tool="trainer.export")
    model = model.eval()
    program = RetrievalUserProgram(model, quant)
    feats = program.features
    index_kind = "hnsw" if index == "none" else index
    params = dict(index_params or {})
    dim = int(model.ec.embedding_configs()[0].embedding_dim)
    info: Dict[str, Any] = {
        "version": PACKAGE_VERSION, "kind": KIND, "model": model_name, "step": step,
        "quantisation": quant, "torch": torch.__version__, "outputs": ["user"],
        "inputs": {"features": feats, "timestamps": False, "max_len": program.max_len,
                   "item_feature": program.item, "item_table": model.item_table,
                   "num_items": model.num_items, "dim": dim,
                   "user_vectors": int(model.tower.num_interests),
                   "dense": [f.name for f in schema.dense_features]},
        "index": {"kind": index_kind, "params": params}}
    args = example_inputs(schema, feats, max_len=program.max_len)
    with target as d:
        tmp = d.path
        save_program(program, args, tmp, compile, info)
        tables = program.model.ec.tables
        tower = program.model.encoder.item_tower
        if tower.has_features:
            # The item tower over every item: id row + each feature's rows (its lookup) + the
            # projection of its numeric features.
            feature_tables = {name: tables[item_feature_table(model.item_table, name)]
                              .dequantised() for name in tower.features}
            items = tower.matrix(tables[model.item_table].dequantised(), feature_tables)
            item_features_file(tower, {n: int(t.shape[0]) for n, t in
                                       feature_tables.items()}).save(tmp)
        else:
            items = F.normalize(tables[model.item_table].dequantised(), dim=-1)
            items[0] = 0.0
        torch.save({"items": items.contiguous()}, os.path.join(tmp, ITEMS_FILE))
        t = time.time()
        write_index(build_index(items, index_kind, params), os.path.join(tmp, INDEX_FILE))
        info["index_build_s"] = round(time.time() - t, 3)
        write_package_files(tmp, schema, preprocess, config_toml, info)
        d.commit()
    return info


def item_features_file(tower: Any, rows: Dict[str, int]) -> Any:
    """The item tower's lookups (and standardised numeric features) as
    :class:`data.item_features.ItemFeatures` (the package's ``item_features.parquet``: which
    features made ``items.pt``, checksummed like the rest)."""
    from data.item_features import ItemFeatures

    dense = {n: tower.dense_values[:, i].numpy() for i, n in enumerate(tower.dense_features)}
    return ItemFeatures({n: tower.lookup(n).numpy() for n in tower.features}, rows, dense)


class RetrievalPackage:
    """A retrieval package loaded for queries (verified manifest; torch + faiss only).

    ``info`` is ``package.json["inputs"]`` (``item_feature``, ``num_items``, ``dim``,
    ``user_vectors``, ``max_len``, ``features``)."""

    def __init__(self, directory: str, prefer_compiled: bool = True) -> None:
        from trainer.package import INDEX_FILE, ITEMS_FILE, PackageError, load_package
        from trainer.topk import read_index

        self.package = load_package(directory, prefer_compiled, load_index=False)
        if self.package.kind != KIND:
            raise PackageError(f"{directory} holds a {self.package.kind!r} package, not a "
                               f"retrieval one")
        self.info: Dict[str, Any] = dict(self.package.info["inputs"])
        self.items = torch.load(os.path.join(directory, ITEMS_FILE),
                                weights_only=True)["items"]
        self.index = read_index(os.path.join(directory, INDEX_FILE))

    def history(self, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        """(ids, lengths ``[B]``) of each row's history (the item feature), all of it."""
        jt = batch.sequence[self.info["item_feature"]]  # type: ignore[index]
        return jt.values().long(), jt.lengths().long()

    @torch.no_grad()
    def user_vectors(self, batch: Batch) -> torch.Tensor:
        """``[B, K, D]`` user vectors of a batch of the retrieval data path (the program on
        the pooled user features and the most recent ``max_len`` history ids)."""
        feats = self.info["features"]
        values, lengths = [], []
        for name in feats[:-1]:
            jt = batch.sparse[name]  # type: ignore[index]
            values.append(jt.values().long())
            lengths.append(jt.lengths().long())
        ids, ln = self.history(batch)
        _, ids, ln = truncate_recent_jagged(ids, ids, ln, int(self.info["max_len"]))
        values.append(ids)
        lengths.append(ln)
        out = torch.zeros(ln.numel(), int(self.info["user_vectors"]), int(self.info["dim"]))
        has = ln > 0
        if bool(has.all()):
            return self.package.run(batch.dense, values, lengths)
        if not bool(has.any()):
            return out
        # Rows without history get zero vectors; the program runs on the others.
        keep = has.nonzero().squeeze(1)
        sub_v, sub_l = [], []
        for v, l_ in zip(values, lengths):
            row = torch.repeat_interleave(torch.arange(l_.numel()), l_, output_size=v.numel())
            sub_v.append(v[has[row]])
            sub_l.append(l_[keep])
        out[keep] = self.package.run(batch.dense[keep], sub_v, sub_l)
        return out

    @torch.no_grad()
    def search(self, batch: Batch, k: int, exact: bool = False
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(item ids ``[B, k]``, scores ``[B, k]``): each row's ``k`` best items outside its
        history, an item's score being its best interest's inner product; through the index,
        or exact over ``items`` with ``exact``. Rows with fewer than ``k`` candidates are
        padded with id 0 and score −inf."""
        user = self.user_vectors(batch)
        hist, lengths = self.history(batch)
        return union_topk(user, self.items, self.index, hist, lengths, k, exact)


def union_topk(user: torch.Tensor, items: torch.Tensor, index: Any, hist: torch.Tensor,
               lengths: torch.Tensor, k: int, exact: bool
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of the union of each row's K vectors' neighbours (see
    :meth:`RetrievalPackage.search`); ``user [B, K, D]``, history jagged ``(hist, lengths)``."""
    b, kk, d = user.shape
    wide = k + (int(lengths.max()) if lengths.numel() else 0)
    flat = user.reshape(b * kk, d).float()
    if exact:
        scores = flat @ items.float().T
        scores[:, 0] = -float("inf")
        top = torch.topk(scores, min(wide, scores.shape[1] - 1), dim=1)
        s, ids = top.values.numpy(), top.indices.numpy()
    else:
        s, ids = index.search(np.ascontiguousarray(flat.numpy()), wide)
        ids = np.where(ids >= 0, ids, 0)
    s, ids = s.reshape(b, -1), ids.reshape(b, -1)
    offsets = np.concatenate(([0], np.cumsum(lengths.numpy())))
    hist_np = hist.numpy()
    out_ids = torch.zeros(b, k, dtype=torch.int64)
    out_s = torch.full((b, k), -float("inf"))
    for i in range(b):
        seen = set(hist_np[offsets[i]:offsets[i + 1]].tolist())
        best: Dict[int, float] = {}
        for sc, j in zip(s[i].tolist(), ids[i].tolist()):
            if j > 0 and j not in seen and sc > best.get(j, -float("inf")):
                best[j] = sc
        ranked = sorted(best, key=lambda j: -best[j])[:k]
        out_ids[i, :len(ranked)] = torch.tensor(ranked, dtype=torch.int64)
        out_s[i, :len(ranked)] = torch.tensor([best[j] for j in ranked])
    return out_ids, out_s
