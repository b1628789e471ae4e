"""Export a retrieval model (``two_tower``, ``mind``) for serving: the plain weights plus
the item embeddings and a FAISS index built from them.

``python -m trainer.retrieval_export --checkpoint RUN/checkpoints/step_N --out DIR``

``DIR`` holds everything ``python -m trainer.export`` writes (``model.pt``, ``config.toml``,
``schema.json``, ``export.json``) and

* ``item_embeddings.npy``: float32 ``[num_items, D]``, the L2-normalised item table (the item
  tower's output for every id; row 0, the padding id, is zeros);
* ``item_index.faiss``: an HNSW inner-product index over rows ``1..num_items-1`` (FAISS id
  ``i`` is item ``i + 1``);
* ``retrieval.json``: model name, item feature, ``num_items``, ``D``, the user vectors per
  query (``K``) and the index parameters.

:class:`RetrievalServer` loads such a directory without a process group: the user tower
(the unsharded model with the exported weights) turns batches of the retrieval data path
into ``[B, K, D]`` user vectors, and :meth:`RetrievalServer.search` returns each row's top-k
items (the union of its K vectors' neighbours, best interest first, history excluded).
The whole directory is written under ``DIR.tmp-<pid>`` and renamed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from data.cli import ArgumentParser
from data.batch import Batch
from data.schema import load_schema
from models import get_model_spec
from models.retrieval import retrieval_item_spec
from trainer.tasks.retrieval import RetrievalTrain
from trainer.config import ConfigError
from trainer.export import MODEL_FILE, export_checkpoint
from trainer.tasks.retrieval import AnnIndex
from trainer.validation import load_checked_config

EMBEDDINGS_FILE = "item_embeddings.npy"
INDEX_FILE = "item_index.faiss"
INFO_FILE = "retrieval.json"


def _item_key(table: str) -> str:
    return f"model.ec.embeddings.{table}.weight"


def export_retrieval(checkpoint: str, out: str, overwrite: bool = False) -> Dict[str, Any]:
    """Write the retrieval export of ``checkpoint`` to ``out``; returns ``retrieval.json``."""
    import faiss

    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    cfg = load_checked_config(os.path.join(checkpoint, "config.toml"))
    spec = get_model_spec(cfg.model.name)
    if spec.task != "retrieval":
        raise ValueError(f"{checkpoint} holds model {cfg.model.name!r} (task {spec.task!r}); "
                         "this export is for retrieval models; use python -m trainer.export")
    tmp = f"{os.path.abspath(out)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        export_checkpoint(checkpoint, tmp, overwrite=True)
        weights = torch.load(os.path.join(tmp, MODEL_FILE), weights_only=True)
        schema = load_schema(tmp)
        args = spec.make_args(cfg.model.flavour, cfg.model.args)
        item = retrieval_item_spec(schema, args)
        table = item.table or item.name
        items = F.normalize(weights[_item_key(table)].float(), dim=-1)
        items[0] = 0.0
        index = AnnIndex(items)
        np.save(os.path.join(tmp, EMBEDDINGS_FILE), items.numpy().astype(np.float32))
        faiss.write_index(index.index, os.path.join(tmp, INDEX_FILE))
        info = {"model": cfg.model.name, "item_feature": item.name, "item_table": table,
                "num_items": int(items.shape[0]), "dim": int(items.shape[1]),
                "user_vectors": int(getattr(args, "num_interests", 1)),
                "index": {"type": "HNSWFlat", "metric": "inner_product", "m": 32,
                          "ef_search": int(index.index.hnsw.efSearch), "id_offset": 1},
                "index_build_s": round(index.build_s, 3)}
        with open(os.path.join(tmp, INFO_FILE), "w") as fh:
            json.dump(info, fh, indent=2)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


class RetrievalServer:
    """A retrieval export loaded for queries (see the module docstring).

    Example::

        server = RetrievalServer("exports/two_tower")
        ids, scores = server.search(batch, k=200)   # batch from trainer.tasks.retrieval's data path
    """

    def __init__(self, export_dir: str) -> None:
        import faiss

        with open(os.path.join(export_dir, INFO_FILE)) as fh:
            self.info = json.load(fh)
        cfg = load_checked_config(os.path.join(export_dir, "config.toml"))
        spec = get_model_spec(cfg.model.name)
        args = spec.make_args(cfg.model.flavour, cfg.model.args)
        schema = load_schema(export_dir)
        self.task = RetrievalTrain(spec.build(schema, args, "cpu"), args)
        weights = torch.load(os.path.join(export_dir, MODEL_FILE), weights_only=True)
        self.task.load_state_dict(weights)
        self.task.eval()
        self.items = torch.from_numpy(np.load(os.path.join(export_dir, EMBEDDINGS_FILE)))
        self.index = faiss.read_index(os.path.join(export_dir, INDEX_FILE))

    @torch.no_grad()
    def user_vectors(self, batch: Batch) -> torch.Tensor:
        """``[B, K, D]`` L2-normalised user vectors of ``batch``."""
        return self.task.model(batch).user

    @torch.no_grad()
    def search(self, batch: Batch, k: int, exact: bool = False
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(item ids ``[B, k]``, scores ``[B, k]``): each row's ``k`` best items outside its
        history, an item's score being its best interest's inner product; ANN through the
        index, or exact over ``item_embeddings`` with ``exact``. Rows with fewer than ``k``
        candidates found are padded with id 0 and score −inf."""
        enc = self.task.model(batch)
        user, hist, lengths = enc.user, enc.hist_ids, enc.hist_lengths
        b, kk, d = user.shape
        longest = int(lengths.max()) if lengths.numel() else 0
        wide = k + longest
        if exact:
            scores = torch.einsum("bkd,nd->bkn", user, self.items).reshape(b * kk, -1)
            scores[:, 0] = -float("inf")
            top = torch.topk(scores, min(wide, scores.shape[1] - 1), dim=1)
            s, ids = top.values.numpy(), top.indices.numpy()
        else:
            s, idx = self.index.search(np.ascontiguousarray(user.reshape(b * kk, d).numpy(),
                                                            dtype=np.float32), wide)
            ids = np.where(idx >= 0, idx + 1, 0)
        s, ids = s.reshape(b, -1), ids.reshape(b, -1)
        offsets = np.concatenate(([0], np.cumsum(lengths.numpy())))
        out_ids = torch.zeros(b, k, dtype=torch.int64)
        out_s = torch.full((b, k), -float("inf"))
        hist_np = hist.numpy()
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = ArgumentParser(prog="python -m trainer.retrieval_export", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a complete step_* checkpoint directory")
    p.add_argument("--out", required=True, help="export directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export")
    ns = p.parse_args(argv)
    try:
        info = export_retrieval(ns.checkpoint, ns.out, ns.overwrite)
    except (FileExistsError, ConfigError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {info['model']}: {info['num_items']} items x {info['dim']} with a FAISS "
          f"index to {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
