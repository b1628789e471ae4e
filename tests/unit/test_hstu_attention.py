"""HSTU jagged attention: every implementation against the padded reference, and the
reference against a scalar loop that spells the formula out."""

from __future__ import annotations

import importlib
import math
import sys
from typing import Dict, List, Optional, Sequence

import pytest
import torch
import torch.nn.functional as F

from models.hstu.attention import hstu_attention, time_buckets

MAX_LEN = 48
NUM_BUCKETS = 8


def make_batch(lengths: Sequence[int], heads: int, dim: int, dtype: torch.dtype,
               seed: int, with_time: bool) -> Dict[str, Optional[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    # Gaps spread over many buckets (1 s .. ~1 day), sorted within each sequence.
    gaps = torch.exp(torch.rand(total, generator=gen) * 11).to(torch.int64)
    ts = torch.cat([g.cumsum(0) for g in gaps.split(list(lengths))]) if total else gaps
    return {
        "q": torch.randn(total, heads, dim, generator=gen, dtype=dtype),
        "k": torch.randn(total, heads, dim, generator=gen, dtype=dtype),
        "v": torch.randn(total, heads, dim + 1, generator=gen, dtype=dtype),
        "rab_pos": torch.randn(MAX_LEN, generator=gen, dtype=dtype),
        "rab_time": torch.randn(NUM_BUCKETS + 1, generator=gen, dtype=dtype) if with_time else None,
        "timestamps": ts if with_time else None,
        "offsets": offsets,
    }


GRAD_KEYS = ("q", "k", "v", "rab_pos", "rab_time")


def run(batch: Dict[str, Optional[torch.Tensor]], impl: str, seed: int = 7) -> List[torch.Tensor]:
    """Output, then the gradients of GRAD_KEYS, for a random linear loss of the output."""
    leaves = {key: batch[key].clone().requires_grad_()  # type: ignore[union-attr]
              for key in GRAD_KEYS if batch[key] is not None}
    out = hstu_attention(leaves["q"], leaves["k"], leaves["v"], batch["offsets"], MAX_LEN,
                         leaves["rab_pos"], leaves.get("rab_time"), batch["timestamps"],
                         impl=impl)
    # Row r's weights depend only on r, so a prefix of the batch sees the same loss terms.
    weight = torch.cos(torch.arange(out.numel(), dtype=out.dtype) * (1 + seed)).reshape(out.shape)
    (out * weight).sum().backward()
    return [out.detach()] + [leaves[key].grad for key in GRAD_KEYS if key in leaves]


@pytest.fixture
def triton_interpreter(monkeypatch):
    """Interpret the Triton kernels on CPU: the module decides at import, so (re)import it."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    name = "models.hstu.triton_attention"
    if name in sys.modules:
        importlib.reload(sys.modules[name])
    else:
        importlib.import_module(name)
    yield
    sys.modules.pop(name, None)  # the next importer decides afresh


def assert_all_close(got: List[torch.Tensor], want: List[torch.Tensor], tol: float) -> None:
    assert len(got) == len(want)
    for name, a, b in zip(("out",) + GRAD_KEYS, got, want):
        assert a.shape == b.shape, name
        assert torch.allclose(a, b, rtol=tol, atol=tol), \
            f"{name}: max abs diff {float((a - b).abs().max())}"


# Length-0 and length-1 sequences, several lengths inside one 64-row tile, one filling
# the configured maximum.
JAGGED_LENGTHS = [5, 0, 1, 48, 0, 25, 33, 1, MAX_LEN]


# Both CPU jagged implementations: the Python tiles and the compiled C++ kernel.
JAGGED_IMPLS = ["pytorch_jagged", "compiled_jagged"]


@pytest.mark.parametrize("impl", JAGGED_IMPLS)
@pytest.mark.parametrize("with_time", [False, True])
def test_jagged_matches_padded(with_time: bool, impl: str) -> None:
    batch = make_batch(JAGGED_LENGTHS, heads=2, dim=4, dtype=torch.float64, seed=0,
                       with_time=with_time)
    assert_all_close(run(batch, impl), run(batch, "pytorch_padded"), 1e-10)


@pytest.mark.parametrize("impl", JAGGED_IMPLS)
def test_jagged_tiles_more_than_one_block(impl: str) -> None:
    """Lengths above the 64-row tile exercise the multi-tile path (rel clamped at MAX_LEN)."""
    batch = make_batch([150, 3, 64, 65, 0], heads=1, dim=3, dtype=torch.float64, seed=1,
                       with_time=True)
    assert_all_close(run(batch, impl), run(batch, "pytorch_padded"), 1e-10)


def test_compiled_kernel_is_built_and_fp32_matches() -> None:
    """The compiled kernel really runs here (no silent fallback), in fp32 too, and with a
    32-row block (several tiles per sequence)."""
    from models.hstu.compiled import compiled_jagged_attention, load_kernel

    assert load_kernel() is not None, "the C++ kernel did not build (see the log)"
    batch = make_batch([40, 3, 0, 33, 48, 1, 32, 7], heads=3, dim=4, dtype=torch.float32,
                       seed=4, with_time=True)
    args = (batch["q"], batch["k"], batch["v"], batch["offsets"], MAX_LEN, batch["rab_pos"],
            batch["rab_time"], batch["timestamps"])
    got = compiled_jagged_attention(*args, block=32)  # type: ignore[arg-type]
    want = hstu_attention(*args, impl="pytorch_padded")  # type: ignore[arg-type]
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())


def test_compiled_time_buckets_are_exact() -> None:
    """The kernel's table-driven buckets equal ``time_buckets`` on every threshold, its
    neighbours and log-uniform gaps up to 2⁶² (128 buckets: the cells above 64 hold one
    threshold each)."""
    from models.hstu.compiled import bucket_thresholds, load_kernel

    kernel = load_kernel()
    assert kernel is not None
    gen = torch.Generator().manual_seed(0)
    for nb in (8, 128, 255):
        thr = bucket_thresholds(nb)
        edges = thr[thr < (1 << 62)]
        gaps = torch.cat([torch.arange(-70, 70), edges - 1, edges, edges + 1, -edges,
                          torch.exp(torch.rand(20_000, generator=gen) * 42.9).long()])
        assert torch.equal(kernel.time_buckets(gaps, thr), time_buckets(gaps, nb)), nb


def test_jagged_chunks_and_tile_groups_match_padded(monkeypatch: pytest.MonkeyPatch) -> None:
    """One sequence per chunk (``tile_cells=1``) and several tile-count groups, with the
    32-row block: the chunk and group bookkeeping, not only the one-chunk fast case."""
    import models.hstu.attention as attention

    jagged = attention._jagged
    monkeypatch.setattr(attention, "_jagged",
                        lambda *a, **kw: jagged(*a, **{**kw, "block": 32, "tile_cells": 1}))
    batch = make_batch([40, 3, 0, 33, 48, 1, 32, 7], heads=3, dim=4, dtype=torch.float64,
                       seed=4, with_time=True)
    assert_all_close(run(batch, "pytorch_jagged"), run(batch, "pytorch_padded"), 1e-10)


@pytest.mark.parametrize("with_time", [False, True])
def test_triton_matches_padded(with_time: bool, triton_interpreter) -> None:
    # Tiny: the interpreter runs each program in Python. 20 > one 16-row block.
    batch = make_batch([5, 0, 1, 20], heads=2, dim=4, dtype=torch.float32, seed=2,
                       with_time=with_time)
    assert_all_close(run(batch, "triton"), run(batch, "pytorch_padded"), 1e-4)


@pytest.mark.parametrize("impl", ["pytorch_padded", *JAGGED_IMPLS])
def test_padding_never_leaks(impl: str) -> None:
    """A sequence's output and input gradients do not depend on the other sequences."""
    batch = make_batch([7, 0, 30, 1], heads=2, dim=4, dtype=torch.float64, seed=3,
                       with_time=True)
    alone = make_batch([7], heads=2, dim=4, dtype=torch.float64, seed=3, with_time=True)
    for key in ("q", "k", "v", "timestamps"):
        alone[key] = batch[key][:7].clone()  # type: ignore[index]
    for key in ("rab_pos", "rab_time"):
        alone[key] = batch[key]
    together, single = run(batch, impl), run(alone, impl)
    assert torch.allclose(together[0][:7], single[0], atol=1e-12)
    for grad_t, grad_s in zip(together[1:4], single[1:4]):
        assert torch.allclose(grad_t[:7], grad_s, atol=1e-12)


def test_triton_padding_never_leaks(triton_interpreter) -> None:
    batch = make_batch([3, 18], heads=1, dim=4, dtype=torch.float32, seed=4, with_time=False)
    alone = dict(batch, offsets=torch.tensor([0, 3]))
    for key in ("q", "k", "v"):
        alone[key] = batch[key][:3].clone()  # type: ignore[index]
    together, single = run(batch, "triton"), run(alone, "triton")
    assert torch.allclose(together[0][:3], single[0], atol=1e-6)


def naive(batch: Dict[str, Optional[torch.Tensor]]) -> torch.Tensor:
    """The formula, one (i, j) pair at a time, with the last token using its own time."""
    q, k, v, offsets = batch["q"], batch["k"], batch["v"], batch["offsets"]
    rab_pos, rab_time, ts = batch["rab_pos"], batch["rab_time"], batch["timestamps"]
    out = torch.zeros(v.shape, dtype=v.dtype)  # type: ignore[union-attr]
    for b in range(offsets.numel() - 1):  # type: ignore[union-attr]
        lo, hi = int(offsets[b]), int(offsets[b + 1])  # type: ignore[index]
        for i in range(lo, hi):
            for j in range(lo, i + 1):
                bias = float(rab_pos[min(i - j, MAX_LEN - 1)])  # type: ignore[index]
                if rab_time is not None:
                    t_i = int(ts[i + 1] if i + 1 < hi else ts[i])  # type: ignore[index]
                    gap = max(abs(t_i - int(ts[j])), 1)  # type: ignore[index]
                    bucket = min(max(math.floor(math.log(gap) / 0.301), 0), NUM_BUCKETS)
                    bias += float(rab_time[bucket])
                s = (q[i] * k[j]).sum(-1) + bias  # type: ignore[index]
                out[i] += (F.silu(s) / MAX_LEN)[:, None] * v[j]  # type: ignore[index]
    return out


@pytest.mark.parametrize("with_time", [False, True])
def test_padded_reference_matches_formula(with_time: bool) -> None:
    batch = make_batch([4, 0, 1, 9], heads=2, dim=3, dtype=torch.float64, seed=5,
                       with_time=with_time)
    got = hstu_attention(batch["q"], batch["k"], batch["v"], batch["offsets"], MAX_LEN,
                         batch["rab_pos"], batch["rab_time"], batch["timestamps"],
                         impl="pytorch_padded")
    assert torch.allclose(got, naive(batch), atol=1e-12)


def test_time_buckets() -> None:
    dt = torch.tensor([0, 1, -1, 2, 3, 4, 1000, -(10**9)])
    # ln(2)/0.301 = 2.30 -> 2; ln(3)/0.301 = 3.65 -> 3; ln(1000)/0.301 = 22.9 -> clamped 8.
    assert time_buckets(dt, 8).tolist() == [0, 0, 0, 2, 3, 4, 8, 8]


@pytest.mark.parametrize("impl", ["pytorch_padded", *JAGGED_IMPLS])
def test_empty_batches(impl: str) -> None:
    for lengths in ([], [0, 0]):
        batch = make_batch(lengths, heads=2, dim=4, dtype=torch.float32, seed=6,
                           with_time=True)
        grads = run(batch, impl)
        assert grads[0].shape == (0, 2, 5)


def test_bad_arguments_name_the_offender() -> None:
    batch = make_batch([3], heads=1, dim=4, dtype=torch.float32, seed=0, with_time=False)
    args = (batch["q"], batch["k"], batch["v"], batch["offsets"], MAX_LEN, batch["rab_pos"])
    with pytest.raises(ValueError, match="unknown hstu_attention impl 'fast'.*pytorch_jagged"):
        hstu_attention(*args, impl="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rab_pos must be"):
        hstu_attention(*args[:4], MAX_LEN + 1, batch["rab_pos"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rab_time and timestamps go together"):
        hstu_attention(*args, rab_time=torch.zeros(3))  # type: ignore[arg-type]


@pytest.mark.parametrize("impl", [*JAGGED_IMPLS, "triton"])
def test_query_timestamps_match_padded(impl: str, request) -> None:  # type: ignore[no-untyped-def]
    """Explicit query times (e.g. the held-out event's at evaluation) replace ts[i + 1]."""
    if impl == "triton":
        request.getfixturevalue("triton_interpreter")
    dtype = torch.float32 if impl == "triton" else torch.float64
    g = torch.Generator().manual_seed(4)
    offsets = torch.tensor([0, 5, 5, 6, 26])
    q, k, v = (torch.randn(26, 2, 4, generator=g, dtype=dtype).requires_grad_()
               for _ in range(3))
    ts = torch.cumsum(torch.randint(1, 5000, (26,), generator=g), 0)
    tq = ts + torch.randint(0, 100_000, (26,), generator=g)
    rab_pos = torch.randn(MAX_LEN, generator=g, dtype=dtype)
    rab_time = torch.randn(21, generator=g, dtype=dtype)
    outs = []
    for which in (impl, "pytorch_padded"):
        out = hstu_attention(q, k, v, offsets, MAX_LEN, rab_pos, rab_time, ts, which, tq)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        outs.append([out.detach(), *grads])
    tol = 1e-4 if impl == "triton" else 1e-10
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=tol, atol=tol), float((a - b).abs().max())


def test_compiled_falls_back_with_one_log_line(monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """Where the kernel cannot be built, ``compiled_jagged`` logs why and computes with
    ``pytorch_jagged`` (same values)."""
    import torch.utils.cpp_extension as cpp_extension

    import models.hstu.compiled as compiled

    def no_compiler(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(compiled, "_kernel", None)
    monkeypatch.setattr(compiled, "_tried", False)
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    batch = make_batch([5, 0, 9], heads=2, dim=4, dtype=torch.float64, seed=8, with_time=True)
    with caplog.at_level("WARNING", logger="models.hstu.compiled"):
        got = run(batch, "compiled_jagged")
    assert_all_close(got, run(batch, "pytorch_jagged"), 1e-12)
    lines = [r.getMessage() for r in caplog.records if "compiled_jagged" in r.getMessage()]
    assert len(lines) == 1 and "falling back to pytorch_jagged" in lines[0] \
        and "Ninja is required" in lines[0], lines


def test_auto_picks_compiled_on_cpu_else_falls_back(monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """``impl="auto"`` on CPU tensors runs the compiled kernel where it loads (here it does:
    the kernel's own entry point is called) and ``pytorch_jagged`` where it cannot be built,
    with one log line; CUDA tensors get ``triton`` (where it imports)."""
    import torch.utils.cpp_extension as cpp_extension

    import models.hstu.compiled as compiled
    from models.hstu import attention

    assert attention.auto_impl(torch.device("cpu")) == "compiled_jagged"
    assert attention.auto_impl(torch.device("meta")) == "pytorch_jagged"
    monkeypatch.setattr(attention, "_triton_available", lambda: True)
    assert attention.auto_impl(torch.device("cuda")) == "triton"
    monkeypatch.setattr(attention, "_triton_available", lambda: False)
    assert attention.auto_impl(torch.device("cuda")) == "pytorch_jagged"
    batch = make_batch([5, 0, 9], heads=2, dim=4, dtype=torch.float64, seed=9, with_time=True)
    calls = []
    real = compiled.compiled_jagged_attention
    monkeypatch.setattr(compiled, "compiled_jagged_attention",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    want = run(batch, "pytorch_jagged")
    assert_all_close(run(batch, "auto"), want, 1e-10)
    assert calls == [1]

    def no_compiler(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(compiled, "_kernel", None)
    monkeypatch.setattr(compiled, "_tried", False)
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    with caplog.at_level("WARNING", logger="models.hstu.compiled"):
        assert attention.auto_impl(torch.device("cpu")) == "pytorch_jagged"
        got = run(batch, "auto")
    assert_all_close(got, want, 1e-12)
    assert calls == [1]
    lines = [r.getMessage() for r in caplog.records if "compiled_jagged" in r.getMessage()]
    assert len(lines) == 1 and "falling back to pytorch_jagged" in lines[0], lines
