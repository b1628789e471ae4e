"""2-rank gloo: the retrieval models sharded (item table and item feature tables row-wise
over both ranks, user table placed by the planner) against one process holding the
concatenated batch.

For ``two_tower`` (item tower = id + ``category`` + ``brand`` rows + the projected numeric
``log_popularity``, the data's item features)
and ``mind`` (id only; label-aware attention towards every candidate, spread routing), on
each rank's 32-row batch:

* the mean of the two ranks' losses — each rank's softmax over **both** ranks' in-batch
  positives and uniform negatives, all-gathered — equals the single-process loss over the
  64-row concatenated batch (the cross-rank in-batch loss);
* the dense (user tower) gradients, DDP-averaged, equal the reference's gradients of that loss;
* one fused SGD step moves every item row (and item feature row) exactly as SGD on the
  concatenated batch's loss (the all-gather's backward returns every rank's gradient of an
  in-batch item to the rank that looked it up, so rows seen only through another rank's
  softmax move too).
"""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data.batch import Batch
from data.item_features import ItemFeatures
from data.reader import ParquetReader
from data.schema import Schema
from data.synth.retrieval import RETRIEVAL_PRESETS, RetrievalSynthArgs, generate_retrieval
from models import get_model_spec
from trainer.tasks.retrieval import RetrievalTrain
from sharding.dist import DistContext
from sharding.parallel import shard_model
from sharding.sharders import apply_sparse_optimizer
from launch.spawn import run_ranks
from sharding.state import _strip, load_full_state
from trainer.tasks.retrieval import (
    RetrievalBatches,
    all_gather_rows,
    positive_counts,
    standardise_items,
)
from trainer.tasks.sequential import local_item_shards

LR = 0.5


def _concat_kjt(parts: List[KeyedJaggedTensor]) -> KeyedJaggedTensor:
    keys = parts[0].keys()
    values, lengths = [], []
    for k in keys:
        for p in parts:
            values.append(p[k].values())
            lengths.append(p[k].lengths())
    return KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))


def _concat(batches: List[Batch]) -> Batch:
    return Batch(dense=torch.cat([b.dense for b in batches]),
                 sparse=_concat_kjt([b.sparse for b in batches]),
                 labels=torch.cat([b.labels for b in batches]),
                 sequence=_concat_kjt([b.sequence for b in batches]))  # type: ignore[misc]


