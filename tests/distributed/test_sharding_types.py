"""Every sharding type on 2 gloo ranks equals an unsharded reference.

One spawn of 2 ranks loops over the cases: pooled tables (EBC) table-, row-, column-,
table-row-, table-column-wise and data-parallel; sequence tables (EC) table-, row- and
column-wise. Each case goes through the config path users take — ``[sharding]`` settings →
per-table constraints and fused optimizers → collective plan → DMP — then checks, against an
unsharded module with the same initial weights and the same per-table optimizers (torch's,
attached independently):

* the plan uses the requested type (and splits the table where the type implies shards);
* forward output on each rank's local batch;
* after one backward (the fused optimizers step in backward), every updated row of every
  shard, and the forward output again.

Table "a" uses a per-table SGD (lr 0.5) and table "b" the default Adagrad (lr 0.1): a per-table
optimizer that did not take effect after sharding would show as a wrong update. (Adam is
GPU-only in fbgemm's fused kernels, and row-wise Adagrad's per-row state differs under
column-wise sharding by design, so element-wise Adagrad is the shard-invariant choice.)
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
from torch import nn

WORLD = 2
LOCAL_BATCH = 4
EBC_CASES = ["table_wise", "row_wise", "column_wise", "table_row_wise", "table_column_wise",
             "data_parallel"]
EC_CASES = ["table_wise", "row_wise", "column_wise"]
# rows, dim: dims of 16 so column-wise can split into 4-aligned shards (fbgemm's rule).
TABLES = {"a": (40, 16), "b": (24, 16)}


def _schema(kind: str) -> Any:
    from data.schema import FeatureSpec, Schema

    feats = []
    for t, (rows, dim) in TABLES.items():
        feats.append(FeatureSpec(f"f_{t}", kind, table=t, num_embeddings=rows, embedding_dim=dim,
                                 max_len=5 if kind == "sequence" else 0))
    return Schema(features=feats)


def _configs(sharding_type: str) -> Tuple[Any, Any]:
    from sharding.constraints import SparseOptimizerDefaults
    from trainer.config import ShardingConfig

    sharding = ShardingConfig(sharding_types=[sharding_type], min_partition=8,
                              tables={"a": {"optimizer": "sgd", "lr": 0.5}})
    training = SparseOptimizerDefaults("adagrad", lr=0.1)
    return sharding, training


class Holder(nn.Module):
    """DMP's root module: the plan's module path of the collection is ``emb``."""

    def __init__(self, emb: nn.Module) -> None:
        super().__init__()
        self.emb = emb

    def forward(self, kjt: Any) -> Any:
        return self.emb(kjt)


def _collection(kind: str, device: str) -> nn.Module:
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

    if kind == "sparse":
        return EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name=t, num_embeddings=r, embedding_dim=d,
                                       feature_names=[f"f_{t}"]) for t, (r, d) in TABLES.items()],
            device=torch.device(device))
    return EmbeddingCollection(
        tables=[EmbeddingConfig(name=t, num_embeddings=r, embedding_dim=d,
                                feature_names=[f"f_{t}"]) for t, (r, d) in TABLES.items()],
        device=torch.device(device))


def _batch(rank: int, seed: int) -> Any:
    """Rank ``rank``'s local KJT: 0-3 ids per example per feature, seeded per case."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    g = torch.Generator().manual_seed(seed * 10 + rank)
    keys, lengths, values = [], [], []
    for t, (rows, _) in TABLES.items():
        n = torch.randint(0, 4, (LOCAL_BATCH,), generator=g)
        keys.append(f"f_{t}")
        lengths.append(n)
        values.append(torch.randint(0, rows, (int(n.sum()),), generator=g))
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values),
                                               lengths=torch.cat(lengths))


def _outputs(out: Any, kind: str) -> Dict[str, torch.Tensor]:
    """Feature → output rows ([B, dim] pooled, or [num_ids, dim] for sequences)."""
    if kind == "sparse":
        return out.to_dict()
    return {k: jt.values() for k, jt in out.items()}


def _loss(outs: Dict[str, torch.Tensor], rank: int) -> torch.Tensor:
    """A fixed random weighting, so every output element gets its own gradient."""
    g = torch.Generator().manual_seed(1000 + rank)
    return sum((v * torch.randn(v.shape, generator=g)).sum() for _, v in sorted(outs.items()))


