"""2-rank gloo: every model of the zoo, sharded (EBC and, for InterFormer, DIN and DIEN, EC),
computes what the unsharded model computes, and trains (forward + backward + fused sparse
update; DIEN's loss includes its auxiliary loss)."""

from __future__ import annotations

from typing import Dict, List, Tuple

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

# (model, flavour, dataset fixture): the pooled-only models on multi-hot CTR data,
# InterFormer on behaviour sequences.
CASES: List[Tuple[str, str, str]] = [
    ("dcn_v2", "small", "ctr"), ("dcn_v2", "parallel", "ctr"),
    ("autoint", "small_plus", "ctr"), ("interformer", "small", "seq"),
    ("wide_deep", "small", "ctr"), ("dcn", "small", "ctr"), ("xdeepfm", "small", "ctr"),
    ("masknet", "small", "ctr"), ("masknet", "small_serial", "ctr"),
    ("din", "small", "seq"), ("dien", "small", "seq"),
]
#: models with a sequence EmbeddingCollection sharded beside their EmbeddingBagCollection.
WITH_EC = ("interformer/small", "din/small", "dien/small")


def _parity(ctx: DistContext, dirs: Dict[str, str]) -> Dict[str, Dict[str, object]]:
    results: Dict[str, Dict[str, object]] = {}
    for name, flavour, data in CASES:
        data_dir = dirs[data]
        schema = Schema.load(data_dir)
        spec = get_model_spec(name)
        args = spec.make_args(flavour)
        torch.manual_seed(0)  # the same reference weights on every rank
        reference = CTRTrain(spec.build(schema, args, "cpu"))
        with torch.no_grad():
            for p in reference.model.ebc.parameters():  # embeddings far from zero
                p.uniform_(-0.5, 0.5)
            if hasattr(reference.model, "ec"):
                for p in reference.model.ec.parameters():
                    p.uniform_(-0.5, 0.5)
        model = CTRTrain(spec.build(schema, args, "meta"))
        apply_sparse_optimizer(model, "rowwise_adagrad", 0.05)
        dmp, plan = shard_model(model, ctx, batch_size=32)
        load_full_state(dmp, reference.state_dict())
        reader = ParquetReader(data_dir, "train", 32, rank=ctx.rank,
                               world_size=ctx.world_size, prefetch=0, schema=schema)
        batches = [b for _, b in zip(range(2), reader)]
        diffs, scale = [], 0.0
        for batch in batches:
            with torch.no_grad():
                _, (_, sharded, _) = dmp(batch)
                _, (_, ref, _) = reference(batch)
            diffs.append(float((sharded - ref).abs().max()))
            scale = max(scale, float(ref.std()))
        # One training step through the sharded model: backward reaches the dense
        # parameters and the fused optimizer updates the tables.
        loss, _ = dmp(batches[0])
        loss.backward()
        grads = [p.grad for n, p in dmp.named_parameters() if p.grad is not None]
        with torch.no_grad():
            _, (_, after, _) = dmp(batches[0])
            _, (_, before, _) = reference(batches[0])
        results[f"{name}/{flavour}"] = {
            "max_diff": max(diffs), "scale": scale,
            "grads_finite": bool(grads) and all(bool(torch.isfinite(g).all()) for g in grads),
            "moved": float((after - before).abs().max()),
            "modules": sorted(plan.plan),  # type: ignore[union-attr]
            "types": sorted({ps.sharding_type for mp in plan.plan.values()  # type: ignore[union-attr]
                             for ps in mp.values()}),
        }
    return results


def test_every_model_sharded_equals_unsharded(tiny_ctr: str, tiny_seq: str) -> None:
    ranks = run_ranks(_parity, 2, {"ctr": tiny_ctr, "seq": tiny_seq}, timeout_s=420)
    for rank, results in enumerate(ranks):
        assert set(results) == {f"{n}/{f}" for n, f, _ in CASES}
        for case, r in results.items():
            assert r["scale"] > 1e-3, (rank, case, "reference logits are constant")
            assert r["max_diff"] < 1e-4 * max(1.0, r["scale"]), (rank, case, r)
            assert r["grads_finite"], (rank, case, r)
            assert r["moved"] > 1e-6, (rank, case, "a training step changed nothing")
        # The sequence models' EmbeddingCollection is sharded beside their EBC.
        for case in WITH_EC:
            assert results[case]["modules"] == ["model.ebc", "model.ec"], (case, results)
