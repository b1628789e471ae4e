"""InterFormer: jagged sequences of any length (empty, 1, max_len) and no padding leaks."""

from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data.reader import ParquetReader
from data.schema import Schema
from models import get_model_spec
from trainer.tasks.ctr import CTRTrain
from models.interformer import InterFormerArch, InterFormerArgs, rotary


def _model(schema: Schema, flavour: str = "small") -> torch.nn.Module:
    spec = get_model_spec("interformer")
    torch.manual_seed(0)
    return spec.build(schema, spec.make_args(flavour), "cpu").eval()


def _with_lengths(batch, lengths: torch.Tensor, seed: int = 1):  # type: ignore[no-untyped-def]
    """The batch with every sequence feature replaced by random ids of ``lengths``."""
    g = torch.Generator().manual_seed(seed)
    keys = batch.sequence.keys()
    all_lengths = lengths.repeat(len(keys)).to(torch.int32)
    values = torch.randint(0, 8, (int(all_lengths.sum()),), generator=g)
    seq = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=all_lengths)
    return type(batch)(dense=batch.dense, sparse=batch.sparse, labels=batch.labels,
                       sequence=seq, timestamps=None)


def test_empty_single_and_full_sequences(tiny_seq: str) -> None:
    schema = Schema.load(tiny_seq)
    max_len = schema.sequence_features[0].max_len
    model = _model(schema, "default")
    batch = next(iter(ParquetReader(tiny_seq, "train", 6, prefetch=0)))
    for lengths in ([0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [max_len] * 6,
                    [0, 1, max_len, 3, 0, 2]):
        b = _with_lengths(batch, torch.tensor(lengths))
        loss, (_, logits, _) = CTRTrain(model.train())(b)
        loss.backward()
        assert logits.shape == (6,) and torch.isfinite(logits).all(), lengths
    # The sequence matters: a longer history changes the prediction.
    short = model.eval()(_with_lengths(batch, torch.tensor([1] * 6)))
    full = model(_with_lengths(batch, torch.tensor([max_len] * 6)))
    assert (short - full).abs().max() > 1e-4


def test_padding_never_leaks() -> None:
    torch.manual_seed(0)
    B, T, k, D = 5, 9, 2, 16
    arch = InterFormerArch(4, k, D, InterFormerArgs(num_layers=2)).eval()
    x = torch.randn(B, 4, D)
    seqs = torch.randn(B, T, k * D)
    lengths = torch.tensor([0, 1, 4, 9, 2])
    out = arch(x, seqs, lengths)
    garbage = seqs.clone()
    pad = torch.arange(T).unsqueeze(0) >= lengths.unsqueeze(1)
    garbage[pad] = torch.randn(int(pad.sum()), k * D) * 100
    torch.testing.assert_close(arch(x, garbage, lengths), out, rtol=1e-5, atol=1e-5)
    # ... while a change inside the valid part does change the row it belongs to.
    inside = seqs.clone()
    inside[2, 1] += 1.0
    moved = arch(x, inside, lengths)
    assert (moved[2] - out[2]).abs() > 1e-5
    torch.testing.assert_close(moved[[0, 1, 3, 4]], out[[0, 1, 3, 4]])


def test_padded_batch_matches_rows_alone(tiny_seq: str) -> None:
    """A row's logit does not depend on the other rows' lengths (padding of the batch)."""
    schema = Schema.load(tiny_seq)
    model = _model(schema)
    batch = next(iter(ParquetReader(tiny_seq, "train", 8, prefetch=0)))
    lengths = torch.tensor([0, 1, 2, 8, 3, 0, 5, 1])
    together = model(_with_lengths(batch, lengths, seed=3))
    x, seqs, lens = model.tokens(_with_lengths(batch, lengths, seed=3))
    for r in range(8):
        alone = model.arch(x[r:r + 1], seqs[r:r + 1, : max(int(lens[r]), 1)], lens[r:r + 1])
        torch.testing.assert_close(alone, together[r:r + 1], rtol=1e-4, atol=1e-5)


def test_rotary_is_relative() -> None:
    """Rotary scores depend only on the offset between positions."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    T = 6
    qs, ks = rotary(q.expand(1, 1, T, 8), 1e4), rotary(k.expand(1, 1, T, 8), 1e4)
    scores = (qs @ ks.transpose(-1, -2))[0, 0]
    torch.testing.assert_close(scores[0, 2], scores[3, 5])
    assert (scores[0, 2] - scores[0, 3]).abs() > 1e-4


def test_needs_sequence_features(tiny_ctr: str) -> None:
    spec = get_model_spec("interformer")
    with pytest.raises(ValueError, match="data.synth ctr_seq"):
        spec.build(Schema.load(tiny_ctr), spec.make_args("default"), "cpu")


def test_recent_tokens_are_each_rows_last_events() -> None:
    """The arch flips rows to newest first: S_recent of the first Cross Arch holds each row's
    last, then second-to-last event (zero where the row is shorter)."""
    torch.manual_seed(0)
    B, T, k, D = 3, 6, 2, 16
    args = InterFormerArgs(num_layers=1)
    arch = InterFormerArch(4, k, D, args).eval()
    x, seqs = torch.randn(B, 4, D), torch.randn(B, T, k * D)
    lengths = torch.tensor([1, 4, 6])
    seen: list = []  # the first Cross Arch's [S_CLS ‖ S_PMA ‖ S_recent]
    arch.s_gate[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        arch(x, seqs, lengths)
        merged = arch.lce(seqs * arch.mask_mlp(seqs))  # MaskNet is position-wise
    recent = seen[0][:, args.num_cls + args.num_pma:]  # [B, R, D]
    for r, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(recent[r, 0], merged[r, n - 1])
        if n > 1:
            torch.testing.assert_close(recent[r, 1], merged[r, n - 2])
        else:
            assert recent[r, 1].abs().max() == 0
