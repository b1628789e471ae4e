"""DCN-v2 and AutoInt against their formulas, computed by hand from the modules' weights."""

from __future__ import annotations

import pytest
import torch
from torchrec.modules.crossnet import CrossNet, LowRankCrossNet, LowRankMixtureCrossNet

from data.reader import ParquetReader
from data.schema import Schema
from models import get_model_spec
from models.autoint import InteractingLayer
from trainer.tasks.ctr import CTRTrain


def test_cross_layer_equals_formula(tiny_ctr: str) -> None:
    schema = Schema.load(tiny_ctr)
    spec = get_model_spec("dcn_v2")
    torch.manual_seed(0)
    model = spec.build(schema, spec.make_args("full", {"cross_layers": 2}), "cpu")
    assert isinstance(model.cross, CrossNet)
    with torch.no_grad():
        for p in model.cross.parameters():
            p.uniform_(-0.2, 0.2)
    batch = next(iter(ParquetReader(tiny_ctr, "train", 16, prefetch=0)))
    x0 = model.cross_input(batch)
    assert x0.shape == (16, schema.dense_dim + 16 * len(schema.sparse_features))
    x = x0
    for W, b in zip(model.cross.kernels, model.cross.bias):
        x = x0 * (x @ W.T + b.squeeze(1)) + x  # x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l
    got = model.cross(x0)
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)
    assert (got - x0).abs().max() > 1e-2  # the layers did something


def test_low_rank_cross_equals_formula() -> None:
    torch.manual_seed(0)
    net = LowRankCrossNet(12, 2, low_rank=3)
    x0 = torch.randn(5, 12)
    x = x0
    for W, V, b in zip(net.W_kernels, net.V_kernels, net.bias):
        x = x0 * (W @ (V @ x.T)).T + x0 * b + x
    torch.testing.assert_close(net(x0), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flavour", ["default", "full", "low_rank", "parallel", "small"])
def test_dcn_v2_flavours_train(tiny_ctr: str, flavour: str) -> None:
    schema = Schema.load(tiny_ctr)
    spec = get_model_spec("dcn_v2")
    model = spec.build(schema, spec.make_args(flavour), "cpu")
    if flavour == "default":
        assert isinstance(model.cross, LowRankMixtureCrossNet)
    batch = next(iter(ParquetReader(tiny_ctr, "train", 24, prefetch=0)))
    loss, (_, logits, _) = CTRTrain(model)(batch)
    loss.backward()
    assert logits.shape == (24,)
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0


def test_dcn_v2_bad_args_name_the_choices(tiny_ctr: str) -> None:
    schema = Schema.load(tiny_ctr)
    spec = get_model_spec("dcn_v2")
    with pytest.raises(ValueError, match="cross_type='fancy'.*'mixture'"):
        spec.build(schema, spec.make_args("default", {"cross_type": "fancy"}), "cpu")


def test_autoint_attention_equals_naive_per_head() -> None:
    torch.manual_seed(0)
    H, d, D, M, B = 3, 4, 7, 5, 2
    layer = InteractingLayer(D, H, d, residual=True)
    e = torch.randn(B, M, D)
    out = layer(e)
    Wq, Wk, Wv, Wr = (m.weight for m in (layer.query, layer.key, layer.value, layer.res))
    expected = torch.zeros(B, M, H * d)
    for b in range(B):
        for h in range(H):
            rows = slice(h * d, (h + 1) * d)
            for m in range(M):
                q = Wq[rows] @ e[b, m]
                scores = torch.stack([q @ (Wk[rows] @ e[b, k]) for k in range(M)])
                alpha = torch.softmax(scores, dim=0)
                expected[b, m, rows] = sum(alpha[k] * (Wv[rows] @ e[b, k]) for k in range(M))
    torch.testing.assert_close(layer.attention(e), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, torch.relu(expected + e @ Wr.T), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flavour", ["default", "plus", "small_plus"])
def test_autoint_flavours_train(tiny_ctr: str, flavour: str) -> None:
    schema = Schema.load(tiny_ctr)
    spec = get_model_spec("autoint")
    model = spec.build(schema, spec.make_args(flavour), "cpu")
    assert (model.deep is not None) == flavour.endswith("plus")
    batch = next(iter(ParquetReader(tiny_ctr, "train", 24, prefetch=0)))
    vectors, _ = model.fields(batch)
    assert vectors.shape == (24, schema.dense_dim + len(schema.sparse_features), model.dim)
    loss, (_, logits, _) = CTRTrain(model)(batch)
    loss.backward()
    assert logits.shape == (24,)
    assert model.layers[0].query.weight.grad.abs().sum() > 0


def test_autoint_fields_are_scaled_table_vectors(tiny_ctr: str) -> None:
    """Sparse fields = stored vector columns × field_scale; the first-order column and the
    dense fields are not scaled."""
    schema = Schema.load(tiny_ctr)
    spec = get_model_spec("autoint")
    args = spec.make_args("default")
    args.field_scale = 3.0
    model = spec.build(schema, args, "cpu")
    batch = next(iter(ParquetReader(tiny_ctr, "train", 8, prefetch=0)))
    vectors, first = model.fields(batch)
    args.field_scale = 1.0
    unscaled = spec.build(schema, args, "cpu")
    unscaled.load_state_dict(model.state_dict())
    plain, plain_first = unscaled.fields(batch)
    dense = schema.dense_dim
    torch.testing.assert_close(vectors[:, dense:], 3.0 * plain[:, dense:])
    torch.testing.assert_close(vectors[:, :dense], plain[:, :dense])
    torch.testing.assert_close(first, plain_first)
