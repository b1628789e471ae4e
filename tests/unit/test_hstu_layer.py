"""HSTULayer on a jagged batch equals the formula applied to each sequence alone."""

from __future__ import annotations

import math
from typing import List, Optional

import pytest
import torch
import torch.nn.functional as F

from models.hstu.layer import HSTULayer

DIM, HEADS, MAX_LEN, BUCKETS = 12, 2, 32, 6
LENGTHS = [5, 0, 1, 20, 3]


def one_sequence(layer: HSTULayer, x: torch.Tensor, ts: Optional[torch.Tensor]) -> torch.Tensor:
    """The layer's formula on one sequence ``[L, D]`` at its true length, written out."""
    length = x.shape[0]
    h, dqk, duv = layer.num_heads, layer.attn_dim, layer.linear_dim
    proj = F.silu(F.layer_norm(x, (DIM,), layer.input_norm.weight, layer.input_norm.bias)
                  @ layer.uvqk.weight.T + layer.uvqk.bias)
    u, v, q, k = proj.split([h * duv, h * duv, h * dqk, h * dqk], dim=-1)
    bias = torch.zeros(length, length)
    for i in range(length):
        for j in range(i + 1):
            bias[i, j] = layer.rab_pos[min(i - j, MAX_LEN - 1)]
            if ts is not None:
                t_i = int(ts[i + 1] if i + 1 < length else ts[i])
                gap = max(abs(t_i - int(ts[j])), 1)
                bias[i, j] = bias[i, j] + layer.rab_time[min(int(math.log(gap) / 0.301), BUCKETS)]
    causal = torch.tril(torch.ones(length, length))
    heads_out: List[torch.Tensor] = []
    for head in range(h):
        qh, kh = q[:, head * dqk:(head + 1) * dqk], k[:, head * dqk:(head + 1) * dqk]
        attn = F.silu(qh @ kh.T + bias) / MAX_LEN * causal
        heads_out.append(attn @ v[:, head * duv:(head + 1) * duv])
    av = F.layer_norm(torch.cat(heads_out, -1), (h * duv,), layer.attn_norm.weight,
                      layer.attn_norm.bias)
    return x + (u * av) @ layer.out.weight.T + layer.out.bias


@pytest.mark.parametrize("impl", ["pytorch_padded", "pytorch_jagged"])
@pytest.mark.parametrize("with_time", [False, True])
def test_layer_equals_per_sequence_formula(impl: str, with_time: bool) -> None:
    torch.manual_seed(0)
    layer = HSTULayer(DIM, HEADS, MAX_LEN, num_time_buckets=BUCKETS if with_time else None,
                      impl=impl)
    with torch.no_grad():  # non-trivial norms and biases, so a dropped term shows
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    offsets = torch.tensor([0, *LENGTHS]).cumsum(0)
    x = torch.randn(sum(LENGTHS), DIM, requires_grad=True)
    ts = torch.randint(0, 20000, (sum(LENGTHS),)) if with_time else None

    out = layer(x, offsets, ts)
    weight = torch.randn(out.shape)
    (out * weight).sum().backward()
    got = [x.grad.clone()]  # type: ignore[union-attr]
    got += [p.grad.clone() for p in layer.parameters()]  # type: ignore[union-attr]
    layer.zero_grad()
    x.grad = None

    want_out = torch.cat([one_sequence(layer, x[lo:hi], None if ts is None else ts[lo:hi])
                          for lo, hi in zip(offsets[:-1].tolist(), offsets[1:].tolist())])
    (want_out * weight).sum().backward()
    want = [x.grad] + [p.grad for p in layer.parameters()]

    assert torch.allclose(out, want_out, atol=1e-5)
    for name, g, w in zip(["x"] + [n for n, _ in layer.named_parameters()], got, want):
        assert torch.allclose(g, w, atol=1e-4), f"grad {name}: {float((g - w).abs().max())}"


def test_layer_timestamps_must_match_time_bias() -> None:
    layer = HSTULayer(DIM, HEADS, MAX_LEN, num_time_buckets=BUCKETS)
    with pytest.raises(ValueError, match="timestamps are required exactly when"):
        layer(torch.randn(3, DIM), torch.tensor([0, 3]))


def test_layer_dropout_only_in_training() -> None:
    layer = HSTULayer(DIM, HEADS, MAX_LEN, num_time_buckets=None, dropout=0.5).eval()
    x, offsets = torch.randn(6, DIM), torch.tensor([0, 4, 6])
    assert torch.equal(layer(x, offsets), layer(x, offsets))
    layer.train()
    assert not torch.equal(layer(x, offsets), layer(x, offsets))
