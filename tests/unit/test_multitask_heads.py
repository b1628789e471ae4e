"""Multi-task heads: backbone representations, MMoE / PLE gates, ESMM's product, POSO gates,
the multi-task loss and argument errors."""

from __future__ import annotations

import re
from typing import Any, Dict

import pytest
import torch
from torch import nn

from data.batch import Batch
from data.reader import ParquetReader
from data.schema import Schema
from models import get_model_spec
from models.multitask.common import MultiTaskModel
from trainer.tasks.multitask import MultiTaskTrain


def _batch(path: str, n: int = 64) -> Batch:
    return next(iter(ParquetReader(path, "train", n, prefetch=0)))


def _build(name: str, path: str, flavour: str = "default",
           overrides: Dict[str, Any] | None = None, seed: int = 0) -> MultiTaskModel:
    spec = get_model_spec(name)
    torch.manual_seed(seed)
    model = spec.build(Schema.load(path), spec.make_args(flavour, overrides), "cpu")
    with torch.no_grad():  # embeddings far from zero, so every path carries signal
        for n, p in model.named_parameters():
            if "embedding_bags" in n or "embeddings" in n:
                p.uniform_(-0.5, 0.5)
    return model  # type: ignore[return-value]


@pytest.mark.parametrize("backbone,data", [("deepfm", "ctr"), ("dcn_v2", "ctr"),
                                           ("interformer", "seq")])
def test_backbone_representation_is_what_forward_maps_to_its_logit(
        backbone: str, data: str, tiny_ctr: str, tiny_seq: str) -> None:
    path = tiny_ctr if data == "ctr" else tiny_seq
    spec = get_model_spec(backbone)
    torch.manual_seed(0)
    model = spec.build(Schema.load(path), spec.make_args("small"), "cpu")
    batch = _batch(path)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        rep = model.representation(batch)
        assert rep.shape == (64, model.representation_dim)
        if backbone == "deepfm":
            d = model.dim
            h, fm, first = rep[:, :-d - 1], rep[:, -d - 1:-1], rep[:, -1]
            logit = model.deep[-1](h).squeeze(1) + fm.sum(1) + first + model.bias
        elif backbone == "dcn_v2":
            logit = model.head(rep).squeeze(1)
        else:
            logit = model.arch.head(rep).squeeze(1)
        torch.testing.assert_close(logit, model(batch), rtol=1e-5, atol=1e-5)


def test_mmoe_gates_sum_to_one_per_task(tiny_ctr2: str) -> None:
    model = _build("mmoe", tiny_ctr2, overrides={"num_experts": 3})
    batch = _batch(tiny_ctr2)
    with torch.no_grad():
        rep = model.backbone.representation(batch)
        inputs, weights = model.mixture(rep, None)
    assert weights.shape == (64, 2, 3)  # two tasks (click, conversion), three experts
    torch.testing.assert_close(weights.sum(-1), torch.ones(64, 2))
    assert bool((weights > 0).all())
    # Different gates, different mixtures: the tasks do not share one input.
    assert not torch.allclose(inputs[0], inputs[1])
    assert model(batch).shape == (64, 2)


def test_ple_gates_sum_to_one_per_task_and_level(tiny_ctr2: str) -> None:
    model = _build("ple", tiny_ctr2, overrides={"num_levels": 2, "num_shared_experts": 2,
                                                "num_task_experts": 2})
    batch = _batch(tiny_ctr2)
    with torch.no_grad():
        _, levels = model.extract(model.backbone.representation(batch), None)
    assert len(levels) == 2
    # Level 1: two task gates over 2 own + 2 shared experts and the shared gate over all 6;
    # the last level has no shared gate.
    assert [w.shape[1] for w in levels[0]] == [4, 4, 6]
    assert [w.shape[1] for w in levels[1]] == [4, 4]
    for weights in levels:
        for w in weights:
            torch.testing.assert_close(w.sum(1), torch.ones(64))
    assert model(batch).shape == (64, 2)


