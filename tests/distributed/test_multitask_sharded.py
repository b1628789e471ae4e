"""2-rank gloo: every multi-task head, sharded, computes what the unsharded head computes —
forward (all outputs, the multi-task loss) and backward (dense gradients equal the unsharded
model's, averaged over ranks as DDP does) — and a fused sparse update moves the tables."""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from data.reader import ParquetReader
from data.schema import Schema
from models import get_model_spec
from trainer.tasks.multitask import MultiTaskTrain
from sharding.dist import DistContext
from sharding.parallel import shard_model
from sharding.sharders import apply_sparse_optimizer
from launch.spawn import run_ranks
from sharding.state import load_full_state

# (case, head, flavour, overrides, data): every head on the DCN-v2 backbone, MMoE also on
# DeepFM and on InterFormer (pooled and sequence tables, EBC and EC sharded) over behaviour
# sequences, POSO with a dense and a sparse (its own sharded table) personalisation input.
CASES: List[Tuple[str, str, str, Dict[str, object], str]] = [
    ("shared_bottom", "shared_bottom", "default", {}, "ctr2"),
    ("mmoe", "mmoe", "deepfm", {"backbone_flavour": "small"}, "ctr2"),
    ("mmoe/interformer", "mmoe", "interformer", {}, "seq"),
    ("ple", "ple", "default", {}, "ctr2"),
    ("esmm", "esmm", "default", {}, "ctr2"),
    ("poso", "poso", "default", {"poso_dense": ["d0"], "poso_sparse": ["s1"]}, "ctr2"),
]


def _parity(ctx: DistContext, dirs: Dict[str, str]) -> Dict[str, Dict[str, object]]:
    results: Dict[str, Dict[str, object]] = {}
    for case, name, flavour, overrides, data in CASES:
        data_dir = dirs[data]
        schema = Schema.load(data_dir)
        spec = get_model_spec(name)
        args = spec.make_args(flavour, overrides)
        torch.manual_seed(0)  # the same reference weights on every rank
        reference = MultiTaskTrain(spec.build(schema, args, "cpu"))
        with torch.no_grad():
            for n, p in reference.named_parameters():
                if "embedding_bags" in n or "embeddings" in n:
                    p.uniform_(-0.5, 0.5)  # embeddings far from zero
                elif ".gates." in n and n.endswith("out.weight"):
                    p.normal_()  # POSO gates that depend on pc (fresh ones are constant)
        model = MultiTaskTrain(spec.build(schema, args, "meta"))
        apply_sparse_optimizer(model, "rowwise_adagrad", 0.05)
        dmp, plan = shard_model(model, ctx, batch_size=32)
        load_full_state(dmp, reference.state_dict())
        reader = ParquetReader(data_dir, "train", 32, rank=ctx.rank, world_size=ctx.world_size,
                               prefetch=0, schema=schema)
        batch = next(iter(reader))
        loss, (_, sharded, _) = dmp(batch)
        ref_loss, (_, ref, _) = reference(batch)
        loss.backward()
        ref_loss.backward()
        # DDP averages dense gradients over ranks: compare with the mean of the reference's.
        ref_grads = {n: p.grad.clone() for n, p in reference.named_parameters()
                     if p.grad is not None and "embedding_bags" not in n
                     and "embeddings" not in n}
        for g in ref_grads.values():
            torch.distributed.all_reduce(g)
            g /= ctx.world_size
        grad_diff, grad_scale, matched = 0.0, 0.0, 0
        for n, p in dmp.named_parameters():
            key = n.replace("_dmp_wrapped_module.", "").replace("module.", "")
            if key in ref_grads and p.grad is not None:
                grad_diff = max(grad_diff, float((p.grad - ref_grads[key]).abs().max()))
                grad_scale = max(grad_scale, float(ref_grads[key].abs().max()))
                matched += 1
        with torch.no_grad():
            _, (_, after, _) = dmp(batch)
        results[case] = {
            "max_diff": float((sharded - ref).abs().max()), "scale": float(ref.std()),
            "loss_diff": abs(float(loss) - float(ref_loss)),
            "outputs": int(sharded.shape[1]),
            "grad_diff": grad_diff, "grad_scale": grad_scale, "matched": matched,
            "dense": len(ref_grads),
            "moved": float((after - sharded.detach()).abs().max()),
            "modules": sorted(plan.plan),  # type: ignore[union-attr]
        }
    return results


def test_every_head_sharded_equals_unsharded(tiny_ctr2: str, tiny_seq: str) -> None:
    ranks = run_ranks(_parity, 2, {"ctr2": tiny_ctr2, "seq": tiny_seq}, timeout_s=420)
    for rank, results in enumerate(ranks):
        assert set(results) == {c[0] for c in CASES}
        for case, r in results.items():
            assert r["scale"] > 1e-3, (rank, case, "reference outputs are constant")
            assert r["max_diff"] < 1e-4 * max(1.0, r["scale"]), (rank, case, r)
            assert r["loss_diff"] < 1e-5, (rank, case, r)
            # Every dense parameter of the reference has a sharded twin with its gradient.
            assert r["matched"] == r["dense"] > 0, (rank, case, r)
            assert r["grad_diff"] < 1e-4 * max(1.0, r["grad_scale"]), (rank, case, r)
            assert r["moved"] > 1e-6, (rank, case, "the fused update changed nothing")
        assert results["esmm"]["outputs"] == 3
        assert results["mmoe/interformer"]["modules"] == ["model.backbone.ebc",
                                                          "model.backbone.ec"], results
        # POSO's own table for its sparse personalisation feature is sharded too.
        assert results["poso"]["modules"] == ["model.backbone.ebc", "model.poso_ebc"], results
