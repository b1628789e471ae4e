"""2-rank gloo: the sequential task's sharded pieces equal their single-process versions.

* Ranking: each rank holds half of the item rows and half of the queries; the all-gathered,
  all-reduced ranks and metrics equal one process ranking every query against the whole table.
* HSTU: sharded (item table row-wise over both ranks) it computes the unsharded model's loss
  and queries; its dense gradients equal the mean of the reference's over both ranks' batches;
  the trainer's evaluation path (local shards of the sharded table's state dict) gives the
  metrics of the reference model ranked in one process; a step moves the tables.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torchrec.distributed.planner.types import ParameterConstraints

from data.reader import ParquetReader
from data.schema import Schema
from models import get_model_spec
from trainer.tasks.sequential import SequentialTrain
from sharding.dist import DistContext
from sharding.parallel import shard_model
from sharding.sharders import apply_sparse_optimizer
from launch.spawn import run_ranks
from sharding.state import _strip, load_full_state
from trainer.tasks.sequential import SequentialBatches, _RankingRun, local_item_shards

NUM_ITEMS, DIM, QUERIES = 50, 8, 12


def _ranking_inputs() -> Tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    table = torch.randn(NUM_ITEMS, DIM, generator=g)
    query = F.normalize(torch.randn(QUERIES, DIM, generator=g), dim=-1)
    targets = torch.randint(1, NUM_ITEMS, (QUERIES,), generator=g)
    lengths = torch.randint(1, 5, (QUERIES,), generator=g)
    hist = torch.randint(0, NUM_ITEMS, (int(lengths.sum()),), generator=g)
    return table, query, targets, lengths, hist


def _output(query: torch.Tensor, targets: torch.Tensor, hist: torch.Tensor,
            lengths: torch.Tensor) -> Tuple[Any, ...]:
    return (torch.zeros(()), query, targets, hist, lengths, torch.zeros(()), torch.zeros(()))


def _rank_half(ctx: DistContext) -> Dict[str, float]:
    table, query, targets, lengths, hist = _ranking_inputs()
    half_rows, half_q = 21, QUERIES // 2
    rows = slice(0, half_rows) if ctx.rank == 0 else slice(half_rows, NUM_ITEMS)
    qs = slice(0, half_q) if ctx.rank == 0 else slice(half_q, QUERIES)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
    mine = hist[int(offsets[qs.start]):int(offsets[qs.stop])]
    run = _RankingRun([(rows.start, table[rows])], NUM_ITEMS, 10, seed=0)
    run.update(_output(query[qs], targets[qs], mine, lengths[qs]))
    return run.compute()


def test_two_rank_ranking_equals_single_process() -> None:
    table, query, targets, lengths, hist = _ranking_inputs()
    single = _RankingRun([(0, table)], NUM_ITEMS, 10, seed=0)
    single.update(_output(query, targets, hist, lengths))
    expected = single.compute()
    assert 0.0 < expected["mrr"] < 1.0 and expected["eval_users"] == QUERIES
    for got in run_ranks(_rank_half, 2, timeout_s=120):
        assert got.keys() == expected.keys()
        for k, v in expected.items():
            assert abs(got[k] - v) < 1e-9, (k, got[k], v)


def _hstu_parity(ctx: DistContext, data_dir: str) -> Dict[str, Any]:
    schema = Schema.load(data_dir)
    spec = get_model_spec("hstu")
    args = spec.make_args("default", {"num_negatives": 16, "dropout": 0.0, "embedding_dim": 16})
    torch.manual_seed(0)
    reference = SequentialTrain(spec.build(schema, args, "cpu"), args.temperature, True)
    with torch.no_grad():
        for p in reference.model.ec.parameters():
            p.uniform_(-0.5, 0.5)
    model = SequentialTrain(spec.build(schema, args, "meta"), args.temperature, True)
    apply_sparse_optimizer(model, "rowwise_adagrad", 0.05)
    dmp, plan = shard_model(model, ctx, batch_size=32,
                            constraints={"item": ParameterConstraints(sharding_types=["row_wise"])})
    load_full_state(dmp, reference.state_dict())
    num_items = reference.model.num_items

    def batches(split: str, rank: int, n: int) -> List[Any]:
        reader = ParquetReader(data_dir, split, 32, rank=rank, world_size=ctx.world_size,
                               prefetch=0, schema=schema,
                               transform=SequentialBatches("item_seq", num_items, 16, 0,
                                                           holdout=split != "train"))
        return [b for _, b in zip(range(n), reader)]

    # Forward parity and the evaluation path, before any update.
    dmp.eval()
    reference.eval()
    shards = local_item_shards(dmp, "item")
    run = _RankingRun(shards, num_items, 20, seed=0)
    diffs = []
    ref_outputs: List[List[Tuple[torch.Tensor, ...]]] = [[], []]
    with torch.no_grad():
        for r in range(ctx.world_size):
            for b in batches("test", r, 2):
                _, out = reference(b)
                ref_outputs[r].append(tuple(x.clone() for x in out))
        for i, b in enumerate(batches("test", ctx.rank, 2)):
            loss, out = dmp(b)
            ref = ref_outputs[ctx.rank][i]
            diffs.append(max(float((loss - ref[0]).abs()), float((out[1] - ref[1]).abs().max())))
            run.update(out)
    sharded_metrics = run.compute()
    # Training step: DDP averages the dense gradients over both ranks' batches.
    dmp.train()
    reference.train()
    train = batches("train", ctx.rank, 1)[0]
    loss, _ = dmp(train)
    loss.backward()
    ref_grads: Dict[str, torch.Tensor] = {}
    for r in range(ctx.world_size):
        reference.zero_grad()
        reference(batches("train", r, 1)[0])[0].backward()
        for n, p in reference.named_parameters():
            if p.grad is not None and ".ec." not in n:
                ref_grads[n] = ref_grads.get(n, 0) + p.grad / ctx.world_size
    grad_diff = max(float((p.grad - ref_grads[_strip(n)]).abs().max())
                    for n, p in dmp.named_parameters() if p.grad is not None
                    and _strip(n) in ref_grads)
    moved = max(float((w - reference.state_dict()["model.ec.embeddings.item.weight"][
        off:off + w.shape[0]]).abs().max()) for off, w in local_item_shards(dmp, "item"))
    return {"max_diff": max(diffs), "grad_diff": grad_diff, "moved": moved,
            "metrics": sharded_metrics,
            # numpy: tensors sent through the result queue share memory with a process
            # that exits before the parent reads them
            "ref_outputs": [[tuple(x.numpy() for x in o) for o in per_rank]
                            for per_rank in ref_outputs],
            "item_rows": [(off, int(w.shape[0])) for off, w in shards],
            "table": reference.model.ec.embeddings["item"].weight.detach().numpy().copy(),
            "types": sorted({ps.sharding_type
                             for m in plan.plan.values()  # type: ignore[union-attr]
                             for ps in m.values()})}


def test_sharded_hstu_equals_unsharded(tiny_nextitem: str) -> None:
    results = run_ranks(_hstu_parity, 2, tiny_nextitem, timeout_s=300)
    for rank, r in enumerate(results):
        assert r["types"] == ["row_wise"], r["types"]
        assert r["item_rows"] and r["item_rows"][0][1] > 0, (rank, r["item_rows"])
        assert r["max_diff"] < 1e-4, (rank, r["max_diff"])
        assert r["grad_diff"] < 1e-4, (rank, r["grad_diff"])
        assert r["moved"] > 1e-6, (rank, "the fused optimizer changed no row")
    # The reference ranked in one process: rank 0's then rank 1's queries of each batch, in
    # the all-gather's order, against the whole table.
    ref_outputs = results[0]["ref_outputs"]
    table = torch.from_numpy(results[0]["table"])
    single = _RankingRun([(0, table)], table.shape[0], 20, seed=0)
    for i in range(len(ref_outputs[0])):
        outs = [tuple(torch.from_numpy(x) for x in ref_outputs[r][i]) for r in range(2)]
        single.update((outs[0][0], torch.cat([o[1] for o in outs]),
                       torch.cat([o[2] for o in outs]), torch.cat([o[3] for o in outs]),
                       torch.cat([o[4] for o in outs]), outs[0][5], outs[0][6]))
    expected = single.compute()
    for rank, r in enumerate(results):
        for k, v in expected.items():
            assert abs(r["metrics"][k] - v) < 1e-6, (rank, k, r["metrics"][k], v)
