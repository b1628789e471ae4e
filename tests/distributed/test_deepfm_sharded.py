"""2-rank gloo: the sharded DeepFM computes exactly what the unsharded model computes."""

from __future__ import annotations

from typing import Dict

import torch

from data.reader import ParquetReader
from data.schema import Schema
from models import get_model_spec
from trainer.tasks.ctr import CTRTrain
from sharding.dist import DistContext
from sharding.parallel import shard_model
from sharding.sharders import apply_sparse_optimizer
from sharding.state import load_full_state
from launch.spawn import run_ranks


def _forward_parity(ctx: DistContext, data_dir: str) -> Dict[str, float]:
    schema = Schema.load(data_dir)
    spec = get_model_spec("deepfm")
    args = spec.make_args("small")
    torch.manual_seed(0)  # the same reference weights on every rank
    reference = CTRTrain(spec.build(schema, args, "cpu"))
    with torch.no_grad():
        for p in reference.parameters():  # non-trivial values everywhere
            p.uniform_(-0.3, 0.3)
    model = CTRTrain(spec.build(schema, args, "meta"))
    apply_sparse_optimizer(model, "rowwise_adagrad", 0.05)
    dmp, plan = shard_model(model, ctx, batch_size=64)
    load_full_state(dmp, reference.state_dict())
    reader = ParquetReader(data_dir, "train", 64, rank=ctx.rank, world_size=ctx.world_size,
                           prefetch=0, schema=schema)
    diffs = []
    for _, batch in zip(range(3), reader):
        with torch.no_grad():
            _, (_, sharded_logits, _) = dmp(batch)
            _, (_, ref_logits, _) = reference(batch)
        diffs.append(float((sharded_logits - ref_logits).abs().max()))
        scale = float(ref_logits.abs().max())
    types = sorted({ps.sharding_type for mp in plan.plan.values() for ps in mp.values()})  # type: ignore[union-attr]
    return {"max_diff": max(diffs), "scale": scale, "types": types}


def test_sharded_forward_equals_unsharded(tiny_ctr: str) -> None:
    results = run_ranks(_forward_parity, 2, tiny_ctr)
    for rank, r in enumerate(results):
        assert r["scale"] > 0.1, "reference logits are trivially small; the test could not fail"
        assert r["max_diff"] < 1e-4 * max(1.0, r["scale"]), (rank, r)
