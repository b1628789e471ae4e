"""Batch scoring of raw rows with an inference package (``python -m trainer.predict
--package DIR --input FILE --out OUT``).

Rows stream through in chunks of ``chunk_rows`` (memory bounded by one chunk, whatever the
file size): raw CSV / TSV / parquet → the package's stored preprocessing
(``data.preprocess.Preprocessor.from_state``; a package without preprocessing state reads
parquet already in the dataset's column format) → program inputs → outputs appended to a
parquet file written under a temporary name and renamed at the end. Labels are optional.

Output columns: the passthrough id columns, ``row`` (0-based input row), then

* CTR / multi-task packages: one column per prediction (``score`` or ``score_<name>``);
* sequential packages with ``top_k``: ``items`` (``list<int64>``, best first, history and
  padding excluded) and ``scores`` (``list<float32>``), exact or from the package's FAISS
  index; empty for a row without history.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Dict, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trainer.package import Package, PackageError, run_inputs, table_inputs
from trainer.topk import ann_topk, exact_topk, recall_at_k

log = logging.getLogger(__name__)


class RawRows:
    """Chunks of rows in the dataset's column format, with their passthrough columns."""

    def __init__(self, pkg: Package, path: str, chunk_rows: int,
                 passthrough: Sequence[str] = ()) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--input {path} does not exist")
        self.pkg, self.path, self.chunk_rows = pkg, path, chunk_rows
        self.pre: Any = None
        if pkg.preprocess:
            try:
                from data.preprocess import Preprocessor
            except ImportError as e:
                raise PackageError(f"{pkg.directory} stores preprocessing state, which needs "
                                   f"data.preprocess ({e})") from e
            self.pre = Preprocessor.from_state(pkg.preprocess)
        self.passthrough = list(passthrough) or list(getattr(self.pre, "passthrough", []) or [])

    def __iter__(self) -> Iterator[pa.Table]:
        if self.pre is not None:
            for raw in self.pre.read_raw(self.path, self.chunk_rows):
                out = self.pre.transform(raw)
                for c in self.passthrough:
                    if c not in out.column_names and c in raw.column_names:
                        out = out.append_column(c, raw.column(c))
                yield out
            return
        if not self.path.endswith(".parquet"):
            raise PackageError(f"{self.pkg.directory} has no preprocessing state, so --input "
                               f"must be parquet in the dataset's column format; got "
                               f"{self.path}")
        pf = pq.ParquetFile(self.path)
        for rb in pf.iter_batches(batch_size=self.chunk_rows):
            yield pa.Table.from_batches([rb])


def _check_columns(table: pa.Table, names: Sequence[str], path: str) -> None:
    missing = [c for c in names if c not in table.column_names]
    if missing:
        raise PackageError(f"{path}: column(s) {missing} are missing; the package needs "
                           f"{list(names)}")


def score_file(pkg: Package, path: str, out: str, chunk_rows: int = 65_536,
               passthrough: Sequence[str] = (), top_k: int = 0, search: str = "exact",
               progress_every_s: float = 10.0, recall_rows: int = 10_000) -> Dict[str, float]:
    """Score every row of ``path`` into the parquet file ``out`` (see the module docstring);
    returns ``{"rows": N, "rows_per_s": ...}`` and, for ``search="ann"``, ``recall@K`` of
    the ANN top-K against the exact one over the first ``recall_rows`` rows."""
    if pkg.kind == "sequential" and top_k <= 0:
        raise PackageError("sequential packages recommend items: pass --top-k K")
    if pkg.kind != "sequential" and top_k > 0:
        raise PackageError(f"--top-k needs a sequential package; {pkg.directory} is "
                           f"{pkg.kind}")
    if search == "ann" and pkg.index is None:
        raise PackageError(f"--search ann: {pkg.directory} has no FAISS index; export with "
                           f"--index ivf_flat|hnsw")
    rows_in = RawRows(pkg, path, chunk_rows, passthrough)
    need = [f.name for f in pkg.schema.dense_features] + pkg.features
    if pkg.info["inputs"].get("timestamps"):
        ts = pkg.schema.feature(pkg.features[0]).timestamps
        need += [ts] if ts else []
    tmp = f"{out}.tmp-{os.getpid()}"
    writer: Optional[pq.ParquetWriter] = None
    t0 = last = time.time()
    done = checked = 0
    hits = 0.0
    try:
        for table in rows_in:
            _check_columns(table, need + list(rows_in.passthrough), path)
            x = table_inputs(pkg, table, where=path, first_row=done)
            cols: Dict[str, Any] = {c: table.column(c) for c in rows_in.passthrough}
            cols["row"] = pa.array(np.arange(done, done + x.rows, dtype=np.int64))
            y = run_inputs(pkg, x)
            if pkg.kind == "sequential":
                hist_ids, hist_len = x.history  # type: ignore[misc]
                if search == "ann":
                    s, i = ann_topk(pkg.index, y, top_k, hist_ids, hist_len)
                    if checked < recall_rows:
                        m = min(recall_rows - checked, x.rows)
                        nh = int(hist_len[:m].sum())
                        _, ei = exact_topk(y[:m], pkg.items, top_k, hist_ids[:nh],  # type: ignore[arg-type]
                                           hist_len[:m])
                        hits += recall_at_k(i[:m], ei) * m
                        checked += m
                else:
                    s, i = exact_topk(y, pkg.items, top_k, hist_ids, hist_len)  # type: ignore[arg-type]
                # Rows without history have no user vector: empty lists, not arbitrary items.
                has = (x.lengths[0] > 0).tolist()
                cols["items"] = pa.array([r if h else [] for r, h in zip(i.tolist(), has)],
                                         type=pa.list_(pa.int64()))
                cols["scores"] = pa.array([r if h else [] for r, h in zip(s.tolist(), has)],
                                          type=pa.list_(pa.float32()))
            else:
                for k, name in enumerate(pkg.outputs):
                    cols[name] = pa.array(y[:, k].numpy())
            batch = pa.table(cols)
            if writer is None:
                writer = pq.ParquetWriter(tmp, batch.schema)
            writer.write_table(batch)
            done += x.rows
            if time.time() - last >= progress_every_s:
                last = time.time()
                print(f"scored {done} rows ({done / (last - t0):.0f} rows/s)", file=sys.stderr)
        if writer is None:
            raise PackageError(f"{path} has no rows")
        writer.close()
        writer = None
        os.replace(tmp, out)
    finally:
        if writer is not None:
            writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
    dt = max(time.time() - t0, 1e-9)
    res = {"rows": float(done), "rows_per_s": done / dt}
    if search == "ann" and checked:
        res[f"recall@{top_k}"] = hits / checked
    return res