def _parity(ctx: DistContext, data_dir: str, name: str) -> Dict[str, Any]:
    schema = Schema.load(data_dir)
    spec = get_model_spec(name)
    overrides: Dict[str, Any] = {"num_negatives": 8, "hidden": [16], "embedding_dim": 16}
    lookups: Dict[str, Any] = {}
    if name == "mind":
        # the shipped mind_synthetic settings: every candidate scored by its own label-aware
        # attention over the interests (the paper's positive-only mix scores like two_tower)
        overrides.update(num_interests=3, label_attention="candidate", routing_init="spread",
                         routing_scale=10.0, attention_sharpness=20.0)
    else:
        feats = ItemFeatures.load(data_dir)
        assert feats is not None
        lookups = feats.tables
        overrides["item_features"] = list(lookups)
        overrides["item_feature_rows"] = [feats.rows[n] for n in lookups]
        overrides["item_dense_features"] = feats.dense_names  # log_popularity
        dense = torch.from_numpy(standardise_items(np.stack(list(feats.dense.values()), 1)))
    tables = ["item"] + [f"item_{n}" for n in lookups]
    args = spec.make_args("default", overrides)
    counts = positive_counts(data_dir, "train", "item_seq", 121)
    torch.manual_seed(0)
    reference = RetrievalTrain(spec.build(schema, args, "cpu"), args)
    reference.loss.set_frequencies(counts)
    reference.model.item_tower.set_lookups({k: torch.from_numpy(v) for k, v in lookups.items()})
    with torch.no_grad():
        for n, p in reference.named_parameters():
            if ".ec." in n or ".ebc." in n:
                p.uniform_(-0.5, 0.5)
    model = RetrievalTrain(spec.build(schema, args, "meta"), args)
    model.loss.set_frequencies(counts)
    model.loss.gather = all_gather_rows
    model.model.item_tower.set_lookups({k: torch.from_numpy(v) for k, v in lookups.items()})
    if name == "two_tower":
        # the numeric feature's projection (zero when built) non-zero, so it shapes the loss
        for m in (reference, model):
            m.model.item_tower.set_dense(dense)
        with torch.no_grad():
            reference.model.item_tower.dense.weight.uniform_(-0.5, 0.5)
    apply_sparse_optimizer(model, "sgd", LR)
    dmp, plan = shard_model(model, ctx, batch_size=32, constraints={
        t: ParameterConstraints(sharding_types=["row_wise"]) for t in tables})
    load_full_state(dmp, reference.state_dict())

    def batch(rank: int) -> Batch:
        reader = ParquetReader(data_dir, "train", 32, rank=rank, world_size=ctx.world_size,
                               prefetch=0, schema=schema, shuffle=False,
                               transform=RetrievalBatches("item_seq", 121, 8, 0, "train",
                                                          lookups))
        return next(iter(reader))

    loss, _ = dmp(batch(ctx.rank))
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= ctx.world_size

    ref_loss, _ = reference(_concat([batch(r) for r in range(ctx.world_size)]))
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters()
                 if p.grad is not None and ".ec." not in n and ".ebc." not in n}
    grad_diff = max(float((p.grad - ref_grads[_strip(n)]).abs().max())
                    for n, p in dmp.named_parameters()
                    if p.grad is not None and _strip(n) in ref_grads)
    checked = [_strip(n) for n, p in dmp.named_parameters()
               if p.grad is not None and _strip(n) in ref_grads]
    dense_checked = len(checked)
    step_diff, moved = 0.0, {}
    for table in tables:
        w = reference.model.ec.embeddings[table].weight
        stepped = (w - LR * w.grad).detach()
        moved[table] = 0.0
        for off, shard in local_item_shards(dmp, table):
            step_diff = max(step_diff, float((shard - stepped[off:off + shard.shape[0]])
                                             .abs().max()))
            moved[table] = max(moved[table], float((shard - w[off:off + shard.shape[0]])
                                                   .abs().max()))
    return {"loss": float(mean_loss), "ref_loss": float(ref_loss), "grad_diff": grad_diff,
            "dense_checked": dense_checked, "checked": checked, "step_diff": step_diff, "moved": moved,
            "types": sorted({ps.sharding_type for m in plan.plan.values()  # type: ignore
                             for ps in m.values()})}


def _both(ctx: DistContext, data_dir: str) -> Dict[str, Any]:
    return {name: _parity(ctx, data_dir, name) for name in ("two_tower", "mind")}


@pytest.fixture(scope="module")
def tiny_retrieval(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("retrieval") / "tiny")
    generate_retrieval(out, RetrievalSynthArgs(**RETRIEVAL_PRESETS["tiny"]),  # type: ignore
                       progress=False)
    return out


def test_sharded_retrieval_equals_single_process(tiny_retrieval: str) -> None:
    results = run_ranks(_both, 2, tiny_retrieval, timeout_s=300)
    for rank, per_model in enumerate(results):
        for name, r in per_model.items():
            where = (rank, name)
            assert "row_wise" in r["types"], (where, r["types"])
            assert abs(r["loss"] - r["ref_loss"]) < 1e-4, (where, r["loss"], r["ref_loss"])
            assert r["dense_checked"] >= 2, where
            if name == "two_tower":  # the numeric item feature's projection
                assert "model.encoder.item_tower.dense.weight" in r["checked"], where
            assert r["grad_diff"] < 1e-5, (where, r["grad_diff"])
            assert len(r["moved"]) == (3 if name == "two_tower" else 1), (where, r["moved"])
            for table, moved in r["moved"].items():
                # Each rank holds rows of every table; some of its rows must have moved.
                assert moved > 1e-4, (where, table, "the fused optimizer changed no row")
            assert r["step_diff"] < 1e-5, (where, r["step_diff"])
