"""Training throughput: shardrec vs plain torchrec vs plain PyTorch, in one run.

``python -m bench.throughput [--quick] [--grid 100000x16,100000x64,1000000x16]
[--ranks 1,2] [--batch-size 4096]``

Contenders (same Criteo-like batches: 13 dense, 26 single-id Zipf features, one table each):

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
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from bench.common import (criteo_like_schema, format_table, make_batches, matmul_flops,
                          time_repeated, write_results)
from data.batch import Batch
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
    from models.blocks import CTRTask

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
    return CTRTask(spec.build(schema, args, "meta"), "bf16" if dtype else "fp32", device_type)


def _pipeline_worker(ctx: Any, name: str, rows: int, dim: int, batch_size: int, steps: int,
                     warmup: int, repeats: int) -> Dict[str, float]:
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from trainer.config import Config
    from trainer.trainer import shard_and_optimize

    torch.manual_seed(0)
    schema = criteo_like_schema(rows, dim)
    cfg = Config()
    cfg.data.batch_size = batch_size
    # Every contender goes through the trainer's own sharding and optimizer set-up
    # (row-wise Adagrad on the tables, Adam on dense).
    dmp, optimizer = shard_and_optimize(cfg, ctx, schema,
                                        build_contender(name, schema, dim, ctx.device.type))
    pipeline = TrainPipelineSparseDist(dmp, optimizer, ctx.device)
    batches = make_batches(schema, batch_size, 8, seed=ctx.rank)
    it = itertools.cycle(batches)
    timing = time_repeated(lambda: pipeline.progress(it), steps, warmup, repeats)
    return {"examples_per_s": batch_size * ctx.world_size * steps / timing.median_s}


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


def plain_throughput(rows: int, dim: int, batch_size: int, sparse_grad: bool, steps: int,
                     warmup: int, repeats: int) -> float:
    torch.manual_seed(0)
    schema = criteo_like_schema(rows, dim)
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


def run(grid: Sequence[Tuple[int, int]], ranks: Sequence[int], batch_size: int, steps: int,
        warmup: int, repeats: int, contenders: Sequence[str]) -> Dict[str, Any]:
    from sharding.spawn import run_ranks

    rows_out: List[Dict[str, Any]] = []
    for rows, dim in grid:
        for world in ranks:
            for name in contenders:
                if name.startswith("plain_"):
                    continue
                res = run_ranks(_pipeline_worker, world, name, rows, dim, batch_size, steps,
                                warmup, repeats, cpu_threads=None, timeout_s=1800)
                rows_out.append({"rows": rows, "dim": dim, "ranks": world, "contender": name,
                                 "examples_per_s": res[0]["examples_per_s"]})
        # Plain PyTorch is single-process by construction: one rank with every core.
        torch.set_num_threads(os.cpu_count() or 1)
        for name in contenders:
            if name.startswith("plain_"):
                eps = plain_throughput(rows, dim, batch_size, name == "plain_sparse_adam",
                                       steps, warmup, repeats)
                rows_out.append({"rows": rows, "dim": dim, "ranks": 1, "contender": name,
                                 "examples_per_s": eps})
    for r in rows_out:
        base = [b["examples_per_s"] for b in rows_out if b["contender"] == "torchrec_dlrm"
                and (b["rows"], b["dim"], b["ranks"]) == (r["rows"], r["dim"], r["ranks"])]
        if base:
            r["vs_torchrec_dlrm"] = r["examples_per_s"] / base[0]
    torch.set_num_threads(os.cpu_count() or 1)
    fields = 27
    peak = matmul_flops()
    peak_bf16 = matmul_flops(dtype=torch.bfloat16)
    mlp = [{"dim": dim, "in_features": fields * (dim - 1),
            "mlp_flops": mlp_flops(fields * (dim - 1), batch_size),
            "mlp_flops_bf16": mlp_flops(fields * (dim - 1), batch_size, torch.bfloat16)}
           for dim in sorted({d for _, d in grid})]
    for m in mlp:
        m["fraction_of_matmul"] = m["mlp_flops"] / peak
        m["fraction_of_matmul_bf16"] = m["mlp_flops_bf16"] / peak_bf16
    return {"batch_size": batch_size, "steps": steps, "repeats": repeats, "results": rows_out,
            "matmul_flops": peak, "matmul_flops_bf16": peak_bf16, "mlp": mlp}


def default_contenders() -> List[str]:
    from models import list_models

    names = ["torchrec_dlrm", "shardrec_deepfm", "shardrec_deepfm_bf16"]
    if "dcn_v2" in list_models():
        names.append("shardrec_dcn_v2")
    return names + ["plain_dense_adam", "plain_sparse_adam"]


def _grid(text: str) -> List[Tuple[int, int]]:
    out = []
    for item in text.split(","):
        rows, _, dim = item.partition("x")
        out.append((int(float(rows)), int(dim)))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny CI smoke run (< 1 minute)")
    p.add_argument("--grid", type=_grid, default=None,
                   help="ROWSxDIM list (default 100000x16,100000x64,1000000x16)")
    p.add_argument("--ranks", default=None, help="comma-separated rank counts (default 1,2)")
    p.add_argument("--batch-size", type=int, default=None, help="per rank (default 4096)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per repetition")
    p.add_argument("--contenders", default=None, help="comma-separated subset")
    p.add_argument("--out", default=None, help="JSON results path")
    ns = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if ns.quick:
        # CI smoke: every contender once, pipeline contenders on 2 ranks only (< 1 minute).
        grid, ranks, bs, steps, warmup, repeats = [(1000, 16)], [2], 256, 3, 1, 1
    else:
        grid, ranks, bs, steps, warmup, repeats = (
            [(100_000, 16), (100_000, 64), (1_000_000, 16)], [1, 2], 4096, 10, 4, 3)
    grid = ns.grid or grid
    ranks = [int(r) for r in ns.ranks.split(",")] if ns.ranks else ranks
    bs = ns.batch_size or bs
    steps = ns.steps or steps
    contenders = ns.contenders.split(",") if ns.contenders else default_contenders()
    result = run(grid, ranks, bs, steps, warmup, repeats, contenders)
    result["quick"] = ns.quick
    print(format_table(result["results"], ["rows", "dim", "ranks", "contender",
                                           "examples_per_s", "vs_torchrec_dlrm"]))
    print()
    print(f"matmul FLOP/s: fp32 {result['matmul_flops']:.3g}, bf16 {result['matmul_flops_bf16']:.3g}")
    print(format_table(result["mlp"], ["dim", "in_features", "mlp_flops", "fraction_of_matmul",
                                       "mlp_flops_bf16", "fraction_of_matmul_bf16"]))
    bad = [r for r in result["results"] if not math.isfinite(r["examples_per_s"])]
    path = write_results("throughput_quick" if ns.quick else "throughput", result, ns.out)
    print(f"\nresults: {path}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
