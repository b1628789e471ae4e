"""Wide&Deep, DCN, xDeepFM, MaskNet, DIN and DIEN: their interaction units against a direct
formula or a per-sample loop, every flavour trains a step, the representation is what the
logit is a linear function of (multi-task backbones), and DIEN's auxiliary loss."""

from __future__ import annotations

from typing import List

import pytest
import torch
from torch import nn

from data.batch import Batch
from data.reader import ParquetReader
from data.schema import Schema
from models import get_model_spec, list_models
from trainer.tasks.ctr import CTRTrain
from models.dien import AUGRUCell, PackedOrder, augru, auxiliary_loss
from models.din import TargetAttention, jagged_softmax, steps_back
from models.masknet import MaskBlock
from models.multitask.common import BACKBONES, MultiTaskArgs, build_backbone
from models.xdeepfm import CIN

NEW = [("wide_deep", "ctr"), ("dcn", "ctr"), ("xdeepfm", "ctr"), ("masknet", "ctr"),
       ("din", "seq"), ("dien", "seq")]


def _batch(path: str, n: int = 32) -> Batch:
    return next(iter(ParquetReader(path, "train", n, prefetch=0)))


def _perturbed(model: nn.Module) -> nn.Module:
    """Weights moved off their initial values (zero-initialised gates, biases)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "embedding" in n:
                p.uniform_(-0.5, 0.5)
            else:
                p.add_(0.05 * torch.randn_like(p))
    return model


def test_registry_lists_the_new_models() -> None:
    assert {m for m, _ in NEW} <= set(list_models())
    assert {m for m, _ in NEW} <= set(BACKBONES)


def test_vector_cross_equals_formula(tiny_ctr: str) -> None:
    spec = get_model_spec("dcn")
    model = _perturbed(spec.build(Schema.load(tiny_ctr), spec.make_args("small"), "cpu"))
    x0 = model.cross_input(_batch(tiny_ctr))
    x = x0
    for w, b in zip(model.cross.kernels, model.cross.bias):
        x = x0 * (x @ w) + b.squeeze(1) + x  # x_{l+1} = x_0 x_lᵀ w_l + b_l + x_l
    torch.testing.assert_close(model.cross(x0), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("split_half", [True, False])
def test_cin_equals_double_sum(split_half: bool) -> None:
    torch.manual_seed(0)
    B, m, D, dims = 3, 4, 5, [6, 4]
    cin = CIN(m, dims, split_half)
    x0 = torch.randn(B, m, D)
    xk, pooled = x0, []
    for k, conv in enumerate(cin.convs):
        W, bias = conv.weight.squeeze(2), conv.bias  # [H_k, H_{k-1}·m]
        H_prev = xk.shape[1]
        maps = torch.zeros(B, dims[k], D)
        for h in range(dims[k]):
            maps[:, h] = bias[h]
            for i in range(H_prev):
                for j in range(m):
                    maps[:, h] += W[h, i * m + j] * xk[:, i] * x0[:, j]
        if split_half and k < len(dims) - 1:
            xk, direct = maps[:, : dims[k] // 2], maps[:, dims[k] // 2:]
        else:
            xk, direct = maps, maps
        pooled.append(direct.sum(2))
    expected = torch.cat(pooled, dim=1)
    assert cin.out_dim == expected.shape[1] == (7 if split_half else 10)
    torch.testing.assert_close(cin(x0), expected, rtol=1e-5, atol=1e-5)


def test_mask_block_and_masknet_modes_equal_formula(tiny_ctr: str) -> None:
    torch.manual_seed(0)
    block = _perturbed(MaskBlock(12, 12, 5, 2.0))
    v_emb, v_in = torch.randn(4, 12), torch.randn(4, 12)
    mask = block.projection.weight @ torch.relu(
        block.aggregation.weight @ v_emb.T + block.aggregation.bias[:, None]) \
        + block.projection.bias[:, None]
    hidden = (block.hidden.weight @ (mask * v_in.T)).T
    expected = torch.relu(nn.functional.layer_norm(hidden, (5,), block.norm.weight,
                                                   block.norm.bias))
    torch.testing.assert_close(block(v_emb, v_in), expected, rtol=1e-5, atol=1e-5)

    spec = get_model_spec("masknet")
    schema, batch = Schema.load(tiny_ctr), _batch(tiny_ctr)
    for flavour in ("small", "small_serial"):
        model = _perturbed(spec.build(schema, spec.make_args(flavour), "cpu"))
        fields = model.embeddings(batch)
        v_emb = fields.flatten(1)
        normed = torch.stack([nn.functional.layer_norm(fields[:, f], (model.dim,),
                                                       model.emb_norm.weight,
                                                       model.emb_norm.bias)
                              for f in range(fields.shape[1])], dim=1).flatten(1)
        if flavour == "small_serial":
            out = normed
            for b in model.blocks:
                out = b(v_emb, out)
        else:
            out = model.mlp(torch.cat([b(v_emb, normed) for b in model.blocks], dim=1))
        torch.testing.assert_close(model(batch), model.head(out).squeeze(1),
                                   rtol=1e-5, atol=1e-5)


def _jagged(lengths: List[int], dim: int, seed: int = 0):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    lens = torch.tensor(lengths)
    events = torch.randn(int(lens.sum()), dim)
    rows = [events[s - l:s] for s, l in zip(torch.cumsum(lens, 0).tolist(), lengths)]
    return lens, events, rows


@pytest.mark.parametrize("softmax", [False, True])
def test_din_attention_equals_per_sample_loop(softmax: bool) -> None:
    E, X = 6, 3
    lens, events, rows = _jagged([3, 0, 5, 1], E)
    target = torch.randn(4, E)
    recency = nn.Embedding(5, X)
    back = steps_back(lens)
    assert back.tolist() == [2, 1, 0, 4, 3, 2, 1, 0, 0]
    att = _perturbed(TargetAttention(E, [8, 4], softmax, X))
    u, weights = att(events, target, lens, recency(back))
    for r, hist in enumerate(rows):
        if hist.shape[0] == 0:
            assert u[r].abs().max() == 0  # empty history: no interest vector
            continue
        t = target[r].expand_as(hist)
        rec = recency(torch.arange(len(hist) - 1, -1, -1))  # newest last: 0 steps back
        a = att.mlp(torch.cat([hist, t, hist - t, hist * t, rec], dim=1)).squeeze(1)
        if softmax:
            a = torch.softmax(a, dim=0)
        torch.testing.assert_close(u[r], (a.unsqueeze(1) * hist).sum(0), rtol=1e-5,
                                   atol=1e-5)


def test_jagged_softmax_and_packing_equal_per_row() -> None:
    lens, events, rows = _jagged([2, 0, 3, 3, 1], 4)
    scores = events[:, 0]
    segs = torch.repeat_interleave(torch.arange(5), lens)
    got = jagged_softmax(scores, segs, 5)
    want = torch.cat([torch.softmax(r[:, 0], 0) for r in rows if r.shape[0]])
    torch.testing.assert_close(got, want)
    order = PackedOrder(lens)
    assert order.batch_sizes.tolist() == [4, 3, 2]
    # Packed layout = torch's own packing of the rows sorted longest first.
    ref = nn.utils.rnn.pack_sequence([rows[i] for i in order.order.tolist() if len(rows[i])])
    torch.testing.assert_close(order.pack(events).data, ref.data)
    torch.testing.assert_close(order.unpack(order.pack(events).data), events)


def _augru_loop(cell: AUGRUCell, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """One row, step by step, from the AUGRU equations."""
    h = torch.zeros(cell.h2h.in_features)
    Wx, bx, Wh, bh = cell.x2h.weight, cell.x2h.bias, cell.h2h.weight, cell.h2h.bias
    H = h.shape[0]
    for t in range(x.shape[0]):
        gx, gh = Wx @ x[t] + bx, Wh @ h + bh
        u = torch.sigmoid(gx[:H] + gh[:H]) * a[t]
        r = torch.sigmoid(gx[H:2 * H] + gh[H:2 * H])
        cand = torch.tanh(gx[2 * H:] + r * gh[2 * H:])
        h = (1 - u) * h + u * cand
    return h


@pytest.mark.parametrize("attention,evolution", [("softmax", "augru"), ("sigmoid", "augru"),
                                                 ("sigmoid", "aigru")])
def test_dien_extractor_evolution_and_aux_loss_equal_per_sample_loop(tiny_seq: str,
                                                                     attention: str,
                                                                     evolution: str) -> None:
    spec = get_model_spec("dien")
    args = spec.make_args("small", {"attention": attention, "evolution": evolution})
    model = _perturbed(spec.build(Schema.load(tiny_seq), args, "cpu"))
    arch = model.arch
    E = arch.dim
    lens, events, rows = _jagged([3, 0, 5, 1, 2], E, seed=2)
    target = torch.randn(5, E)
    final, states = arch.interest(target, events, lens)
    starts = (torch.cumsum(lens, 0) - lens).tolist()
    pairs = []
    N = events.shape[0]
    for r, hist in enumerate(rows):
        if hist.shape[0] == 0:
            assert final[r].abs().max() == 0
            continue
        s, _ = arch.extractor(hist.unsqueeze(1))  # the row alone, [L, 1, E]
        s = s.squeeze(1)
        torch.testing.assert_close(states[starts[r]:starts[r] + len(hist)], s, rtol=1e-5,
                                   atol=1e-5)
        scores = s @ arch.bilinear(target[r])
        a = torch.softmax(scores, dim=0) if attention == "softmax" else torch.sigmoid(scores)
        if evolution == "augru":
            want_final = _augru_loop(arch.evolution, s, a)
        else:  # AIGRU: a plain GRU over the attention-scaled states, the row alone
            want_final = arch.evolution((s * a.unsqueeze(1)).unsqueeze(1))[1][0, 0]
        torch.testing.assert_close(final[r], want_final, rtol=1e-5, atol=1e-5)
        for t in range(len(hist) - 1):
            j = starts[r] + t
            pairs.append((s[t], events[j + 1], events[(j + 1 + N // 2) % N]))
    want = torch.stack([-torch.log(torch.sigmoid(s @ p)) - torch.log(1 - torch.sigmoid(s @ n))
                        for s, p, n in pairs]).mean()
    torch.testing.assert_close(auxiliary_loss(states, events, lens), want, rtol=1e-5,
                               atol=1e-5)
    if evolution == "augru":
        # The cell on a batch equals the loop too (a = 1 everywhere is a plain GRU step).
        cell = arch.evolution
        x, h0, a = torch.randn(3, E), torch.zeros(3, E), torch.rand(3)
        step = cell(x, h0, a)
        for i in range(3):
            torch.testing.assert_close(step[i], _augru_loop(cell, x[i:i + 1], a[i:i + 1]),
                                       rtol=1e-5, atol=1e-5)
        assert augru(cell, PackedOrder(torch.tensor([0, 0])), torch.zeros(0, E),
                     torch.zeros(0), E).shape == (2, E)
    # A batch without any event: zero interest, and every weight still gets a gradient
    # (DDP requires each parameter to take part on every rank).
    arch.zero_grad()
    empty = [torch.zeros(0, model.dim)] * len(arch.names)
    logits, aux = arch(torch.randn(3, model.pooled_dim), torch.randn(3, E), empty,
                       [torch.zeros(3, dtype=torch.long)] * len(arch.names))
    (logits.sum() + aux).backward()
    assert all(p.grad is not None for p in arch.parameters())


def test_dien_trains_on_bce_plus_aux_and_evaluates_on_bce(tiny_seq: str) -> None:
    spec = get_model_spec("dien")
    schema, batch = Schema.load(tiny_seq), _batch(tiny_seq)
    model = _perturbed(spec.build(schema, spec.make_args("small"), "cpu"))
    task = CTRTrain(model)
    logits, aux = model.forward_with_aux(batch)
    bce = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
    loss, _ = task(batch)
    torch.testing.assert_close(loss, bce + model.aux_loss_weight * aux)
    assert float(aux) > 0.1
    task.eval()
    eval_loss, _ = task(batch)
    torch.testing.assert_close(eval_loss, bce)
    task.train()
    loss.backward()
    assert model.arch.extractor.weight_hh_l0.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="aux_loss_weight"):
        spec.build(schema, spec.make_args("default", {"aux_loss_weight": -1.0}), "cpu")


@pytest.mark.parametrize("name,data", NEW)
def test_every_flavour_trains_and_backbone_representation(name: str, data: str,
                                                           tiny_ctr: str, tiny_seq: str
                                                           ) -> None:
    path = tiny_ctr if data == "ctr" else tiny_seq
    schema, batch = Schema.load(path), _batch(path, 24)
    spec = get_model_spec(name)
    # ``large`` flavours only widen layers another flavour already runs: skipped for time.
    for flavour in [f for f in spec.flavours if f != "large"]:
        model = spec.build(schema, spec.make_args(flavour), "cpu")
        loss, (_, logits, _) = CTRTrain(model)(batch)
        loss.backward()
        assert logits.shape == (24,) and torch.isfinite(loss)
        missing = [n for n, p in model.named_parameters()
                   if p.grad is None and "embedding" not in n]
        assert not missing, (flavour, missing)
    # As a multi-task backbone: the logit is a fixed linear function of the representation,
    # and the backbone without its logit layer has no parameter the representation skips.
    model = _perturbed(spec.build(schema, spec.make_args("small"), "cpu"))
    with torch.no_grad():
        rep = model.representation(batch)
        assert rep.shape == (24, model.representation_dim)
        if name in ("wide_deep", "xdeepfm"):
            h = rep[:, : model.deep[-1].in_features]
            logit = model.deep[-1](h).squeeze(1) + rep[:, -1] + model.bias
            if name == "xdeepfm":
                logit = logit + model.cin_out(rep[:, h.shape[1]:-1]).squeeze(1)
        elif name in ("din", "dien"):
            logit = model.arch.head(rep).squeeze(1)
        else:
            logit = model.head(rep).squeeze(1)
        torch.testing.assert_close(logit, model(batch), rtol=1e-5, atol=1e-5)
    backbone, dim = build_backbone(schema, MultiTaskArgs(backbone=name), "cpu")
    out = backbone.representation(batch)
    out.sum().backward()
    unused = [n for n, p in backbone.named_parameters()
              if p.grad is None and "embedding" not in n]
    assert out.shape == (24, dim) and not unused, unused


def test_bad_arguments_name_the_key(tiny_ctr: str, tiny_seq: str) -> None:
    ctr, seq = Schema.load(tiny_ctr), Schema.load(tiny_seq)
    cases = [("dcn", ctr, {"structure": "diagonal"}, "structure='diagonal'.*'parallel'"),
             ("masknet", ctr, {"mode": "mixed"}, "mode='mixed'.*'serial'"),
             ("xdeepfm", ctr, {"cin_dims": [5, 4]}, "cin_dims=.*even"),
             ("wide_deep", ctr, {"wide_only": ["nope"]}, "wide_only names \\['nope'\\]"),
             ("din", ctr, {}, "needs sequence features"),
             ("din", seq, {"target_features": ["user"]}, "must pair one pooled feature"),
             ("dien", seq, {"target_features": ["item", "hist_x"]}, "hist_x"),
             ("din", seq, {"sequence_features": ["item"]}, "not sequence features"),
             ("dien", seq, {"attention": "tanh"}, "attention='tanh'.*'sigmoid'"),
             ("dien", seq, {"evolution": "agru"}, "evolution='agru'.*'aigru'")]
    for name, schema, overrides, message in cases:
        spec = get_model_spec(name)
        with pytest.raises(ValueError, match=message):
            spec.build(schema, spec.make_args("default", overrides), "cpu")


def test_wide_only_features_skip_the_deep_part(tiny_ctr: str) -> None:
    schema, batch = Schema.load(tiny_ctr), _batch(tiny_ctr)
    spec = get_model_spec("wide_deep")
    first = schema.sparse_features[0].name
    model = spec.build(schema, spec.make_args("small", {"wide_only": [first]}), "cpu")
    deep_in, wide = model.parts(batch)
    assert deep_in.shape[1] == schema.dense_dim + (len(schema.sparse_features) - 1) * model.dim
    assert model.deep_names == [f.name for f in schema.sparse_features[1:]]


#: The state-dict keys of each backbone's logit layer(s): what ``with_head=False`` leaves out.
HEAD_KEYS = {"deepfm": ("deep.1.", "bias"), "wide_deep": ("deep.1.", "bias"),
             "xdeepfm": ("deep.1.", "cin_out.", "bias"), "dcn": ("head.",),
             "dcn_v2": ("head.",), "masknet": ("head.",), "din": ("arch.head.",),
             "dien": ("arch.head.",), "interformer": ("arch.head.",)}


def test_backbone_is_the_model_without_its_head(tiny_ctr: str, tiny_seq: str) -> None:
    """``with_head=False`` leaves out exactly the logit layer(s): every other weight keeps
    its name and initial value, and the build leaves the RNG where the whole model's does
    (so what a multi-task model builds next, its towers, starts from the same weights)."""
    assert set(BACKBONES) == {n for n in list_models() if get_model_spec(n).backbone}
    assert set(HEAD_KEYS) == set(BACKBONES)
    for name in BACKBONES:
        spec = get_model_spec(name)
        schema = Schema.load(tiny_seq if name in ("din", "dien", "interformer") else tiny_ctr)
        args = spec.make_args("small")
        torch.manual_seed(0)
        whole = spec.build(schema, args, "cpu").state_dict()
        after_whole = torch.rand(4)
        torch.manual_seed(0)
        backbone = spec.build(schema, args, "cpu", with_head=False)
        after_backbone = torch.rand(4)
        kept = backbone.state_dict()
        dropped = set(whole) - set(kept)
        assert set(kept) <= set(whole), (name, sorted(set(kept) - set(whole)))
        assert dropped and all(k.startswith(HEAD_KEYS[name]) for k in dropped), (name, dropped)
        assert all(not k.startswith(HEAD_KEYS[name]) for k in kept), name
        for key, value in kept.items():
            torch.testing.assert_close(value, whole[key], rtol=0, atol=0)
        assert torch.equal(after_whole, after_backbone), name
