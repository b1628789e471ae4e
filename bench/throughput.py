"""Training throughput: shardrec vs plain torchrec vs plain PyTorch, in one run.

``python -m bench.throughput [--quick] [--grid 1e5x16,1e5x64,1e6x16,1e7x16:2]
[--ranks 1,2] [--batch-size 4096] [--profile [CONTENDERS]] [--out FILE]``

Contenders (same Criteo-like batches: 13 dense, 26 single-id Zipf features, one table each;
at 1e6 and 1e7 rows per table the embeddings dominate the step; 26 tables of 1e7 rows do
not fit in this machine's memory, so that size has 2 tables of 1e7 rows and 24 of 1e5):

* ``shardrec_deepfm`` (and ``_bf16``, and ``shardrec_dcn_v2`` once registered): our model,
  sharded by ``trainer.shard_and_optimize``, driven by ``TrainPipelineSparseDist``, fused row-wise
  Adagrad on the tables, Adam on dense;
* ``torchrec_dlrm``: torchrec's own ``DLRM`` with the same tables, pipeline and optimizers —
  the "plain torchrec" baseline (b); ratios are against it;
* ``plain_dense_adam`` / ``plain_sparse_adam`` (1 rank): one ``nn.EmbeddingBag`` per table,
  dense gradients + Adam, or sparse gradients + SparseAdam for the tables (baseline c).

MLP sizes are matched (DeepFM deep [512, 256] vs DLRM over-arch [512, 256]; dense
projections [512, 256]). Besides examples/s the run reports the deep MLP's achieved
fwd+bwd FLOP/s next to this machine's square-matmul FLOP/s, measured in the same run.
All pipeline contenders of one (size, rank count) share one set of spawned rank processes.
``--profile`` records, for the named contenders, where a step's CPU time goes
(``bench.common.profile_ops``: top-10 ops by self CPU time, the same time by part of the
step, and the pipeline's forward / backward / optimizer phases) into the JSON.

Mixed precision at equal quality (``precision`` in the JSON; ``--parts auc`` runs only this
part and updates it in an existing results file): shardrec DeepFM trained by the real
trainer (``launch/configs/deepfm_synthetic.toml``, 2 gloo ranks) on the synthetic CTR set
(``data.synth ctr``, preset ``ci``: 300k rows, 2 epochs), once with
``training.dense_dtype = "fp32"`` and once with ``"bf16"``, same seed and data: the eval AUC
of both (and the data's oracle AUC), their difference, and the trainer's examples/s.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from data.cli import ArgumentParser
from bench.common import (RESULTS_DIR, criteo_like_schema, format_table, make_batches,
                          matmul_flops, run_trainer, time_pipeline, time_repeated, write_results)
from data.batch import Batch
from data.synth.ctr import PRESETS, CTRSynthArgs, generate_ctr
from data.schema import Schema

DEEP_DIMS = [512, 256]
DENSE_DIMS = [512, 256]


class DLRMBaseline(nn.Module):
    """torchrec's ``DLRM`` behind our ``Batch`` interface, with BCE loss (the baseline)."""

    def __init__(self, schema: Schema, dim: int, device: str) -> None:
        super().__init__()
        from torchrec.models.dlrm import DLRM

        from models.blocks import build_ebc

        ebc = build_ebc(schema, device)
        self.dlrm = DLRM(embedding_bag_collection=ebc, dense_in_features=schema.dense_dim,
                         dense_arch_layer_sizes=DENSE_DIMS + [dim],
                         over_arch_layer_sizes=DEEP_DIMS + [1])
        self.loss_fn = nn.BCEWithLogitsLoss()

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
        logits = self.dlrm(batch.dense, batch.sparse).squeeze(-1)
        loss = self.loss_fn(logits, batch.labels)
        return loss, (loss.detach(), logits.detach(), batch.labels)


