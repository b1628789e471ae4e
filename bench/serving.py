"""Serving benchmark: exported vs eager scoring, ANN vs exact top-K, int8 vs fp32 AUC.

``python -m bench.serving [--quick] [--threads N] [--items 1000000] [--parts scoring,topk,
quantisation] [--out FILE]``

One run measures, on this machine's cores:

1. **Scoring**: the unsharded DeepFM (26 Criteo-like single-id tables) three ways on the
   same inputs: eager (the training model: torchrec ``EmbeddingBagCollection`` + ``Batch``),
   the package's ``torch.export`` program (``model.pt2`` loaded with ``torch.export.load``),
   and its AOTInductor compilation (``model.aoti.pt2``, when the toolchain works).
   Throughput (rows/s) at batch 1 / 64 / 512 and p50 / p99 latency at batch 1 and 64.
   Goal: exported ≥ 1.3× eager throughput at batch 512.
2. **Top-K**: a synthetic clustered catalogue (``--items``, D = 64, L2-normalised) and
   queries near it: exact blocked matmul vs FAISS HNSW and IVF-Flat, QPS (queries/s, batch
   of queries) and recall@10 against exact. Goal: ANN ≥ 10× exact QPS at recall@10 ≥ 0.95.
3. **Quantisation**: DeepFM trained briefly (in-process, unsharded) on the planted synthetic
   CTR data; AUC of its package program with fp32, int8 and int4 tables on the eval split.
   Goal: int8 within 0.001 of fp32.

``--quick`` shrinks every part (smoke test). Results: ``bench/results/serving.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from data.cli import ArgumentParser
from bench.common import criteo_like_schema, format_table, make_batches, write_results

BATCHES = (1, 64, 512)


def _program_inputs(batch: Any, names: List[str]) -> tuple:
    d = batch.sparse.to_dict()
    return (batch.dense, [d[n].values() for n in names], [d[n].lengths().long() for n in names])


def _latencies(fn: Callable[[], Any], seconds: float, min_calls: int = 20) -> List[float]:
    for _ in range(3):
        fn()
    out: List[float] = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(out) < min_calls:
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def bench_scoring(rows: int, seconds: float, compile_aoti: bool, work: str,
                  min_calls: int = 20) -> Dict[str, Any]:
    from models import get_model_spec
    from trainer.package import load_package, write_package

    schema = criteo_like_schema(rows, 16)
    spec = get_model_spec("deepfm")
    torch.manual_seed(0)
    model = spec.build(schema, spec.make_args("default"), "cpu").eval()
    out = os.path.join(work, "deepfm_pkg")
    t = time.time()
    info = write_package(model, "ctr", schema, "", out, model_name="deepfm",
                         compile="auto" if compile_aoti else "none")
    pack_s = time.time() - t
    portable = load_package(out, prefer_compiled=False)
    contenders: Dict[str, Callable[[Any], Any]] = {
        "eager": lambda b: model(b[0]),
        "exported": lambda b: portable.program(*b[1]),
    }
    if info["compiled"]:
        compiled = load_package(out, prefer_compiled=True)
        contenders["aoti"] = lambda b: compiled.program(*b[1])
    names = portable.features
    results: List[Dict[str, Any]] = []
    for bs in BATCHES:
        batches = make_batches(schema, bs, 8, seed=bs)
        pairs = [(b, _program_inputs(b, names)) for b in batches]
        with torch.no_grad():
            ref = model(pairs[0][0])
            for name, fn in contenders.items():
                got = fn(pairs[0]).reshape(-1)
                # The program returns sigmoid(logit); eager returns the logit.
                err = float((got - torch.sigmoid(ref)).abs().max()) if name != "eager" else 0.0
                lat: List[float] = []
                # Interleave contenders by alternating batches (same inputs for all).
                k = 0

                def call() -> None:
                    nonlocal k
                    fn(pairs[k % len(pairs)])
                    k += 1

                lat = _latencies(call, seconds, min_calls)
                results.append({
                    "contender": name, "batch": bs, "rows_per_s": bs * len(lat) / sum(lat),
                    # batch / median latency: robust to stalls from other processes, which
                    # the mean-based rows_per_s is not on a shared machine.
                    "rows_per_s_p50": bs / statistics.median(lat),
                    "p50_ms": 1e3 * statistics.median(lat),
                    "p99_ms": 1e3 * float(np.percentile(lat, 99)), "max_abs_diff": err})
    by = {(r["contender"], r["batch"]): r for r in results}
    ratios = {f"{c}_vs_eager_b{bs}": by[(c, bs)]["rows_per_s"] / by[("eager", bs)]["rows_per_s"]
              for c in contenders if c != "eager" for bs in BATCHES}
    ratios.update({f"{c}_vs_eager_p50_b{bs}": by[(c, bs)]["rows_per_s_p50"]
                   / by[("eager", bs)]["rows_per_s_p50"]
                   for c in contenders if c != "eager" for bs in BATCHES})
    return {"rows_per_table": rows, "package_s": pack_s, "compiled": info["compiled"],
            "results": results, "ratios": ratios}


def bench_topk(items: int, queries: int, dim: int = 64, seed: int = 0) -> Dict[str, Any]:
    from trainer.topk import ann_topk, build_index, exact_topk, recall_at_k

    from trainer.topk import set_search_params

    # Learned item embeddings have a low intrinsic dimension: a rank-16 latent mapped to D,
    # plus a little noise (isotropic random vectors in 64-d would make any ANN index fail
    # and say nothing about real catalogues).
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(16, dim, generator=g)
    cat = F.normalize(torch.randn(items, 16, generator=g) @ proj
                      + 0.3 * torch.randn(items, dim, generator=g), dim=-1)
    users = F.normalize(cat[torch.randint(1, items, (queries,), generator=g)]
                        + 0.1 * torch.randn(queries, dim, generator=g), dim=-1)
    t = time.perf_counter()
    _, exact = exact_topk(users, cat, 10)
    exact_s = time.perf_counter() - t
    rows = [{"method": "exact", "qps": queries / exact_s, "recall@10": 1.0, "build_s": 0.0}]
    builds = [("hnsw", {"M": 16, "efConstruction": 40}, [{"efSearch": 16}, {"efSearch": 32},
                                                          {"efSearch": 64}]),
              ("ivf_flat", {"nlist": max(16, min(int(4 * np.sqrt(items)), items // 39))},
               [{"nprobe": 8}, {"nprobe": 32}, {"nprobe": 64}])]
    for kind, params, searches in builds:
        t = time.perf_counter()
        index = build_index(cat, kind, params)
        build_s = time.perf_counter() - t
        for sp in searches:
            set_search_params(index, sp)
            t = time.perf_counter()
            _, ann = ann_topk(index, users, 10)
            s = time.perf_counter() - t
            rows.append({"method": f"{kind} {dict(params, **sp)}", "qps": queries / s,
                         "recall@10": recall_at_k(ann, exact), "build_s": build_s})
    for r in rows:
        r["speedup_vs_exact"] = r["qps"] / rows[0]["qps"]
    best = max((r for r in rows[1:] if r["recall@10"] >= 0.95),
               key=lambda r: r["speedup_vs_exact"], default=None)
    return {"items": items, "queries": queries, "dim": dim, "results": rows,
            "best_ann_at_recall_0.95": best}


def bench_quantisation(preset: str, steps: int, work: str) -> Dict[str, Any]:
    from data.reader import ParquetReader
    from data.schema import Schema, load_meta
    from data.synth.ctr import PRESETS, CTRSynthArgs, generate_ctr
    from models import get_model_spec
    from trainer.tasks.ctr import CTRTrain
    from trainer.export import quantisation_auc

    data = os.path.join(work, f"ctr_{preset}")
    generate_ctr(data, CTRSynthArgs(**PRESETS[preset]))  # type: ignore[arg-type]
    schema = Schema.load(data)
    spec = get_model_spec("deepfm")
    torch.manual_seed(0)
    model = spec.build(schema, spec.make_args("default"), "cpu")
    task = CTRTrain(model).train()
    opt = torch.optim.Adam(task.parameters(), lr=3e-3)
    done = 0
    while done < steps:
        for batch in ParquetReader(data, "train", 1024, schema=schema, shuffle=True):
            loss, _ = task(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done >= steps:
                break
    model.eval()
    out: Dict[str, Any] = {"preset": preset, "train_steps": steps,
                           "oracle_auc": load_meta(data).get("oracle", {}).get("auc")}
    for quant in ("int8", "int4"):
        out[quant] = quantisation_auc(model, "ctr", schema, data, quant)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = ArgumentParser(prog="python -m bench.serving", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--items", type=int, default=1_000_000, help="top-K catalogue size")
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--no-aoti", action="store_true", help="skip the AOTInductor contender")
    p.add_argument("--parts", default="scoring,topk,quantisation",
                   help="comma-separated parts to run (scoring, topk, quantisation)")
    p.add_argument("--out", default=None, help="result file (default bench/results/serving.json)")
    ns = p.parse_args(argv)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    quick = ns.quick
    parts = {x.strip() for x in ns.parts.split(",") if x.strip()}
    unknown = parts - {"scoring", "topk", "quantisation"}
    if unknown:
        print(f"error: --parts {sorted(unknown)}: choose from scoring, topk, quantisation",
              file=sys.stderr)
        return 2
    res: Dict[str, Any] = {"quick": quick, "threads": torch.get_num_threads(),
                           "load_average": list(os.getloadavg())}
    with tempfile.TemporaryDirectory() as work:
        # --quick: a smoke test (tens of seconds): every part runs, on tiny sizes.
        if "scoring" in parts:
            res["scoring"] = bench_scoring(2_000 if quick else 100_000, 0.05 if quick else 3.0,
                                           not (quick or ns.no_aoti), work, 3 if quick else 20)
        if "topk" in parts:
            res["topk"] = bench_topk(5_000 if quick else ns.items,
                                     200 if quick else ns.queries)
        if "quantisation" in parts:
            res["quantisation"] = bench_quantisation("tiny" if quick else "ci",
                                                     10 if quick else 600, work)
    res["load_average_end"] = list(os.getloadavg())
    if "scoring" in res:
        print(format_table(res["scoring"]["results"],
                           ["contender", "batch", "rows_per_s", "rows_per_s_p50", "p50_ms",
                            "p99_ms", "max_abs_diff"]))
        print(" ".join(f"{k}={v:.2f}" for k, v in res["scoring"]["ratios"].items()))
    if "topk" in res:
        print(format_table(res["topk"]["results"], ["method", "qps", "recall@10",
                                                    "speedup_vs_exact", "build_s"]))
    for q in ("int8", "int4") if "quantisation" in res else ():
        print(f"{q}: " + " ".join(f"{k}={v:.5f}" for k, v in res["quantisation"][q].items()))
    print("load average " + " -> ".join(
        "/".join(f"{x:.1f}" for x in res[k]) for k in ("load_average", "load_average_end")))
    path = write_results("serving", res, ns.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