def test_esmm_ctcvr_is_the_product_of_its_towers(tiny_ctr2: str) -> None:
    model = _build("esmm", tiny_ctr2)
    batch = _batch(tiny_ctr2)
    with torch.no_grad():
        for p in model.ctr_tower.parameters():  # spread pCTR and pCVR over (0, 1)
            p.mul_(4.0)
        logits = model(batch)
        rep = model.backbone.representation(batch)
        p_ctr = torch.sigmoid(model.ctr_tower(rep).squeeze(1))
        p_cvr = torch.sigmoid(model.cvr_tower(rep).squeeze(1))
    assert [p.name for p in model.predictions] == ["click", "conversion", "cvr"]
    torch.testing.assert_close(torch.sigmoid(logits[:, 0]), p_ctr)
    torch.testing.assert_close(torch.sigmoid(logits[:, 2]), p_cvr)
    torch.testing.assert_close(torch.sigmoid(logits[:, 1]), p_ctr * p_cvr, rtol=1e-5, atol=1e-7)
    assert float(p_ctr.std()) > 0.02 and float(p_cvr.std()) > 1e-3
    # No direct CVR loss: the loss is BCE(pCTR, click) + BCE(pCTCVR, conversion) exactly.
    loss, _ = MultiTaskTrain(model)(batch)
    bce = nn.functional.binary_cross_entropy
    expected = bce(p_ctr, batch.labels[:, 0]) + bce(p_ctr * p_cvr, batch.labels[:, 1])
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    # The CVR prediction is evaluated on clicked rows by default (the paper's CVR AUC).
    assert model.predictions[2].weight == 0 and model.predictions[2].eval_given == 0


def test_poso_with_constant_gate_equals_plain_mmoe_scaled(tiny_ctr2: str) -> None:
    """What is compared: POSO and plain MMoE with identical weights (the POSO model's
    state dict minus its gates loaded into the MMoE), on the same batch.

    * A fresh gate is the constant C/2 = 1: POSO's logits equal MMoE's exactly.
    * Gates set to a constant s (last layer weight 0, bias logit(s/C)): every expert's
      hidden units are s times MMoE's expert on the same representation, and every tower's
      hidden units are s times MMoE's tower applied to the same input (POSO's mixture).
      (The logits themselves are not a multiple of MMoE's: biases of the next layers.)
    """
    poso = _build("poso", tiny_ctr2, overrides={"poso_dense": ["d0", "d1"]})
    plain = _build("mmoe", tiny_ctr2)
    # POSO gates live in GatedMLP.gates (experts.K.gates.*, towers.T.body.gates.*).
    state = {k: v for k, v in poso.state_dict().items()
             if not re.search(r"(^experts\.\d+|\.body)\.gates\.", k)}
    plain.load_state_dict(state)
    batch = _batch(tiny_ctr2)
    with torch.no_grad():
        torch.testing.assert_close(poso(batch), plain(batch))
        s, C = 0.6, poso.args.poso_scale
        for gate in (m for m in poso.modules() if type(m).__name__ == "PosoGate"):
            gate.out.bias.fill_(float(torch.logit(torch.tensor(s / C))))
    rep = poso.backbone.representation(batch)
    pc = poso.personalisation(batch)
    with torch.no_grad():
        for k in range(4):  # every expert's hidden units: s times MMoE's expert
            torch.testing.assert_close(poso.experts[k](rep, pc), s * plain.experts[k](rep),
                                       rtol=1e-5, atol=1e-6)
        # Towers see POSO's (already scaled) expert mixture; their hidden units are s times
        # the plain tower's on that same input.
        inputs, _ = poso.mixture(rep, pc)
        for t, x in enumerate(inputs):
            torch.testing.assert_close(poso.towers[t].body(x, pc), s * plain.towers[t].body(x),
                                       rtol=1e-5, atol=1e-6)
    # A gate that depends on pc changes the output per row.
    with torch.no_grad():
        for gate in (m for m in poso.modules() if type(m).__name__ == "PosoGate"):
            gate.out.weight.normal_()
        assert not torch.allclose(poso(batch), plain(batch))


def test_poso_sparse_feature_gate(tiny_ctr2: str) -> None:
    model = _build("poso", tiny_ctr2, overrides={"poso_dense": [], "poso_sparse": ["s0"]})
    batch = _batch(tiny_ctr2)
    assert model.personalisation(batch).shape == (64, 8)
    assert [c.name for c in model.poso_ebc.embedding_bag_configs()] == ["poso_t0"]
    assert model(batch).shape == (64, 2)


@pytest.mark.parametrize("name", ["shared_bottom", "mmoe", "ple", "esmm", "poso"])
def test_every_head_trains_one_step(name: str, tiny_ctr2: str) -> None:
    model = _build(name, tiny_ctr2)
    wrapped = MultiTaskTrain(model)
    batch = _batch(tiny_ctr2)
    loss, (_, logits, labels) = wrapped(batch)
    loss.backward()
    # Every parameter gets a gradient: DDP would fail on unused ones (the backbone's
    # dropped logit layer must really be gone).
    missing = [n for n, p in wrapped.named_parameters() if p.grad is None]
    assert not missing, missing
    assert labels.shape == (64, 3) and logits.shape[0] == 64