def build_contender(name: str, schema: Schema, dim: int, device_type: str) -> nn.Module:
    """The unsharded (meta-device embeddings) task model of a pipeline contender."""
    from models import get_model_spec
    from trainer.tasks.ctr import CTRTrain

    if name == "torchrec_dlrm":
        return DLRMBaseline(schema, dim, "meta")
    model_name, _, dtype = name.removeprefix("shardrec_").partition("_bf")
    spec = get_model_spec(model_name)
    overrides: Dict[str, Any] = {}
    fields = {f for f in spec.args_cls.__dataclass_fields__}
    if "deep_dims" in fields:
        overrides["deep_dims"] = DEEP_DIMS
    if "dense_dims" in fields:
        overrides["dense_dims"] = DENSE_DIMS
    args = spec.make_args("default", overrides)
    return CTRTrain(spec.build(schema, args, "meta"), "bf16" if dtype else "fp32", device_type)


def _pipeline_worker(ctx: Any, names: Sequence[str], rows: int, dim: int, big: Optional[int],
                     batch_size: int, steps: int, warmup: int, repeats: int,
                     profile: Sequence[str]) -> List[Dict[str, Any]]:
    """Every pipeline contender in turn in this one set of rank processes (a spawn costs
    seconds of imports; the contenders share them). Each is sharded and optimised by the
    trainer's own ``shard_and_optimize`` (row-wise Adagrad on the tables, Adam on dense)."""
    import gc

    out = []
    for name in names:
        torch.manual_seed(0)
        schema = criteo_like_schema(rows, dim, big_tables=big)
        res = time_pipeline(ctx, schema, build_contender(name, schema, dim, ctx.device.type),
                            batch_size, steps, warmup, repeats,
                            profile_steps=3 if name in profile else 0)
        out.append(res)
        gc.collect()  # the previous contender's tables go before the next one's are built
    return out


class PlainDeepFM(nn.Module):
    """Single-process DeepFM the way standalone CTR libraries write it: one
    ``nn.EmbeddingBag`` per table, fed per-feature (values, offsets)."""

    def __init__(self, schema: Schema, dim: int, sparse_grad: bool) -> None:
        super().__init__()
        from torchrec.modules.mlp import MLP

        from models.blocks import FactorizationMachine

        tables = list(schema.tables("sparse").values())
        self.bags = nn.ModuleList(nn.EmbeddingBag(t.num_embeddings, dim, mode="sum",
                                                  sparse=sparse_grad) for t in tables)
        self.dim = dim - 1
        fields = len(tables) + 1
        self.dense_proj = nn.Sequential(MLP(schema.dense_dim, DENSE_DIMS),
                                        nn.Linear(DENSE_DIMS[-1], self.dim))
        self.dense_linear = nn.Linear(schema.dense_dim, 1)
        self.fm = FactorizationMachine()
        self.deep = nn.Sequential(MLP(fields * self.dim, DEEP_DIMS), nn.Linear(DEEP_DIMS[-1], 1))
        self.loss_fn = nn.BCEWithLogitsLoss()

    def forward(self, dense: torch.Tensor, sparse: List[Tuple[torch.Tensor, torch.Tensor]],
                labels: torch.Tensor) -> torch.Tensor:
        emb = torch.stack([bag(v, o) for bag, (v, o) in zip(self.bags, sparse)], dim=1)
        vec = torch.cat([self.dense_proj(dense).unsqueeze(1), emb[:, :, : self.dim]], dim=1)
        logits = (emb[:, :, self.dim].sum(1) + self.dense_linear(dense).squeeze(1)
                  + self.fm(vec) + self.deep(vec.flatten(1)).squeeze(1))
        return self.loss_fn(logits, labels)


