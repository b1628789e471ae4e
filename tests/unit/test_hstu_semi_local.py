"""Semi-local HSTU attention against the masked dense reference (values and gradients), the
reference's mask against a scalar loop, and its cost bound."""

from __future__ import annotations

from typing import Dict, List, Optional

import pytest
import torch
import torch.nn.functional as F

from models.hstu.attention import hstu_attention
from models.hstu.semi_local import _tiles
from tests.unit.test_hstu_attention import GRAD_KEYS, MAX_LEN, assert_all_close, make_batch, naive


def run(batch: Dict[str, Optional[torch.Tensor]], impl: str, window: int, global_tokens: int,
        query_ts: bool = False) -> List[torch.Tensor]:
    leaves = {key: batch[key].clone().requires_grad_()  # type: ignore[union-attr]
              for key in GRAD_KEYS if batch[key] is not None}
    tq = None
    if query_ts and batch["timestamps"] is not None:
        tq = batch["timestamps"] + 1000  # type: ignore[operator]
    out = hstu_attention(leaves["q"], leaves["k"], leaves["v"], batch["offsets"], MAX_LEN,
                         leaves["rab_pos"], leaves.get("rab_time"), batch["timestamps"],
                         impl=impl, query_timestamps=tq, window=window,
                         global_tokens=global_tokens)
    weight = torch.sin(torch.arange(out.numel(), dtype=out.dtype) * 1.3).reshape(out.shape)
    (out * weight).sum().backward()
    return [out.detach()] + [leaves[key].grad for key in GRAD_KEYS if key in leaves]


# Empty and length-1 sequences, lengths around the window and the tile, one of MAX_LEN and
# one past the 64-row tile (rel clamped at MAX_LEN - 1).
LENGTHS = [5, 0, 1, 48, 9, 0, 33, 1, 130]


@pytest.mark.parametrize("window,global_tokens,with_time,query_ts", [
    (1, 0, False, False),    # the diagonal only
    (4, 2, True, False),     # tile of 4 rows, band of 7 keys
    (16, 3, True, True),     # evaluation-style query timestamps
    (100, 4, True, False),   # 64-row tiles, window wider than most sequences
    (7, 50, False, False),   # more global tokens than most sequences have
])
def test_semi_local_matches_masked_dense(window: int, global_tokens: int, with_time: bool,
                                         query_ts: bool) -> None:
    batch = make_batch(LENGTHS, heads=2, dim=3, dtype=torch.float64, seed=11,
                       with_time=with_time)
    got = run(batch, "semi_local", window, global_tokens, query_ts)
    want = run(batch, "pytorch_padded", window, global_tokens, query_ts)
    assert_all_close(got, want, 1e-10)


