"""Top-K items for user vectors by inner product: exact (blocked matmul) or through FAISS.

Reusable by any model that ends in ``user [Q, D]`` · ``items [N, D]ᵀ`` (sequential models,
two-tower retrieval): the functions take the user-vector tensor and the item matrix / index.

* :func:`exact_topk`: scores ``[Q, block]`` item blocks at a time (memory ``O(Q·block)``),
  merging a running top-K; excluded (query, item) pairs and row 0 (padding) score ``-inf``;
* :func:`build_index` / :func:`ann_topk`: a FAISS ``IndexIVFFlat`` (``nlist``, ``nprobe``) or
  ``IndexHNSWFlat`` (``M``, ``efSearch``, ``efConstruction``) over the item matrix, inner
  product metric; a query asks for ``K + (its exclusions)`` candidates and drops the excluded;
* :func:`recall_at_k`: the fraction of the exact top-K the ANN top-K finds.

Shapes: users ``[Q, D]`` float32, items ``[N, D]``, exclusions as jagged ``(ids, lengths [Q])``;
results ``(scores [Q, K], ids [Q, K])`` int64 ids, ``-1`` / ``-inf`` where fewer than K items
remain.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

INDEX_KINDS = ("ivf_flat", "hnsw")


def _exclusion_pairs(lengths: torch.Tensor, ids: torch.Tensor) -> Tuple[torch.Tensor,
                                                                        torch.Tensor]:
    rows = torch.repeat_interleave(torch.arange(lengths.numel()), lengths.long(),
                                   output_size=ids.numel())
    return rows, ids.long()


@torch.no_grad()
def exact_topk(users: torch.Tensor, items: torch.Tensor, k: int,
               exclude_ids: Optional[torch.Tensor] = None,
               exclude_lengths: Optional[torch.Tensor] = None,
               skip_row0: bool = True, block: int = 65_536
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` of ``users @ items.T`` per row, excluding each row's ``exclude_ids``
    (jagged by ``exclude_lengths``) and, with ``skip_row0``, item 0 (padding)."""
    q, n = users.shape[0], items.shape[0]
    best_s = torch.full((q, 0), -torch.inf)
    best_i = torch.zeros((q, 0), dtype=torch.int64)
    if exclude_ids is not None and exclude_lengths is not None:
        xrow, xid = _exclusion_pairs(exclude_lengths, exclude_ids)
    else:
        xrow = xid = torch.zeros(0, dtype=torch.int64)
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        s = users.float() @ items[lo:hi].float().T  # [Q, hi - lo]
        inside = (xid >= lo) & (xid < hi)
        s[xrow[inside], xid[inside] - lo] = -torch.inf
        if skip_row0 and lo == 0:
            s[:, 0] = -torch.inf
        kk = min(k, hi - lo)
        ts, ti = torch.topk(s, kk, dim=1)
        cs, ci = torch.cat([best_s, ts], 1), torch.cat([best_i, ti + lo], 1)
        kk = min(k, cs.shape[1])
        best_s, pos = torch.topk(cs, kk, dim=1)
        best_i = torch.gather(ci, 1, pos)
    best_i = torch.where(torch.isinf(best_s), torch.full_like(best_i, -1), best_i)
    return best_s, best_i


def build_index(items: torch.Tensor, kind: str, params: Dict[str, int], skip_row0: bool = True,
                seed: int = 0) -> Any:
    """A FAISS inner-product index over ``items`` (row 0 left out with ``skip_row0``; ids are
    the row numbers). ``params``: ivf_flat ``nlist`` (default √N·4), ``nprobe`` (default 32);
    hnsw ``M`` (32), ``efConstruction`` (200), ``efSearch`` (128)."""
    import faiss

    if kind not in INDEX_KINDS:
        raise ValueError(f"index kind {kind!r} is not one of {list(INDEX_KINDS)}")
    x = np.ascontiguousarray(items.detach().float().numpy())
    ids = np.arange(x.shape[0], dtype=np.int64)
    if skip_row0:
        x, ids = x[1:], ids[1:]
    d = x.shape[1]
    if kind == "ivf_flat":
        nlist = int(params.get("nlist", max(1, min(int(4 * np.sqrt(len(x))), len(x) // 39 or 1))))
        quant = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quant, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(x)
        index.nprobe = int(params.get("nprobe", 32))
    else:
        index = faiss.IndexHNSWFlat(d, int(params.get("M", 32)), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(params.get("efConstruction", 200))
        index.hnsw.efSearch = int(params.get("efSearch", 128))
    wrapped = faiss.IndexIDMap2(index)
    wrapped.add_with_ids(x, ids)
    return wrapped


def set_search_params(index: Any, params: Dict[str, int]) -> None:
    """Apply query-time parameters (``nprobe`` / ``efSearch``) to a built or loaded index."""
    import faiss

    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    if "nprobe" in params and hasattr(inner, "nprobe"):
        inner.nprobe = int(params["nprobe"])
    if "efSearch" in params and hasattr(inner, "hnsw"):
        inner.hnsw.efSearch = int(params["efSearch"])


def write_index(index: Any, path: str) -> None:
    import faiss

    faiss.write_index(index, path)


def read_index(path: str) -> Any:
    import faiss

    return faiss.read_index(path)


@torch.no_grad()
def ann_topk(index: Any, users: torch.Tensor, k: int,
             exclude_ids: Optional[torch.Tensor] = None,
             exclude_lengths: Optional[torch.Tensor] = None
             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` from a FAISS index, each row's excluded ids removed (asks the index for
    ``k + max exclusions`` candidates so that ``k`` survive)."""
    q = users.shape[0]
    extra = int(exclude_lengths.max()) if exclude_lengths is not None and q else 0
    s, i = index.search(np.ascontiguousarray(users.float().numpy()), k + extra)
    s, i = torch.from_numpy(s), torch.from_numpy(i).long()
    if extra:
        xrow, xid = _exclusion_pairs(exclude_lengths, exclude_ids)  # type: ignore[arg-type]
        bad = torch.zeros_like(i, dtype=torch.bool)
        # (row, candidate) excluded when the candidate id is among the row's exclusions.
        key_x = xrow * (1 << 40) + xid
        key_c = torch.arange(q)[:, None] * (1 << 40) + i
        bad = torch.isin(key_c, key_x)
        s = torch.where(bad | (i < 0), torch.full_like(s, -torch.inf), s)
        s, pos = torch.sort(s, dim=1, descending=True, stable=True)
        i = torch.gather(i, 1, pos)[:, :k]
        s = s[:, :k]
    i = torch.where(torch.isinf(s) | (i < 0), torch.full_like(i, -1), i)
    return s, i


def recall_at_k(approx_ids: torch.Tensor, exact_ids: torch.Tensor) -> float:
    """Mean over rows of |approx ∩ exact| / |exact| (ids ``-1`` ignored)."""
    hits, total = 0, 0
    for a, e in zip(approx_ids.tolist(), exact_ids.tolist()):
        es = {x for x in e if x >= 0}
        hits += len(es & {x for x in a if x >= 0})
        total += len(es)
    return hits / max(total, 1)