def plain_throughput(rows: int, dim: int, big: Optional[int], batch_size: int,
                     sparse_grad: bool, steps: int, warmup: int, repeats: int) -> float:
    torch.manual_seed(0)
    schema = criteo_like_schema(rows, dim, big_tables=big)
    model = PlainDeepFM(schema, dim, sparse_grad)
    bag_params = list(model.bags.parameters())
    bag_ids = {id(p) for p in bag_params}
    dense_params = [p for p in model.parameters() if id(p) not in bag_ids]
    if sparse_grad:
        opts: List[torch.optim.Optimizer] = [torch.optim.SparseAdam(bag_params, lr=1e-3),
                                             torch.optim.Adam(dense_params, lr=1e-3)]
    else:
        opts = [torch.optim.Adam(model.parameters(), lr=1e-3)]
    prepared = []
    for b in make_batches(schema, batch_size, 8):
        jts = b.sparse.to_dict()
        prepared.append((b.dense, [(jts[f.name].values(), jts[f.name].offsets()[:-1])
                                   for f in schema.sparse_features], b.labels))
    it = itertools.cycle(prepared)

    def step() -> None:
        dense, sparse, labels = next(it)
        for o in opts:
            o.zero_grad(set_to_none=True)
        model(dense, sparse, labels).backward()
        for o in opts:
            o.step()

    timing = time_repeated(step, steps, warmup, repeats)
    return batch_size * steps / timing.median_s


def mlp_flops(in_features: int, batch_size: int, dtype: torch.dtype = torch.float32) -> float:
    """Achieved fwd+bwd FLOP/s of the deep MLP alone at this batch size."""
    from torchrec.modules.mlp import MLP

    mlp = nn.Sequential(MLP(in_features, DEEP_DIMS), nn.Linear(DEEP_DIMS[-1], 1))
    x = torch.randn(batch_size, in_features, requires_grad=True)
    sizes = [in_features] + DEEP_DIMS + [1]
    flops = 3 * 2 * batch_size * sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = mlp(x).float().sum()
        out.backward()

    return flops * 5 / time_repeated(step, 5, 2, 3).median_s


def run(grid: Sequence[Tuple[int, int, Optional[int]]], ranks: Sequence[int], batch_size: int,
        steps: int, warmup: int, repeats: int, contenders: Sequence[str],
        profile: Sequence[str] = ()) -> Dict[str, Any]:
    from launch.spawn import run_ranks

    rows_out: List[Dict[str, Any]] = []
    profiles: List[Dict[str, Any]] = []
    pipelined = [n for n in contenders if not n.startswith("plain_")]
    for rows, dim, big in grid:
        tables = f"{big} x {rows:.0e} + {26 - big} x {min(rows, 100_000):.0e}" if big else \
            f"26 x {rows:.0e}"
        key = {"rows": rows, "dim": dim, "tables": tables}
        for world in ranks:
            if pipelined:
                res = run_ranks(_pipeline_worker, world, pipelined, rows, dim, big, batch_size,
                                steps, warmup, repeats, list(profile), cpu_threads=None,
                                timeout_s=3600)
                for name, r in zip(pipelined, res[0]):
                    rows_out.append({**key, "ranks": world, "contender": name,
                                     "examples_per_s": r["examples_per_s"]})
                    if "profile" in r:
                        profiles.append({**key, "ranks": world, "contender": name,
                                         **r["profile"]})
        # Plain PyTorch is single-process by construction: one rank with every core.
        torch.set_num_threads(os.cpu_count() or 1)
        for name in contenders:
            if name.startswith("plain_"):
                eps = plain_throughput(rows, dim, big, batch_size, name == "plain_sparse_adam",
                                       steps, warmup, repeats)
                rows_out.append({**key, "ranks": 1, "contender": name, "examples_per_s": eps})
    for r in rows_out:
        base = [b["examples_per_s"] for b in rows_out if b["contender"] == "torchrec_dlrm"
                and (b["tables"], b["dim"], b["ranks"]) == (r["tables"], r["dim"], r["ranks"])]
        if base:
            r["vs_torchrec_dlrm"] = r["examples_per_s"] / base[0]
    torch.set_num_threads(os.cpu_count() or 1)
    fields = 27
    peak = matmul_flops()
    peak_bf16 = matmul_flops(dtype=torch.bfloat16)
    mlp = [{"dim": dim, "in_features": fields * (dim - 1),
            "mlp_flops": mlp_flops(fields * (dim - 1), batch_size),
            "mlp_flops_bf16": mlp_flops(fields * (dim - 1), batch_size, torch.bfloat16)}
           for dim in sorted({d for _, d, _ in grid})]
    for m in mlp:
        m["fraction_of_matmul"] = m["mlp_flops"] / peak
        m["fraction_of_matmul_bf16"] = m["mlp_flops_bf16"] / peak_bf16
    return {"batch_size": batch_size, "steps": steps, "repeats": repeats, "results": rows_out,
            "matmul_flops": peak, "matmul_flops_bf16": peak_bf16, "mlp": mlp,
            "profiles": profiles}


