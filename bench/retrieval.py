"""Retrieval benchmark: two-tower training throughput on 1 and 2 ranks, FAISS index build
time, and exact vs ANN query throughput at K=100.

``python -m bench.retrieval [--quick] [--out PATH]``:

* ``two_tower`` trained by the real trainer (``launch/configs/two_tower_synthetic.toml``) on
  the generated ``ci`` retrieval set (``--quick``: the ``tiny`` one, a few steps), 1 and 2
  gloo ranks; the rate is the ``final`` line's ``examples_per_s``;
* index build: an HNSW inner-product index (the one ``trainer.tasks.retrieval`` evaluates with)
  over 1M random unit vectors of width 64 (``--items``; ``--quick``: 5k);
* queries per second at K=100 over that corpus: exact (one matmul per chunk of queries and
  ``torch.topk``, all threads) vs the index's search; the ANN recall@100 of the exact top-100
  is printed beside it so speed is never read without its accuracy.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from data.cli import ArgumentParser
from bench.common import format_table, run_trainer, write_results
from data.synth.retrieval import RETRIEVAL_PRESETS, RetrievalSynthArgs, generate_retrieval
from trainer.tasks.retrieval import AnnIndex

CONFIG = "launch/configs/two_tower_synthetic.toml"


def train_rates(quick: bool, workdir: str) -> List[Dict[str, Any]]:
    preset = "tiny" if quick else "ci"
    data = os.path.join(workdir, f"retrieval_{preset}")
    generate_retrieval(data, RetrievalSynthArgs(**RETRIEVAL_PRESETS[preset]),  # type: ignore
                       progress=False)
    rows = []
    for ranks in (1, 2):
        overrides = [f"--data.path={data}", f"--training.run_dir={workdir}/run{ranks}",
                     "--checkpoint.save_at_end=false"]
        if quick:
            overrides += ["--training.steps=6", "--data.batch_size=64", "--training.log_every=3"]
        else:
            overrides += ["--training.epochs=1"]
        run = run_trainer(CONFIG, ranks, overrides, f"two_tower ({preset})")
        rows.append({"ranks": ranks, "examples_per_s": float(run.final["examples_per_s"]),
                     "recall@50": float(run.final["recall@50"])})
    return rows


def index_and_qps(items: int, dim: int, queries: int, k: int = 100) -> Dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    table = F.normalize(torch.randn(items, dim, generator=g), dim=-1)
    table[0] = 0.0  # the padding row, as in the item table
    q = F.normalize(table[torch.randint(1, items, (queries,), generator=g)]
                    + 0.5 * torch.randn(queries, dim, generator=g) / dim ** 0.5, dim=-1)
    index = AnnIndex(table)
    t0 = time.perf_counter()
    exact_ids = []
    for a in range(0, queries, 256):
        exact_ids.append(torch.topk(q[a:a + 256] @ table[1:].T, k, dim=1).indices + 1)
    exact_s = time.perf_counter() - t0
    exact = torch.cat(exact_ids).numpy()
    t0 = time.perf_counter()
    _, ann = index.search(q.numpy(), k)
    ann_s = time.perf_counter() - t0
    overlap = np.mean([len(set(a) & set(e)) / k for a, e in zip(ann.tolist(), exact.tolist())])
    return {"items": items, "dim": dim, "index_build_s": index.build_s,
            "exact_qps": queries / exact_s, "ann_qps": queries / ann_s,
            "ann_speedup": exact_s / ann_s, "ann_recall@100_of_exact": float(overlap)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = ArgumentParser(prog="python -m bench.retrieval", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--out", default=None, help="results JSON (default bench/results/)")
    p.add_argument("--items", type=int, default=1_000_000,
                   help="corpus size of the index build and the searches (default 1M)")
    p.add_argument("--skip-training", action="store_true",
                   help="only the index build and the searches")
    ns = p.parse_args(argv)
    rates: List[Dict[str, Any]] = []
    if not ns.skip_training:
        with tempfile.TemporaryDirectory() as work:
            rates = train_rates(ns.quick, work)
        # Printed now: the index build of a large corpus may take long on a loaded machine.
        print(format_table(rates, ["ranks", "examples_per_s", "recall@50"]), flush=True)
        print()
    search = index_and_qps(5_000 if ns.quick else ns.items, 64, 500 if ns.quick else 5000)
    print(format_table([search], ["items", "index_build_s", "exact_qps", "ann_qps",
                                  "ann_speedup", "ann_recall@100_of_exact"]))
    path = write_results("retrieval_quick" if ns.quick else "retrieval",
                         {"quick": ns.quick, "training": rates, "search": search}, ns.out)
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
