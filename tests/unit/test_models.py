"""DeepFM against brute force; the registry. (The layer rules, models/ free of distributed
code among them, are tests/unit/test_layers.py.)"""

from __future__ import annotations


import pytest
import torch

from data.reader import ParquetReader
from data.schema import Schema
from models import get_model_spec, list_models
from trainer.tasks.ctr import CTRTrain

def test_fm_term_equals_bruteforce_pairwise_sum(tiny_ctr: str) -> None:
    schema = Schema.load(tiny_ctr)
    spec = get_model_spec("deepfm")
    torch.manual_seed(0)
    model = spec.build(schema, spec.make_args("small"), "cpu")
    batch = next(iter(ParquetReader(tiny_ctr, "train", 32, prefetch=0)))
    vectors, first = model.fields(batch)
    B, F, D = vectors.shape
    assert (B, F, D) == (32, len(schema.sparse_features) + 1, model.dim)
    fm = model.fm(vectors)
    brute = torch.zeros(B)
    for i in range(F):
        for j in range(i + 1, F):
            brute += (vectors[:, i] * vectors[:, j]).sum(dim=1)
    torch.testing.assert_close(fm, brute, rtol=1e-4, atol=1e-5)
    assert brute.abs().max() > 1e-3  # not trivially zero


def test_first_order_is_the_last_table_column(tiny_ctr: str) -> None:
    schema = Schema.load(tiny_ctr)
    spec = get_model_spec("deepfm")
    model = spec.build(schema, spec.make_args("small"), "cpu")
    batch = next(iter(ParquetReader(tiny_ctr, "train", 16, prefetch=0)))
    _, first = model.fields(batch)
    expected = model.dense_linear(batch.dense).squeeze(1)
    per_feature = batch.sparse.to_dict()
    for f in schema.sparse_features:
        weight = model.ebc.embedding_bags[f.table].weight  # type: ignore[index]
        jt = per_feature[f.name]
        rows = [weight[jt.values()[s:e], -1].sum() for s, e in
                zip(jt.offsets()[:-1].tolist(), jt.offsets()[1:].tolist())]
        expected = expected + torch.stack(rows)
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-6)


def test_deepfm_field_scale_scales_the_sparse_fm_vectors_only(tiny_ctr: str) -> None:
    """FM vectors of the sparse fields = stored columns x field_scale; the dense field and the
    first-order term are not scaled."""
    schema = Schema.load(tiny_ctr)
    spec = get_model_spec("deepfm")
    model = spec.build(schema, spec.make_args("small", {"field_scale": 4.0}), "cpu")
    unscaled = spec.build(schema, spec.make_args("small"), "cpu")
    unscaled.load_state_dict(model.state_dict())
    batch = next(iter(ParquetReader(tiny_ctr, "train", 8, prefetch=0)))
    (vectors, first), (plain, plain_first) = model.fields(batch), unscaled.fields(batch)
    torch.testing.assert_close(vectors[:, 1:], 4.0 * plain[:, 1:])  # field 0: dense
    torch.testing.assert_close(vectors[:, 0], plain[:, 0])
    torch.testing.assert_close(first, plain_first)


def test_output_shapes_and_loss(tiny_ctr: str) -> None:
    schema = Schema.load(tiny_ctr)
    spec = get_model_spec("deepfm")
    task = CTRTrain(spec.build(schema, spec.make_args("default"), "cpu"))
    batch = next(iter(ParquetReader(tiny_ctr, "train", 24, prefetch=0)))
    loss, (loss_d, logits, labels) = task(batch)
    assert logits.shape == (24,) and labels.shape == (24,) and loss.dim() == 0
    loss.backward()
    grads = [p.grad for p in task.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_unknown_model_and_flavour_list_known_ones() -> None:
    with pytest.raises(KeyError, match="known models: .*deepfm"):
        get_model_spec("nosuchmodel")
    spec = get_model_spec("deepfm")
    with pytest.raises(KeyError, match="flavours: default"):
        spec.make_args("huge-ish")
    with pytest.raises(KeyError, match="valid keys: .*deep_dims"):
        spec.make_args("default", {"depth": 3})
    assert "deepfm" in list_models()


def test_table_width_must_suit_fbgemm(tiny_ctr: str) -> None:
    schema = Schema.load(tiny_ctr)
    spec = get_model_spec("deepfm")
    with pytest.raises(ValueError, match="multiple of 4"):
        spec.build(schema, spec.make_args("default", {"embedding_dim": 10}), "meta")
