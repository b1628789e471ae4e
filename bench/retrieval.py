"""Retrieval benchmark: two-tower training throughput on 1 and 2 ranks, FAISS index build
time, and exact vs ANN query throughput at K=100.

``python -m bench.retrieval [--quick] [--out PATH]``:

* ``two_tower`` trained by the real trainer (``launch/configs/two_tower_synthetic.toml``) on
  the generated ``ci`` retrieval set (``--quick``: the ``tiny`` one, a few steps), 1 and 2
  gloo ranks; the rate is the ``final`` line's ``examples_per_s``;
* index build: FAISS HNSW (M 16, efConstruction 40) and IVF-Flat (nlist ≈ 4√N) inner-product
  indexes over a 1M-item catalogue of width 64 (``--items``; ``--quick``: 5k) shaped like
  learned item embeddings (a rank-16 latent plus noise: ``bench.serving.synthetic_catalogue``;
  isotropic random vectors would defeat any ANN index and say nothing about a catalogue);
* queries per second at K=100 over that corpus: exact (blocked matmul + top-k,
  ``trainer.topk.exact_topk``) vs each index at three search settings, with each one's recall
  of the exact top-100 beside it so speed is never read without its accuracy, and the fastest
  index at recall ≥ 0.95.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence


from data.cli import ArgumentParser
from bench.common import format_table, run_trainer, write_results
from data.synth.retrieval import RETRIEVAL_PRESETS, RetrievalSynthArgs, generate_retrieval
from bench.serving import bench_topk

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
    # Measured in one run: ranks split the machine's cores (one intra-op thread each under
    # torchrun on 2 cores), so on a small box this ratio is the all-gather's cost, not scaling.
    for row in rows:
        row["x_1_rank"] = round(row["examples_per_s"] / rows[0]["examples_per_s"], 3)
    return rows


def index_and_qps(items: int, queries: int, dim: int = 64, k: int = 100) -> Dict[str, Any]:
    """Index builds and exact vs ANN queries/s at ``k`` (:func:`bench.serving.bench_topk`)."""
    return bench_topk(items, queries, dim, k=k)


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
        print(format_table(rates, ["ranks", "examples_per_s", "x_1_rank", "recall@50"]),
              flush=True)
        print()
    search = index_and_qps(5_000 if ns.quick else ns.items, 500 if ns.quick else 2000)
    print(f"top-100 over {search['items']:,} items, {search['queries']} queries:")
    print(format_table(search["results"], ["method", "build_s", "qps", "recall@100",
                                           "speedup_vs_exact"]))
    best = search["best_ann_at_recall_0.95"]
    print("fastest index at recall@100 >= 0.95: "
          + (f"{best['method']}, {best['speedup_vs_exact']:.1f}x exact" if best else "none"))
    path = write_results("retrieval_quick" if ns.quick else "retrieval",
                         {"quick": ns.quick, "training": rates, "search": search}, ns.out)
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