def test_small_chunks_and_wide_window_equal_full_attention(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """A window covering every sequence is full causal attention; one tile per chunk
    exercises the chunk bookkeeping."""
    import models.hstu.semi_local as semi

    inner = semi.semi_local_attention
    monkeypatch.setattr(semi, "semi_local_attention",
                        lambda *a, **kw: inner(*a, **{**kw, "block": 8, "tile_cells": 1}))
    batch = make_batch([20, 0, 3, 48], heads=1, dim=4, dtype=torch.float64, seed=12,
                       with_time=True)
    full = make_batch([20, 0, 3, 48], heads=1, dim=4, dtype=torch.float64, seed=12,
                      with_time=True)
    got = run(batch, "semi_local", MAX_LEN, 0)
    leaves = {key: full[key].clone().requires_grad_()  # type: ignore[union-attr]
              for key in GRAD_KEYS}
    out = hstu_attention(leaves["q"], leaves["k"], leaves["v"], full["offsets"], MAX_LEN,
                         leaves["rab_pos"], leaves["rab_time"], full["timestamps"],
                         impl="pytorch_jagged")
    weight = torch.sin(torch.arange(out.numel(), dtype=out.dtype) * 1.3).reshape(out.shape)
    (out * weight).sum().backward()
    assert_all_close(got, [out.detach()] + [leaves[key].grad for key in GRAD_KEYS], 1e-10)


def test_masked_reference_matches_formula() -> None:
    """The dense reference's semi-local mask, spelled out per (i, j) pair: zero the weights of
    pairs outside the pattern by zeroing the matching value rows of a one-pair loop."""
    window, glob = 3, 2
    batch = make_batch([9, 0, 4], heads=2, dim=3, dtype=torch.float64, seed=13, with_time=True)
    got = hstu_attention(batch["q"], batch["k"], batch["v"], batch["offsets"], MAX_LEN,
                         batch["rab_pos"], batch["rab_time"], batch["timestamps"],
                         impl="pytorch_padded", window=window, global_tokens=glob)
    # Full-attention loop minus the contributions of the excluded pairs.
    want = naive(batch)
    q, k, v, ts = batch["q"], batch["k"], batch["v"], batch["timestamps"]
    offsets = batch["offsets"]
    for b in range(2 + 1):
        lo, hi = int(offsets[b]), int(offsets[b + 1])  # type: ignore[index]
        for i in range(lo, hi):
            for j in range(lo, i + 1):
                if i - j < window or j - lo < glob:
                    continue
                t_i = int(ts[i + 1] if i + 1 < hi else ts[i])  # type: ignore[index]
                gap = max(abs(t_i - int(ts[j])), 1)  # type: ignore[index]
                bucket = min(max(int(torch.tensor(float(gap)).log() / 0.301), 0), 8)
                s = (q[i] * k[j]).sum(-1) + batch["rab_pos"][min(i - j, MAX_LEN - 1)] \
                    + batch["rab_time"][bucket]  # type: ignore[index]
                want[i] -= (F.silu(s) / MAX_LEN)[:, None] * v[j]  # type: ignore[index]
    assert torch.allclose(got, want, atol=1e-12)


def test_cost_is_linear_in_tokens() -> None:
    """Scores per tile are ``T × (G + W + T − 1)`` whatever the length: ``O(ΣL·(W + G))``."""
    window, glob, block = 32, 4, 32
    for length in (100, 1000, 10000):
        offsets = torch.tensor([0, length, length + 7])
        q_rows, _, k_rows, _, _ = _tiles(offsets, length + 7, block, window, glob)
        assert q_rows.shape == (-(-length // block) + 1, block)
        assert k_rows.shape[1] == glob + window + block - 1


def test_bad_window_names_the_arguments() -> None:
    batch = make_batch([3], heads=1, dim=2, dtype=torch.float32, seed=0, with_time=False)
    args = (batch["q"], batch["k"], batch["v"], batch["offsets"], MAX_LEN, batch["rab_pos"])
    with pytest.raises(ValueError, match="window >= 1"):
        hstu_attention(*args, impl="semi_local")
    with pytest.raises(ValueError, match="window"):
        hstu_attention(*args, impl="pytorch_jagged", window=4)


def test_layer_and_model_route_the_semi_local_arguments(capsys: pytest.CaptureFixture) -> None:
    """``attention_impl="semi_local"`` reaches the attention with its window and global
    tokens (the layer equals the masked dense reference with the same weights), and
    ``python -m trainer --help --model.name=hstu`` lists the keys."""
    from models.hstu.layer import HSTULayer
    from trainer.__main__ import main

    torch.manual_seed(0)
    semi = HSTULayer(8, 2, MAX_LEN, num_time_buckets=None, impl="semi_local", window=3,
                     global_tokens=1).double()
    dense = HSTULayer(8, 2, MAX_LEN, num_time_buckets=None, impl="pytorch_padded").double()
    dense.load_state_dict(semi.state_dict())
    dense.window, dense.global_tokens = 3, 1
    x, offsets = torch.randn(30, 8, dtype=torch.float64), torch.tensor([0, 12, 12, 30])
    narrow = semi(x, offsets)
    assert torch.allclose(narrow, dense(x, offsets), atol=1e-12)
    dense.window = 0  # full attention differs: the window really narrowed it
    assert not torch.allclose(narrow, dense(x, offsets), atol=1e-6)
    assert main(["--help", "--model.name=hstu"]) == 0
    out = capsys.readouterr().out
    for key in ("attention_impl", "semi_local_window", "semi_local_global_tokens"):
        assert f"--model.args.{key} " in out
    assert "semi_local" in out.split("--model.args.attention_impl")[1].splitlines()[0]
