"""Online scoring: ``python -m trainer.serve --package DIR --port P [--host 127.0.0.1]``.

An HTTP JSON server (aiohttp, the optional ``[serve]`` extra) over an inference package:

* ``GET /health`` → ``{"status": "ok", "model", "kind", "outputs", "compiled"}``;
* ``POST /score`` (CTR / multi-task packages) with ``{"rows": [{column: value, ...}, ...]}``
  → ``{"scores": [{"score": p} | {"score_<name>": p, ...}, ...]}`` in request order, plus the
  passthrough columns of each row. Rows are raw rows when the package stores preprocessing
  state (its raw columns), else rows in the dataset's column format (dense features as
  numbers, sparse / sequence features as lists of integer ids);
* ``POST /topk`` (sequential packages) with ``{"rows": [{<item feature>: [ids, oldest
  first], <timestamps column>: [...] (if the model uses time)}, ...], "k": 10,
  "search": "exact" | "ann"}`` → ``{"results": [{"items": [...], "scores": [...]}, ...]}``,
  history and padding excluded.

Malformed requests get ``400 {"error": ..., "field": "rows[3].d0"}`` naming the field.
Concurrent requests are micro-batched: a request's rows join a queue, and one worker runs
the program on up to ``--max-batch-rows`` queued rows at a time (waiting at most
``--max-wait-ms`` for more), so 64 concurrent one-row requests cost about one 64-row call.
SIGTERM / SIGINT stop accepting connections, finish the queued work and exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import torch

from data.cli import ArgumentParser
from trainer.package import Package, PackageError, load_package, run_inputs, table_inputs
from trainer.topk import ann_topk, exact_topk

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A malformed request: ``field`` names the offending part (``rows[3].d0``)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


# -- request rows → Arrow -------------------------------------------------------------------

def rows_table(pkg: Package, pre: Any, rows: Any, extra: Sequence[str] = ()) -> pa.Table:
    """The request's ``rows`` as an Arrow table the package's input path takes; raises
    :class:`RequestError` naming the first bad field."""
    if not isinstance(rows, list) or not rows:
        raise RequestError("'rows' must be a non-empty list of objects", "rows")
    if pre is not None:
        needed = list(pre.raw_columns())
        label_like = set(getattr(pre, "passthrough", []) or []) | {
            lab.name for lab in pkg.schema.labels}
        for i, r in enumerate(rows):
            if not isinstance(r, dict):
                raise RequestError(f"rows[{i}] must be an object", f"rows[{i}]")
            for c in needed:
                if c not in r and c not in label_like:
                    raise RequestError(f"rows[{i}] has no column {c!r}", f"rows[{i}].{c}")
        try:
            return pa.Table.from_pylist(rows)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise RequestError(f"rows do not form a table: {e}", "rows") from e
    cols: Dict[str, Any] = {}
    schema = pkg.schema
    specs: List[Tuple[str, str]] = [(f.name, "dense") for f in schema.dense_features]
    specs += [(n, "ids") for n in pkg.features]
    if pkg.info["inputs"].get("timestamps"):
        ts = schema.feature(pkg.features[0]).timestamps
        if ts:
            specs.append((ts, "ids"))
    for name, kind in specs:
        vals = []
        for i, r in enumerate(rows):
            if not isinstance(r, dict):
                raise RequestError(f"rows[{i}] must be an object", f"rows[{i}]")
            if name not in r:
                raise RequestError(f"rows[{i}] has no field {name!r}", f"rows[{i}].{name}")
            v = r[name]
            if kind == "dense":
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise RequestError(f"rows[{i}].{name} must be a number, got {v!r}",
                                       f"rows[{i}].{name}")
            elif not isinstance(v, list) or any(isinstance(x, bool) or not isinstance(x, int)
                                                for x in v):
                raise RequestError(f"rows[{i}].{name} must be a list of integer ids",
                                   f"rows[{i}].{name}")
            vals.append(v)
        cols[name] = pa.array(vals, type=pa.float32() if kind == "dense" else pa.list_(pa.int64()))
    for name in extra:
        cols[name] = pa.array([r.get(name) if isinstance(r, dict) else None for r in rows])
    return pa.table(cols)


# -- micro-batching -------------------------------------------------------------------------

@dataclass
class _Job:
    table: pa.Table
    k: int
    search: str
    future: "asyncio.Future[List[Dict[str, Any]]]"


class MicroBatcher:
    """Collects queued jobs into one program call (see the module docstring)."""

    def __init__(self, pkg: Package, pre: Any, max_batch_rows: int, max_wait_ms: float
                 ) -> None:
        self.pkg, self.pre = pkg, pre
        self.max_rows, self.max_wait = max_batch_rows, max_wait_ms / 1000
        self.queue: "asyncio.Queue[_Job]" = asyncio.Queue()
        self.batches = 0
        self.task: Optional["asyncio.Task[None]"] = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass

    async def submit(self, table: pa.Table, k: int = 0, search: str = "exact"
                     ) -> List[Dict[str, Any]]:
        fut: "asyncio.Future[List[Dict[str, Any]]]" = asyncio.get_running_loop().create_future()
        await self.queue.put(_Job(table, k, search, fut))
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            rows = jobs[0].table.num_rows
            deadline = loop.time() + self.max_wait
            while rows < self.max_rows:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), timeout)
                except asyncio.TimeoutError:
                    break
                jobs.append(job)
                rows += job.table.num_rows
            # Jobs of one top-K setting run together; others wait for the next round.
            head = (jobs[0].k, jobs[0].search)
            now = [j for j in jobs if (j.k, j.search) == head]
            for j in jobs:
                if (j.k, j.search) != head:
                    self.queue.put_nowait(j)
            try:
                results = await loop.run_in_executor(None, self._compute, now)
            except Exception as e:  # a bad row fails the jobs of its round, not the server
                for j in now:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            self.batches += 1
            for j, res in zip(now, results):
                if not j.future.done():
                    j.future.set_result(res)

    def _compute(self, jobs: List[_Job]) -> List[List[Dict[str, Any]]]:
        tables = [j.table for j in jobs]
        if self.pre is not None:
            tables = [self.pre.transform(t) for t in tables]
        common = [c for c in tables[0].column_names if all(c in t.column_names for t in tables)]
        table = pa.concat_tables([t.select(common) for t in tables])
        x = table_inputs(self.pkg, table, where="request")
        with torch.no_grad():
            y = run_inputs(self.pkg, x)
        out: List[Dict[str, Any]] = []
        if self.pkg.kind == "sequential":
            k, search = jobs[0].k, jobs[0].search
            hist_ids, hist_len = x.history  # type: ignore[misc]
            if search == "ann":
                s, i = ann_topk(self.pkg.index, y, k, hist_ids, hist_len)
            else:
                s, i = exact_topk(y, self.pkg.items, k, hist_ids, hist_len)  # type: ignore[arg-type]
            # No history, no user vector: nothing to recommend (rather than arbitrary items).
            out = [{"items": ii if n else [], "scores": ss if n else []}
                   for ii, ss, n in zip(i.tolist(), s.tolist(), x.lengths[0].tolist())]
        else:
            y_np = y.numpy().astype(np.float64)
            out = [{name: float(y_np[r, c]) for c, name in enumerate(self.pkg.outputs)}
                   for r in range(y_np.shape[0])]
        res, a = [], 0
        for t in tables:
            res.append(out[a:a + t.num_rows])
            a += t.num_rows
        return res


# -- the app --------------------------------------------------------------------------------

def build_app(pkg: Package, max_batch_rows: int = 512, max_wait_ms: float = 2.0) -> Any:
    """The aiohttp application serving ``pkg``."""
    from aiohttp import web

    pre = None
    if pkg.preprocess:
        from data.preprocess import Preprocessor

        pre = Preprocessor.from_state(pkg.preprocess)
    passthrough = list(getattr(pre, "passthrough", []) or [])
    batcher = MicroBatcher(pkg, pre, max_batch_rows, max_wait_ms)

    def bad(message: str, field: str) -> Any:
        return web.json_response({"error": message, "field": field}, status=400)

    async def body(request: Any) -> Dict[str, Any]:
        try:
            data = await request.json()
        except ValueError as e:
            raise RequestError(f"the body is not JSON: {e}", "body") from e
        if not isinstance(data, dict):
            raise RequestError("the body must be a JSON object", "body")
        return data

    async def health(request: Any) -> Any:
        return web.json_response({"status": "ok", "model": pkg.info["model"], "kind": pkg.kind,
                                  "outputs": pkg.outputs, "compiled": pkg.compiled,
                                  "batches": batcher.batches})

    async def score(request: Any) -> Any:
        if pkg.kind == "sequential":
            return bad("this package recommends items: POST /topk", "path")
        try:
            data = await body(request)
            table = rows_table(pkg, pre, data.get("rows"), passthrough)
            res = await batcher.submit(table)
        except RequestError as e:
            return bad(str(e), e.field)
        except (ValueError, KeyError) as e:  # ids out of range, bad values: names the column
            return bad(str(e), "rows")
        rows = data["rows"]
        for r, out in zip(rows, res):
            for c in passthrough:
                if c in r:
                    out[c] = r[c]
        return web.json_response({"scores": res})

    async def topk(request: Any) -> Any:
        if pkg.kind != "sequential":
            return bad("this package scores rows: POST /score", "path")
        try:
            data = await body(request)
            k = data.get("k", 10)
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 10_000:
                raise RequestError("'k' must be an integer in [1, 10000]", "k")
            search = data.get("search", "exact")
            if search not in ("exact", "ann"):
                raise RequestError("'search' must be 'exact' or 'ann'", "search")
            if search == "ann" and pkg.index is None:
                raise RequestError("the package has no FAISS index; use 'exact'", "search")
            table = rows_table(pkg, pre, data.get("rows"))
            res = await batcher.submit(table, k, search)
        except RequestError as e:
            return bad(str(e), e.field)
        except (ValueError, KeyError) as e:
            return bad(str(e), "rows")
        return web.json_response({"results": res})

    async def on_startup(app: Any) -> None:
        batcher.start()

    async def on_cleanup(app: Any) -> None:
        await batcher.stop()

    app = web.Application(client_max_size=64 << 20)
    app.add_routes([web.get("/health", health), web.post("/score", score),
                    web.post("/topk", topk)])
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = ArgumentParser(prog="python -m trainer.serve", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--package", required=True, help="inference package directory")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--max-batch-rows", type=int, default=512,
                   help="most rows one program call takes from the request queue")
    p.add_argument("--max-wait-ms", type=float, default=2.0,
                   help="how long the first queued request waits for others to batch with")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's)")
    ns = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        from aiohttp import web
    except ImportError:
        print("error: trainer.serve needs aiohttp: pip install -e '.[serve]'", file=sys.stderr)
        return 2
    if ns.threads:
        torch.set_num_threads(ns.threads)
    try:
        pkg = load_package(ns.package)
    except (PackageError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t = time.time()
    app = build_app(pkg, ns.max_batch_rows, ns.max_wait_ms)
    log.info("serving %s (%s) on http://%s:%d (loaded in %.1fs)", pkg.info["model"], pkg.kind,
             ns.host, ns.port, time.time() - t)
    # run_app turns SIGTERM/SIGINT into a graceful shutdown (on_cleanup stops the batcher).
    web.run_app(app, host=ns.host, port=ns.port, print=None, handle_signals=True,
                shutdown_timeout=5.0)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
