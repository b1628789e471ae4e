"""The sequential task's pieces against brute force: the sampled-softmax loss (accidental
hits masked, in-batch negatives), full-ranking and sampled-protocol ranks and their metrics,
the data-path transform (negatives, leave-one-out split, held-out time), the eval query's
consistency with training, bad model args, and the synthetic oracle."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data.batch import Batch
from data.reader import ParquetReader
from data.schema import Schema
from data.synth.next_item import (
    NEXT_ITEM_PRESETS,
    NextItemSynthArgs,
    PlantedChain,
    generate_histories,
)
from models import get_model_spec
from models.sequential import SampledSoftmaxLoss, SequenceEncoding
from trainer.tasks.sequential import (
    RankingMetrics,
    SequentialBatches,
    candidate_scores,
    full_ranks,
    sample_unseen,
)


def _encoding(lengths: List[int], num_items: int, neg_ids: List[int], dim: int = 8,
              seed: int = 0) -> SequenceEncoding:
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    offsets = torch.tensor([0] + list(np.cumsum(lengths)), dtype=torch.int64)
    ids = torch.randint(1, num_items, (total,), generator=g)
    table = F.normalize(torch.randn(num_items, dim, generator=g, dtype=torch.float64), dim=-1)
    user = F.normalize(torch.randn(total, dim, generator=g, dtype=torch.float64), dim=-1)
    neg = torch.tensor(neg_ids)
    return SequenceEncoding(user=user, items=table[ids], ids=ids, offsets=offsets,
                            neg=table[neg], neg_ids=neg)


def _brute_loss(enc: SequenceEncoding, temp: float, in_batch: bool) -> float:
    """Per-position loops: positive first, negatives equal to the target dropped."""
    off = enc.offsets.tolist()
    targets: List[Tuple[int, int]] = []  # (position, target position)
    for b in range(len(off) - 1):
        for t in range(off[b], off[b + 1] - 1):
            targets.append((t, t + 1))
    cands = {int(enc.ids[j]): enc.items[j] for _, j in targets}
    losses = []
    for t, j in targets:
        u, target = enc.user[t], int(enc.ids[j])
        logits = [float(u @ enc.items[j]) / temp]
        for n, nid in enumerate(enc.neg_ids.tolist()):
            if nid != target:
                logits.append(float(u @ enc.neg[n]) / temp)
        if in_batch:
            for cid, e in cands.items():
                if cid != target:
                    logits.append(float(u @ e) / temp)
        m = max(logits)
        losses.append(m + math.log(sum(math.exp(x - m) for x in logits)) - logits[0])
    return float(np.mean(losses))


@pytest.mark.parametrize("in_batch", [False, True])
def test_sampled_softmax_equals_brute_force(in_batch: bool) -> None:
    enc = _encoding([5, 0, 1, 3, 7], num_items=12, neg_ids=[1, 2, 3, 4, 5, 6, 7, 8])
    loss, out = SampledSoftmaxLoss(0.05, in_batch)(enc, torch.zeros(5, 0))
    assert float(loss) == pytest.approx(_brute_loss(enc, 0.05, in_batch), rel=1e-9)
    # positions that predict a next item: 4 + 0 + 0 + 2 + 6
    assert int(out[6]) == 12
    # the query of a row is its last position's output; an empty row's query is zero
    assert torch.equal(out[1][0], enc.user[4]) and float(out[1][1].abs().sum()) == 0.0


def test_accidental_hits_are_masked() -> None:
    enc = _encoding([4, 3], num_items=10, neg_ids=[1, 2, 3])
    target = int(enc.ids[1])  # the target of position 0
    # A negative with the target's id and an embedding equal to the query would dominate the
    # softmax if it were counted.
    neg_ids = torch.tensor([target, 9 if target != 9 else 8])
    neg = torch.stack([enc.user[0], enc.items[0]])
    hit = enc._replace(neg=neg, neg_ids=neg_ids)
    loss_fn = SampledSoftmaxLoss(0.05, False)
    logits, tids = loss_fn.logits(hit)
    assert tids[0] == target and math.isinf(float(logits[0, 1])) and logits[0, 1] < 0
    assert float(loss_fn(hit, torch.zeros(2, 0))[0]) == pytest.approx(
        _brute_loss(hit, 0.05, False), rel=1e-9)
    # Without the mask the loss would be larger: the check can fail.
    src = torch.tensor([0, 1, 2, 4, 5])  # the positions with a next item
    unmasked = torch.cat([logits[:, :1], (hit.user[src] @ hit.neg.T) / 0.05], 1)
    assert float((torch.logsumexp(unmasked, 1) - unmasked[:, 0]).mean()) > float(
        loss_fn(hit, torch.zeros(2, 0))[0]) + 1e-3


def _ranking_case(q: int = 9, n: int = 40, d: int = 6, seed: int = 1
                  ) -> Tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    query = F.normalize(torch.randn(q, d, generator=g, dtype=torch.float64), dim=-1)
    table = torch.randn(n, d, generator=g, dtype=torch.float64)
    targets = torch.randint(1, n, (q,), generator=g)
    lengths = torch.randint(0, 6, (q,), generator=g)
    hist = torch.randint(0, n, (int(lengths.sum()),), generator=g)
    hist[0] = targets[0] if lengths[0] > 0 else hist[0]  # a repeat of the target stays ranked
    return query, table, targets, hist, lengths


def _brute_ranks(query: torch.Tensor, table: torch.Tensor, targets: torch.Tensor,
                 hist: torch.Tensor, lengths: torch.Tensor) -> np.ndarray:
    w = table.numpy() / np.linalg.norm(table.numpy(), axis=1, keepdims=True)
    scores = query.numpy() @ w.T
    off = np.concatenate(([0], np.cumsum(lengths.numpy())))
    ranks = []
    for i in range(len(targets)):
        s = scores[i].copy()
        excluded = set(hist.numpy()[off[i]:off[i + 1]].tolist()) | {0}
        excluded.discard(int(targets[i]))
        s[list(excluded)] = -np.inf
        ranks.append(int((s > s[int(targets[i])]).sum()))
    return np.array(ranks)


def test_full_ranks_equal_brute_force_for_any_row_split() -> None:
    query, table, targets, hist, lengths = _ranking_case()
    expected = _brute_ranks(query, table, targets, hist, lengths)
    assert expected.max() > 0  # not a trivial case
    for pieces in ([(0, table)], [(0, table[:7]), (7, table[7:23]), (23, table[23:])]):
        ranks, _ = full_ranks(query, targets, hist, lengths, pieces, chunk_rows=5)
        assert ranks.tolist() == expected.tolist()


def test_ranking_metrics_formulas() -> None:
    ranks = torch.tensor([0, 3, 9, 10, 49, 150, 400])
    m = RankingMetrics()
    m.add(ranks)
    r = ranks.double().numpy()
    res = m.result()
    assert res["eval_users"] == 7
    for k in (1, 10, 50, 200):
        assert res[f"hr@{k}"] == pytest.approx(float((r < k).mean()))
    for k in (10, 50, 200):
        gain = np.where(r < k, 1 / np.log2(r + 2), 0)
        assert res[f"ndcg@{k}"] == pytest.approx(float(gain.mean()))
    assert res["mrr"] == pytest.approx(float((1 / (r + 1)).mean()))


def test_sampled_protocol_draws_unseen_items() -> None:
    query, table, targets, hist, lengths = _ranking_case()
    g = torch.Generator().manual_seed(0)
    cand = sample_unseen(targets, hist, lengths, table.shape[0], 20, g)
    assert cand.shape == (9, 20)
    off = np.concatenate(([0], np.cumsum(lengths.numpy())))
    for i in range(9):
        c = cand[i].tolist()
        assert len(set(c)) == 20 and 0 not in c and int(targets[i]) not in c
        assert not set(c) & set(hist.numpy()[off[i]:off[i + 1]].tolist())
    split = [(0, table[:11]), (11, table[11:])]
    scores = candidate_scores(query, cand, split, lambda x: x)
    w = F.normalize(table, dim=-1)
    assert torch.allclose(scores, (query.unsqueeze(1) * w[cand]).sum(-1))


def _batch(seqs: List[List[int]]) -> Batch:
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int32)
    values = torch.tensor([x for s in seqs for x in s], dtype=torch.int64)
    kjt = KeyedJaggedTensor(keys=["item_seq"], values=values, lengths=lengths)
    ts = KeyedJaggedTensor(keys=["item_seq"], values=values * 10, lengths=lengths)
    b = len(seqs)
    return Batch(dense=torch.zeros(b, 0), sparse=KeyedJaggedTensor(keys=[], values=torch.zeros(
        0, dtype=torch.int64), lengths=torch.zeros(0, dtype=torch.int32)),
        labels=torch.zeros(b, 0), sequence=kjt, timestamps=ts,
        sample_ids=torch.arange(b, dtype=torch.int64))


def test_batch_transform_holdout_and_negatives() -> None:
    batch = _batch([[3, 5, 7], [2], [4, 6]])
    out = SequentialBatches("item_seq", 20, 7, seed=0, holdout=True)(batch)
    assert out.labels.tolist() == [7, 2, 6]
    seq = out.sequence.to_dict()
    assert seq["item_seq"].lengths().tolist() == [2, 0, 1]
    assert seq["item_seq"].values().tolist() == [3, 5, 4]
    ts = out.timestamps.to_dict()
    assert ts["item_seq"].values().tolist() == [30, 50, 40]
    assert ts["item_seq_query_ts"].values().tolist() == [70, 20, 60]  # held-out times
    neg = seq["item_seq_neg"].values()
    assert neg.numel() == 7 and int(neg.min()) >= 1 and int(neg.max()) < 20
    assert seq["item_seq_neg"].lengths().tolist() == [3, 2, 2]
    train = SequentialBatches("item_seq", 20, 7, seed=0, holdout=False)(batch)
    assert train.sequence.to_dict()["item_seq"].values().tolist() == [3, 5, 7, 2, 4, 6]
    again = SequentialBatches("item_seq", 20, 7, seed=0, holdout=False)(batch)
    assert torch.equal(train.sequence.values(), again.sequence.values())  # resumable


def test_synthetic_oracle_matches_planted_distribution() -> None:
    args = NextItemSynthArgs(**NEXT_ITEM_PRESETS["tiny"])  # type: ignore[arg-type]
    user, item, ts, oracle = generate_histories(args)
    assert 0.3 < oracle["hr@10"] <= 1.0 and 0.3 < oracle["expected_hr@10"] <= 1.0
    off = np.concatenate(([0], np.cumsum(np.bincount(user))))
    gaps = []
    for u in range(args.num_users):  # no user repeats an item; times increase
        seq = item[off[u]:off[u + 1]]
        assert len(set(seq.tolist())) == seq.size
        gaps.append(np.diff(ts[off[u]:off[u + 1]]))
    gap = np.concatenate(gaps)
    # Gaps are either inside a session or session breaks, at the configured rate.
    inside = (gap >= args.session_gap_s[0]) & (gap <= args.session_gap_s[1])
    breaks = (gap >= args.break_gap_s[0]) & (gap <= args.break_gap_s[1])
    assert np.all(inside | breaks)
    assert abs(breaks.mean() - args.session_break) < 4 * math.sqrt(0.21 / gap.size)
    # Not knowing which steps start a session costs the best model: its expected HR@10 is
    # below the time-aware oracle's (and never above it, being a top-10 of the same draw).
    assert oracle["time_blind_expected_hr@10"] < oracle["expected_hr@10"] - 0.02
    # A noiseless chain over 2 clusters of 10 items: every next item is one of the <= 10
    # unseen items of the successor cluster, so the oracle's top-10 always holds it.
    det = NextItemSynthArgs(num_users=50, num_items=20, num_clusters=2, successors=1,
                            noise=0.0, min_len=2, max_seq=4, max_len=4, session_break=0.0)
    assert generate_histories(det)[3]["hr@10"] == 1.0
    # Every step a session break: every next item comes from the previous item's own
    # cluster, again <= 10 unseen items; time-blind and time-aware oracles coincide.
    back = generate_histories(dataclasses.replace(det, session_break=1.0))[3]
    assert back["hr@10"] == back["time_blind_hr@10"] == 1.0
    # Closed form of the time-blind oracle: two clusters of 10 equally popular items that
    # lead to each other, histories of 2 items, 60% session breaks. At the held-out step the
    # return cluster has 9 unseen items (each 0.6 / 10 before renormalising, for a model
    # blind to the break) and the other cluster 10 (each 0.4 / 10), so the blind top-10 is
    # those 9 plus one: true mass 1 on a return step, 0.1 on a chain step. The time-aware
    # top-10 is always the right cluster (mass 1).
    two = dataclasses.replace(det, num_users=400, min_len=2, max_seq=2, max_len=2, zipf=0.0,
                              session_break=0.6)
    two = next(dataclasses.replace(two, seed=s) for s in range(100)
               if not np.diag(PlantedChain(two, np.random.default_rng(s)).transition).any())
    user, _, ts, half = generate_histories(two)
    returned = float((np.diff(ts)[np.diff(user) == 0] >= two.break_gap_s[0]).mean())
    assert 0.5 < returned < 0.7
    assert half["hr@10"] == half["expected_hr@10"] == 1.0
    assert half["time_blind_expected_hr@10"] == pytest.approx(0.1 + 0.9 * returned, abs=1e-9)
    # NDCG@10 of the aware oracle: equally likely items in any order, 9 (return) or 10.
    disc = 1.0 / np.log2(np.arange(2, 12))
    assert half["expected_ndcg@10"] == pytest.approx(
        returned * disc[:9].sum() / 9 + (1 - returned) * disc.sum() / 10, abs=1e-9)
    assert 0 < half["time_blind_ndcg@10"] < half["ndcg@10"] < half["hr@10"]
    with pytest.raises(ValueError, match="--break-gap-s 10,5: give LOW,HIGH seconds"):
        generate_histories(dataclasses.replace(det, break_gap_s=(10, 5)))


@pytest.mark.parametrize("model,override,key", [
    ("hstu", {"num_negatives": 0}, "model.args.num_negatives"),
    ("hstu", {"temperature": 0.0}, "model.args.temperature"),
    ("hstu", {"attention_impl": "flash"}, "model.args.attention_impl"),
    ("hstu", {"embedding_dim": 50}, "model.args.embedding_dim"),
    ("sasrec", {"item_feature": "nope"}, "model.args.item_feature"),
    ("sasrec", {"action_feature": "item_seq"}, "model.args.action_feature"),
])
def test_bad_model_args_name_the_key(tiny_nextitem: str, model: str, override: Dict[str, Any],
                                     key: str) -> None:
    spec = get_model_spec(model)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        spec.build(Schema.load(tiny_nextitem), spec.make_args("default", override), "meta")


def test_eval_query_equals_the_training_position_that_predicts_the_same_item(
        tiny_nextitem: str) -> None:
    """Causal model: the eval query (history without the held-out item, gaps measured from
    the held-out time) is the training output of the position that predicts that item."""
    schema = Schema.load(tiny_nextitem)
    spec = get_model_spec("hstu")
    args = spec.make_args("default", {"dropout": 0.0, "num_negatives": 8,
                                      "attention_impl": "pytorch_padded"})
    torch.manual_seed(0)
    model = spec.build(schema, args, "cpu").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.3, 0.3)  # time and position biases far from zero
    reader = ParquetReader(tiny_nextitem, "test", 16, prefetch=0, schema=schema)
    full = next(iter(reader))
    n = model.num_items
    with torch.no_grad():
        train = model(SequentialBatches("item_seq", n, 8, 0, holdout=False)(full))
        held = SequentialBatches("item_seq", n, 8, 0, holdout=True)(full)
        query = model(held)
        no_time = held.timestamps.to_dict()
        no_time = KeyedJaggedTensor.from_jt_dict({"item_seq": no_time["item_seq"]})
        stale = model(Batch(held.dense, held.sparse, held.labels, held.sequence, no_time,
                            held.sample_ids))
    ends = train.offsets[1:] - 2  # the position before each row's last item
    lengths = train.offsets.diff()
    rows = lengths >= 2
    last = query.offsets[1:] - 1
    assert torch.allclose(query.user[last[rows]], train.user[ends[rows]], atol=1e-5)
    # Without the held-out time the last position measures gaps from its own time: different.
    assert (stale.user[last[rows]] - train.user[ends[rows]]).abs().max() > 1e-4


def test_attention_query_timestamps_all_impls_agree() -> None:
    from models.hstu.attention import hstu_attention, next_timestamps

    g = torch.Generator().manual_seed(0)
    offsets = torch.tensor([0, 5, 5, 6, 76])
    total = 76
    q, k, v = (torch.randn(total, 2, 4, generator=g, dtype=torch.float64) for _ in range(3))
    ts = torch.cumsum(torch.randint(1, 5000, (total,), generator=g), 0)
    tq = next_timestamps(ts, offsets) + torch.randint(0, 100_000, (total,), generator=g)
    rab_pos = torch.randn(80, generator=g, dtype=torch.float64)
    rab_time = torch.randn(21, generator=g, dtype=torch.float64)
    ref = hstu_attention(q, k, v, offsets, 80, rab_pos, rab_time, ts, "pytorch_padded", tq)
    jag = hstu_attention(q, k, v, offsets, 80, rab_pos, rab_time, ts, "pytorch_jagged", tq)
    default = hstu_attention(q, k, v, offsets, 80, rab_pos, rab_time, ts, "pytorch_padded")
    assert torch.allclose(ref, jag, atol=1e-10)
    assert (ref - default).abs().max() > 1e-6  # the query times are used
    with pytest.raises(ValueError, match="query_timestamps"):
        hstu_attention(q, k, v, offsets, 80, rab_pos, None, None, "pytorch_padded", tq)


@pytest.mark.parametrize("model_name", ["hstu", "sasrec"])
def test_bf16_dense_dtype_autocasts_the_encoder_and_keeps_the_loss_fp32(
        tiny_nextitem: str, model_name: str) -> None:
    """``training.dense_dtype = "bf16"``: the encoder's projections run in bf16, the loss and
    the eval queries come out fp32 and close to the fp32 run, and every parameter gets a
    gradient."""
    from trainer.tasks.sequential import SequentialTrain

    schema = Schema.load(tiny_nextitem)
    spec = get_model_spec(model_name)
    args = spec.make_args("default", {"dropout": 0.0, "num_negatives": 8})
    torch.manual_seed(0)
    model = spec.build(schema, args, "cpu")
    batch = next(iter(ParquetReader(tiny_nextitem, "train", 16, prefetch=0, schema=schema)))
    batch = SequentialBatches("item_seq", model.num_items, 8, 0, holdout=False)(batch)
    linear_dtypes: List[torch.dtype] = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda _m, _i, out: linear_dtypes.append(out.dtype))
    results = {}
    for dtype in ("fp32", "bf16"):
        task = SequentialTrain(model, args.temperature, False, dtype, "cpu")
        model.zero_grad()
        loss, out = task(batch)
        loss.backward()
        results[dtype] = (loss, out, [p.grad for p in model.parameters()])
    assert torch.float32 in linear_dtypes and torch.bfloat16 in linear_dtypes
    (loss32, out32, _), (loss16, out16, grads16) = results["fp32"], results["bf16"]
    assert loss16.dtype == torch.float32 and out16[1].dtype == torch.float32
    assert abs(float(loss16) - float(loss32)) < 0.05 * abs(float(loss32))
    assert float(F.cosine_similarity(out16[1], out32[1]).min()) > 0.95
    assert all(g is not None and torch.isfinite(g).all() for g in grads16)
    with pytest.raises(ValueError, match="dense_dtype"):
        SequentialTrain(model, args.temperature, False, "fp8", "cpu")