def _run_case(ctx: Any, kind: str, sharding_type: str, seed: int) -> str:
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    from sharding.constraints import build_constraints, resolve_table_settings
    from sharding.table_optimizers import apply_table_optimizers, data_parallel_table_optimizers
    from sharding.parallel import wrap_model
    from sharding.planner import build_planner, plan_model, topology_from_config
    from sharding.sharders import build_sharders

    case = f"{'EBC' if kind == 'sparse' else 'EC'} {sharding_type}"
    schema = _schema(kind)
    sharding, training = _configs(sharding_type)
    settings = resolve_table_settings(schema, sharding, training)

    # Reference: unsharded, same initial weights on every rank, torch optimizers per table.
    torch.manual_seed(seed)
    ref = Holder(_collection(kind, "cpu"))
    ref_weights = {n.split(".")[-2]: p for n, p in ref.named_parameters()}
    for p in ref_weights.values():
        p.data.uniform_(-0.5, 0.5)
    apply_optimizer_in_backward(torch.optim.SGD, [ref_weights["a"]], {"lr": 0.5})
    apply_optimizer_in_backward(torch.optim.Adagrad, [ref_weights["b"]], {"lr": 0.1, "eps": 1e-8})

    # Sharded: the trainer's path from settings to DMP.
    model = Holder(_collection(kind, "meta"))
    apply_table_optimizers(model, settings)
    topology = topology_from_config(sharding, ctx.world_size, ctx.local_world_size, "cpu")
    planner = build_planner(topology, LOCAL_BATCH, build_constraints(settings, "cpu"),
                            sharding.storage_reservation)
    sharders = build_sharders()
    plan = plan_model(model, sharders, planner, topology, sharding.storage_reservation,
                      collective=True)
    for t in TABLES:
        ps = plan.plan["emb"][t]  # type: ignore[index]
        assert ps.sharding_type == sharding_type, f"{case}: table {t} planned as {ps.sharding_type}"
        if sharding_type in ("row_wise", "column_wise", "table_row_wise", "table_column_wise"):
            assert len(ps.sharding_spec.shards) == WORLD, \
                f"{case}: table {t} has {len(ps.sharding_spec.shards)} shards, expected {WORLD}"
    dmp, _ = wrap_model(model, ctx, plan, sharders)

    def sharded_pieces() -> List[Tuple[str, Tuple[slice, slice], torch.Tensor]]:
        """(table, slice of the full table, local tensor) for what this rank holds."""
        pieces = []
        for key, value in dmp.state_dict().items():
            table = key.split(".")[-2]
            if hasattr(value, "local_shards"):
                for shard in value.local_shards():
                    (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                    pieces.append((table, (slice(r0, r0 + nr), slice(c0, c0 + nc)), shard.tensor))
            else:  # data-parallel: the whole table on every rank
                pieces.append((table, (slice(None), slice(None)), value))
        return pieces

    with torch.no_grad():
        for table, sl, local in sharded_pieces():
            local.copy_(ref_weights[table][sl])

    init = {t: w.detach().clone() for t, w in ref_weights.items()}
    batches = [_batch(r, seed) for r in range(WORLD)]
    with torch.no_grad():
        expected = _outputs(ref(batches[ctx.rank]), kind)
    got = _outputs(dmp(batches[ctx.rank]), kind)
    for f, v in expected.items():
        torch.testing.assert_close(got[f], v, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{case}: forward of {f}: {m}")

    # One step: the reference sees every rank's batch (the global batch), the sharded model
    # each rank its own; the fused optimizers step inside backward. torchrec divides sharded
    # embedding gradients by the world size (as DDP averages dense ones), so the reference
    # loss is the mean of the ranks' losses.
    (sum(_loss(_outputs(ref(b), kind), r) for r, b in enumerate(batches)) / WORLD).backward()
    _loss(got, ctx.rank).backward()
    # Data-parallel tables are DDP-replicated: their optimizer steps after backward.
    dp_optimizers, _ = data_parallel_table_optimizers(dmp, settings)
    assert bool(dp_optimizers) == (sharding_type == "data_parallel"), case
    for opt in dp_optimizers:
        opt.step()
    for t in TABLES:  # the step must change something, or matching the reference is vacuous
        assert not torch.equal(ref_weights[t], init[t]), f"{case}: reference {t} did not move"
    with torch.no_grad():
        for table, sl, local in sharded_pieces():
            torch.testing.assert_close(local, ref_weights[table][sl], rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{case}: table {table} rows {sl} after "
                                                     f"one step: {m}")
        expected = _outputs(ref(batches[ctx.rank]), kind)
        got = _outputs(dmp(batches[ctx.rank]), kind)
        for f, v in expected.items():
            torch.testing.assert_close(got[f], v, rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{case}: forward after the step, {f}: {m}")
    return case


def _all_cases(ctx: Any) -> List[str]:
    cases = [("sparse", t) for t in EBC_CASES] + [("sequence", t) for t in EC_CASES]
    return [_run_case(ctx, kind, sharding_type, seed=i)
            for i, (kind, sharding_type) in enumerate(cases)]


def test_every_sharding_type_matches_unsharded_reference() -> None:
    from launch.spawn import run_ranks

    results = run_ranks(_all_cases, WORLD)
    assert len(results[0]) == len(EBC_CASES) + len(EC_CASES)