def precision_auc(preset: str, epochs: float, ranks: int) -> List[Dict[str, Any]]:
    """Eval AUC and examples/s of shardrec DeepFM with fp32 and with bf16 dense compute, the
    same data and seed (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="bench_precision_") as work:
        data = os.path.join(work, "data")
        generate_ctr(data, CTRSynthArgs(**PRESETS[preset]), progress=False)  # type: ignore[arg-type]
        out = []
        for dtype in ("fp32", "bf16"):
            run = run_trainer("launch/configs/deepfm_synthetic.toml", ranks,
                              [f"--data.path={data}", f"--training.epochs={epochs}",
                               f"--training.dense_dtype={dtype}", "--training.seed=0",
                               f"--training.run_dir={os.path.join(work, dtype)}",
                               "--checkpoint.save_at_end=false"], f"deepfm {dtype}")
            out.append({"dense_dtype": dtype, "preset": preset, "epochs": epochs,
                        "ranks": ranks, "auc": float(run.final["auc"]),
                        "oracle_auc": float(run.final.get("oracle_auc", "nan")),
                        "examples_per_s": float(run.final["examples_per_s"])})
    for r in out:
        r["auc_minus_fp32"] = r["auc"] - out[0]["auc"]
        r["vs_fp32_speed"] = r["examples_per_s"] / out[0]["examples_per_s"]
    return out


def default_contenders() -> List[str]:
    from models import list_models

    names = ["torchrec_dlrm", "shardrec_deepfm", "shardrec_deepfm_bf16"]
    if "dcn_v2" in list_models():
        names.append("shardrec_dcn_v2")
    return names + ["plain_dense_adam", "plain_sparse_adam"]


def _grid(text: str) -> List[Tuple[int, int, Optional[int]]]:
    """``ROWSxDIM[:BIG]`` items: ``BIG`` tables of ``ROWS`` rows, the rest of 1e5 (all 26
    when ``:BIG`` is left out)."""
    out = []
    for item in text.split(","):
        size, _, big = item.partition(":")
        rows, _, dim = size.partition("x")
        out.append((int(float(rows)), int(dim), int(big) if big else None))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = ArgumentParser(prog="python -m bench.throughput", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny CI smoke run (< 1 minute)")
    p.add_argument("--grid", type=_grid, default=None,
                   help="ROWSxDIM[:BIG] list; BIG = how many of the 26 tables have ROWS rows, "
                        "the rest 1e5 (default 1e5x16,1e5x64,1e6x16,1e7x16:2)")
    p.add_argument("--ranks", default=None, help="comma-separated rank counts (default 1,2)")
    p.add_argument("--batch-size", type=int, default=None, help="per rank (default 4096)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per repetition")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions (median)")
    p.add_argument("--contenders", default=None, help="comma-separated subset")
    p.add_argument("--profile", nargs="?", const="shardrec_deepfm", default="",
                   help="also record torch.profiler's top-10 ops by self CPU time of these "
                        "comma-separated pipeline contenders (default shardrec_deepfm)")
    p.add_argument("--parts", default="grid,auc",
                   help="grid (examples/s of every contender), auc (fp32 vs bf16 eval AUC "
                        "through the trainer), or both; auc alone updates the existing "
                        "results file's precision part")
    p.add_argument("--out", default=None, help="JSON results path")
    ns = p.parse_args(argv)
    parts = set(ns.parts.split(","))
    if not parts or parts - {"grid", "auc"}:
        p.error(f"--parts takes grid and/or auc, got {ns.parts!r}")
    logging.basicConfig(level=logging.WARNING)
    if ns.quick:
        # CI smoke: every contender once, pipeline contenders on 2 ranks only (< 1 minute).
        grid, ranks, bs, steps, warmup, repeats = [(1000, 16, None)], [2], 256, 3, 1, 1
        auc_preset, auc_epochs, auc_ranks = "tiny", 1.0, 1
    else:
        # 26 tables of 1e7 x 16 fp32 (+ optimizer state) are 17 GB per copy: more than this
        # 24 GiB machine holds beside plain dense Adam's gradient and moments, so the 1e7 size
        # has 2 tables of 1e7 rows (1.3 GB) and 24 of 1e5 — still embedding-dominated.
        grid, ranks, bs, steps, warmup, repeats = (
            [(100_000, 16, None), (100_000, 64, None), (1_000_000, 16, None),
             (10_000_000, 16, 2)], [1, 2], 4096, 10, 4, 3)
        auc_preset, auc_epochs, auc_ranks = "ci", 2.0, 2
    grid = ns.grid or grid
    ranks = [int(r) for r in ns.ranks.split(",")] if ns.ranks else ranks
    bs = ns.batch_size or bs
    steps = ns.steps or steps
    repeats = ns.repeats or repeats
    contenders = ns.contenders.split(",") if ns.contenders else default_contenders()
    profile = [n for n in ns.profile.split(",") if n]
    name = "throughput_quick" if ns.quick else "throughput"
    if "grid" in parts:
        result = run(grid, ranks, bs, steps, warmup, repeats, contenders, profile)
    else:  # refresh the precision part of the last full results
        path = ns.out or os.path.join(RESULTS_DIR, f"{name}.json")
        try:
            with open(path) as fh:
                old = json.load(fh)
            result = {k: v for k, v in old.items() if k not in ("benchmark", "machine")}
            # The grid's own run record (date, load) stays with it; "machine" becomes the
            # record of this AUC run.
            result["grid_machine"] = old.get("grid_machine", old["machine"])
        except FileNotFoundError:
            p.error(f"--parts auc updates {path}, which does not exist: run the grid first "
                    "(or pass --out to the results file to update)")
    result["quick"] = ns.quick
    if "auc" in parts:
        result["precision"] = precision_auc(auc_preset, auc_epochs, auc_ranks)
    print(format_table(result["results"], ["tables", "dim", "ranks", "contender",
                                           "examples_per_s", "vs_torchrec_dlrm"]))
    for prof in result["profiles"]:
        print(f"\nprofile: {prof['contender']}, {prof['tables']} x {prof['dim']}, "
              f"{prof['ranks']} rank(s), rank 0, {prof['self_ms_per_step']:.1f} ms CPU per step")
        print(format_table(prof["categories"], ["category", "self_ms_per_step", "share"]))
        print(format_table(prof["top_ops"], ["op", "self_ms_per_step", "share",
                                             "calls_per_step"]))
    print()
    print(f"matmul FLOP/s: fp32 {result['matmul_flops']:.3g}, bf16 {result['matmul_flops_bf16']:.3g}")
    print(format_table(result["mlp"], ["dim", "in_features", "mlp_flops", "fraction_of_matmul",
                                       "mlp_flops_bf16", "fraction_of_matmul_bf16"]))
    if result.get("precision"):
        print("\nfp32 vs bf16 dense compute, shardrec DeepFM through the trainer:")
        print(format_table(result["precision"], ["dense_dtype", "preset", "epochs", "ranks",
                                                 "auc", "oracle_auc", "auc_minus_fp32",
                                                 "examples_per_s", "vs_fp32_speed"]))
    bad = [r for r in result["results"] if not math.isfinite(r["examples_per_s"])]
    bad += [r for r in result.get("precision", []) if not math.isfinite(r["auc"])]
    path = write_results(name, result, ns.out)
    print(f"\nresults: {path}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