def test_loss_weights_and_given_mask(tiny_ctr2: str) -> None:
    model = _build("shared_bottom", tiny_ctr2,
                   overrides={"loss_weights": {"click": 0.0, "conversion": 2.0},
                              "loss_given": {"conversion": "click"}})
    batch = _batch(tiny_ctr2)
    loss, (_, logits, labels) = MultiTaskTrain(model)(batch)
    clicked = labels[:, 0] == 1
    expected = 2.0 * nn.functional.binary_cross_entropy_with_logits(
        logits[clicked, 1], labels[clicked, 1])
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("overrides,message", [
    ({"loss_weights": {"clik": 1.0}}, r"model.args.loss_weights: unknown task\(s\) \['clik'\]"),
    ({"loss_weights": {"click": -1.0}}, r"model.args.loss_weights.click=-1.0 must be"),
    ({"tasks": ["click", "ctr"]}, r"model.args.tasks=.*unknown label\(s\) \['ctr'\]"),
    ({"backbone": "autoint"}, r"model.args.backbone='autoint'; choose one of"),
    ({"poso_dense": ["nope"]}, r"model.args.poso_dense: unknown dense feature"),
    ({"loss_given": {"click": "nope"}}, r"model.args.loss_given: unknown label"),
])
def test_bad_arguments_name_the_key(overrides: Dict[str, Any], message: str,
                                    tiny_ctr2: str) -> None:
    with pytest.raises(ValueError, match=message):
        _build("mmoe", tiny_ctr2, overrides=overrides)


def test_poso_without_features_and_esmm_task_count(tiny_ctr2: str) -> None:
    with pytest.raises(ValueError, match="poso_dense and model.args.poso_sparse are both"):
        _build("poso", tiny_ctr2, overrides={"poso_dense": []})
    with pytest.raises(ValueError, match="ESMM needs exactly two tasks"):
        _build("esmm", tiny_ctr2, overrides={"tasks": ["click"]})


def test_heads_over_interformer_on_sequence_data(tiny_seq: str) -> None:
    """The InterFormer backbone (pooled + sequence embeddings) under a head; one label, so
    one task: a multi-task head on single-label data is a single-task model."""
    model = _build("mmoe", tiny_seq, flavour="interformer")
    wrapped = MultiTaskTrain(model)
    batch = _batch(tiny_seq)
    loss, (_, logits, labels) = wrapped(batch)
    loss.backward()
    assert logits.shape == (64, 1) and labels.shape == (64, 1)
    missing = [n for n, p in wrapped.named_parameters() if p.grad is None]
    assert not missing, missing
    assert model.rep_dim == model.backbone.arch.representation_dim


def test_metrics_per_prediction_with_masks_equal_exact_auc() -> None:
    """torchrec's AUC / NE per prediction, with rows outside an evaluation mask weighted 0,
    equal the exact AUC over the kept rows; MSE for a regression output."""
    from data.metrics import roc_auc
    from models.multitask.common import Prediction
    from trainer.tasks.multitask import MultiTaskMetrics

    torch.manual_seed(0)
    n = 512
    labels = torch.stack([(torch.rand(n) < 0.4).float(), (torch.rand(n) < 0.5).float(),
                          torch.randn(n)], dim=1)
    logits = torch.stack([labels[:, 0] + torch.randn(n), labels[:, 1] + torch.randn(n),
                          labels[:, 2] + 0.5 * torch.randn(n)], dim=1)
    preds = [Prediction("a", "binary", 0, 1.0),
             Prediction("b", "binary", 1, 1.0, given=0, eval_label=1, eval_given=0),
             Prediction("r", "regression", 2, 1.0, eval_label=2)]
    metrics = MultiTaskMetrics(preds, 1, 0, 128, n, torch.device("cpu"))
    for k in range(0, n, 128):
        metrics.update(logits[k:k + 128], labels[k:k + 128])
    out = metrics.compute()
    keep = labels[:, 0] == 1
    assert out["auc_a"] == pytest.approx(roc_auc(logits[:, 0].numpy(), labels[:, 0].numpy()),
                                         abs=1e-4)
    assert out["auc_b"] == pytest.approx(roc_auc(logits[keep, 1].numpy(),
                                                 labels[keep, 1].numpy()), abs=1e-4)
    # The masked AUC is not the unmasked one: the mask really is applied.
    assert abs(out["auc_b"] - roc_auc(logits[:, 1].numpy(), labels[:, 1].numpy())) > 1e-3
    bce = nn.functional.binary_cross_entropy_with_logits(logits[keep, 1], labels[keep, 1])
    assert out["logloss_b"] == pytest.approx(float(bce), abs=1e-5)
    assert out["mse_r"] == pytest.approx(float((logits[:, 2] - labels[:, 2]).pow(2).mean()),
                                         rel=1e-4)
