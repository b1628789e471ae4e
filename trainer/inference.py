"""The exportable forms of a trained model: plain-tensor programs for ``torch.export``.

A model trained here maps a ``Batch`` (KeyedJaggedTensors, torchrec embedding collections) to
logits. ``torch.export`` accepts neither, and torchrec's modules would pull fbgemm ops into the
graph, so :func:`scoring_program` / :func:`user_program` wrap a model as an ``nn.Module`` with
a plain-tensor signature and swap its embedding collections for pure-torch lookups over the
same weights (optionally row-wise int8/int4 quantised). The exported program then needs
``torch`` alone.

The signature (defined here, once; ``package.json["inputs"]`` lists the feature order)::

    program(dense, values, lengths[, timestamps]) -> out

* ``dense``: float32 ``[B, Dd]`` (``Dd`` = the schema's dense features, may be 0);
* ``values``: list of int64 ``[n_f]``, one per input feature: the schema's sparse features,
  then its sequence features, in schema order (the ids of all rows, concatenated);
* ``lengths``: list of int64 ``[B]``, one per input feature: ids per row;
* ``timestamps`` (sequential models whose item feature has timestamps): list of two int64
  tensors: the item feature's event times ``[n_item]`` (aligned with its values) and the
  query time per row ``[B]`` (the time the prediction is for; the training data's held-out
  event time);
* ``out``: CTR / multi-task programs: float32 ``[B, P]`` scores, one column per prediction
  (sigmoid of the logit for binary predictions, the value for regression; P = 1 for CTR);
  sequential user programs: float32 ``[B, D]`` L2-normalised user vectors (the last
  position's output), scored against the package's item matrix by inner product.

Example::

    prog = scoring_program(ctr_task.model, schema)          # a CTRTrain's model
    prog(dense, [ids_f0, ids_f1], [len_f0, len_f1]).shape   # [B, 1]
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from data.batch import Batch
from data.schema import Schema
from models.dien import DIENArch
from models.din import jagged_softmax

QUANTISATIONS = ("fp32", "int8", "int4")


# -- row-wise quantised tables --------------------------------------------------------------

def quantise_rows(weight: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor,
                                                            torch.Tensor]:
    """Row-wise asymmetric quantisation of ``weight [R, D]``: (codes uint8 ``[R, D]`` for
    8 bits or ``[R, ceil(D/2)]`` with two 4-bit codes per byte, scale ``[R]``, offset ``[R]``)
    with ``w ≈ code · scale + offset`` (fbgemm's row-wise scheme: one fp32 scale and bias per
    row, so one outlier row costs no precision in the others)."""
    levels = (1 << bits) - 1
    lo = weight.min(dim=1).values
    hi = weight.max(dim=1).values
    scale = ((hi - lo) / levels).clamp_min(1e-12)
    codes = torch.round((weight - lo[:, None]) / scale[:, None]).clamp(0, levels).to(torch.uint8)
    if bits == 4:
        if codes.shape[1] % 2:
            codes = F.pad(codes, (0, 1))
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return codes.contiguous(), scale.float(), lo.float()


class TableRows(nn.Module):
    """Rows of one embedding table by id: fp32 weights, or row-wise int8/int4 codes
    dequantised on lookup. ``forward(ids [N]) → [N, D]``."""

    def __init__(self, weight: torch.Tensor, quant: str = "fp32") -> None:
        super().__init__()
        if quant not in QUANTISATIONS:
            raise ValueError(f"quantisation {quant!r} is not one of {list(QUANTISATIONS)}")
        self.quant, self.dim = quant, int(weight.shape[1])
        w = weight.detach().float()
        if quant == "fp32":
            self.register_buffer("weight", w.clone())
        else:
            codes, scale, offset = quantise_rows(w, 8 if quant == "int8" else 4)
            self.register_buffer("codes", codes)
            self.register_buffer("scale", scale)
            self.register_buffer("offset", offset)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.quant == "fp32":
            return F.embedding(ids, self.weight)
        codes = F.embedding(ids, self.codes)
        if self.quant == "int4":
            codes = torch.stack([codes & 15, codes >> 4], dim=2).flatten(1)[:, : self.dim]
        return codes.float() * self.scale[ids, None] + self.offset[ids, None]

    def dequantised(self) -> torch.Tensor:
        """The whole table as fp32 ``[R, D]`` (what lookups return)."""
        n = self.weight.shape[0] if self.quant == "fp32" else self.codes.shape[0]
        return self.forward(torch.arange(n))


# -- duck-typed stand-ins for KeyedJaggedTensor / JaggedTensor / KeyedTensor ------------------

class PlainJagged:
    """A jagged feature (``values [N, ...]``, ``lengths [B]``) with the ``JaggedTensor``
    methods the models call, in pure torch (torchrec's own call fbgemm ops)."""

    def __init__(self, values: torch.Tensor, lengths: torch.Tensor) -> None:
        self._values, self._lengths = values, lengths

    def values(self) -> torch.Tensor:
        return self._values

    def lengths(self) -> torch.Tensor:
        return self._lengths

    def offsets(self) -> torch.Tensor:
        return F.pad(torch.cumsum(self._lengths, 0), (1, 0))

    def to_padded_dense(self, desired_length: int, padding_value: float = 0.0) -> torch.Tensor:
        """``[B, desired_length, ...]``, each row's first ``desired_length`` values."""
        b, n = self._lengths.shape[0], self._values.shape[0]
        offsets = self.offsets()
        row = torch.repeat_interleave(torch.arange(b), self._lengths, output_size=n)
        pos = torch.arange(n) - offsets[:-1][row]
        keep = pos < desired_length
        out = self._values.new_full((b * desired_length, *self._values.shape[1:]),
                                    padding_value)
        flat = torch.where(keep, row * desired_length + pos, b * desired_length)
        out = torch.cat([out, out[:1]]).index_copy(0, flat, self._values)[:-1]
        return out.view(b, desired_length, *self._values.shape[1:])


class PlainFeatures:
    """``KeyedJaggedTensor`` stand-in: ``keys()``, ``[key]`` → :class:`PlainJagged`. A key the
    model asks for but the program has no input for (the training-only negatives feature) is
    empty."""

    def __init__(self, features: Dict[str, PlainJagged], batch_size: torch.Tensor) -> None:
        self._features, self._b = features, batch_size

    def keys(self) -> List[str]:
        return list(self._features)

    def __getitem__(self, key: str) -> PlainJagged:
        if key in self._features:
            return self._features[key]
        return PlainJagged(torch.zeros(0, dtype=torch.int64),
                           torch.zeros_like(self._b, dtype=torch.int64))


class PlainPooled:
    """``KeyedTensor`` stand-in: ``to_dict()`` → ``{feature: [B, D]}``."""

    def __init__(self, pooled: Dict[str, torch.Tensor]) -> None:
        self._pooled = pooled

    def to_dict(self) -> Dict[str, torch.Tensor]:
        return self._pooled


class PlainEmbeddingBags(nn.Module):
    """Pure-torch ``EmbeddingBagCollection`` over the same tables (sum / mean pooling), with
    all pooled features of one (width, pooling) group looked up by ONE ``F.embedding_bag``.

    At construction the group's tables are stacked into one ``[Σ rows, D]`` buffer (each
    table once, however many features read it; row-wise int8/int4 quantisation of the stack
    is the per-table quantisation, since every row has its own scale and offset) and each
    feature remembers its table's first row. ``forward`` shifts every feature's ids by that
    row, concatenates them feature-major (all of feature 0's rows, then feature 1's, ...),
    and pools the ``F·B`` bags in one call: ``[F·B, D]`` viewed as ``[F, B, D]``, so a
    feature's pooled ``[B, D]`` is a contiguous slice. One ATen call instead of one per
    feature (26 for the Criteo layout) is the point: each call pays dispatch and an offsets
    pass, and the compiled program fuses the id shifts and the concatenation into one loop.
    """

    def __init__(self, ebc: EmbeddingBagCollection, quant: str = "fp32") -> None:
        super().__init__()
        weights = {name: m.weight for name, m in ebc.embedding_bags.items()}
        groups: Dict[Tuple[int, str], List[Tuple[str, str]]] = {}  # (D, mode) → [(f, table)]
        for cfg in ebc.embedding_bag_configs():
            mode = "mean" if cfg.pooling.name == "MEAN" else "sum"
            groups.setdefault((cfg.embedding_dim, mode), []).extend(
                (f, cfg.name) for f in cfg.feature_names)
        self.tables = nn.ModuleList()
        #: per group: (mode, [(feature, first row of its table in the stack)]).
        self.groups: List[Tuple[str, List[Tuple[str, int]]]] = []
        for (_, mode), feats in groups.items():
            first: Dict[str, int] = {}
            stack: List[torch.Tensor] = []
            rows = 0
            for _, table in feats:
                if table not in first:
                    first[table] = rows
                    stack.append(weights[table].detach())
                    rows += int(weights[table].shape[0])
            self.tables.append(TableRows(torch.cat(stack), quant))
            self.groups.append((mode, [(f, first[t]) for f, t in feats]))

    def forward(self, features: PlainFeatures) -> PlainPooled:
        out: Dict[str, torch.Tensor] = {}
        for rows_of, (mode, feats) in zip(self.tables, self.groups):
            jts = [features[f] for f, _ in feats]
            ids = torch.cat([jt.values() + first if first else jt.values()
                             for jt, (_, first) in zip(jts, feats)])
            # stack, not cat: the [F, B] lengths tie every feature's row count to one B, so
            # the pooled [F·B, D] views as [F, B, D] without a guard on the sizes' sum.
            lengths = torch.stack([jt.lengths() for jt in jts])
            offsets = F.pad(torch.cumsum(lengths.flatten(), 0), (1, 0))
            if rows_of.quant == "fp32":
                # One fused gather + pool over the stack (no [N, D] intermediate).
                pooled = F.embedding_bag(ids, rows_of.weight, offsets, mode=mode,
                                         include_last_offset=True)
            else:
                rows = rows_of(ids)  # [N, D], dequantised
                # embedding_bag over the looked-up rows: ids 0..N-1, bags from offsets.
                pooled = F.embedding_bag(torch.arange(rows.shape[0]), rows, offsets,
                                         mode=mode, include_last_offset=True)
            pooled = pooled.view(lengths.shape[0], lengths.shape[1], pooled.shape[1])
            for k, (name, _) in enumerate(feats):
                out[name] = pooled[k]
        return PlainPooled(out)


class PlainEmbeddings(nn.Module):
    """Pure-torch ``EmbeddingCollection`` (unpooled) over the same tables."""

    def __init__(self, ec: EmbeddingCollection, quant: str = "fp32") -> None:
        super().__init__()
        self.tables = nn.ModuleDict()
        self.features: List[Tuple[str, str]] = []
        weights = {name: m.weight for name, m in ec.embeddings.items()}
        for cfg in ec.embedding_configs():
            self.tables[cfg.name] = TableRows(weights[cfg.name], quant)
            self.features.extend((f, cfg.name) for f in cfg.feature_names)

    def forward(self, features: PlainFeatures) -> Dict[str, PlainJagged]:
        out: Dict[str, PlainJagged] = {}
        for name, table in self.features:
            jt = features[name]
            out[name] = PlainJagged(self.tables[table](jt.values()), jt.lengths())
        return out


class PaddedDIENArch(DIENArch):
    """DIEN's recurrences over histories padded to the schema's ``max_len`` (set on the
    instance): the packed form loops over a data-dependent number of steps, which
    ``torch.export`` cannot trace. The extractor GRU runs on ``[T, B, E]`` (a forward GRU's
    outputs at a row's real positions do not depend on the padding after them) and the AUGRU
    steps all T positions, a row keeping its state once its history ends, as the packed
    loop does. Inference only: the auxiliary loss is returned as 0."""

    max_len: int

    def interest(self, target: torch.Tensor, events: torch.Tensor, lengths: torch.Tensor
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        b, t, n = target.shape[0], self.max_len, events.shape[0]
        lengths = lengths.to(torch.long)
        rows = torch.repeat_interleave(torch.arange(b), lengths, output_size=n)
        pos = torch.arange(n) - (torch.cumsum(lengths, 0) - lengths)[rows]
        slot = rows * t + pos  # histories are at most max_len long (the reader truncates)
        padded = events.new_zeros(b * t, events.shape[1]).index_copy(0, slot, events)
        out, _ = self.extractor(padded.view(b, t, -1).transpose(0, 1))  # [T, B, E]
        states = out.transpose(0, 1).reshape(b * t, -1)[slot]  # [N, E], jagged order
        scores = (states * self.bilinear(target)[rows]).sum(1)
        att = jagged_softmax(scores, rows, b) if self.softmax else torch.sigmoid(scores)
        att_p = att.new_zeros(b * t).index_copy(0, slot, att).view(b, t)
        if getattr(self, "evolution_kind", "augru") == "aigru":
            # AIGRU: a plain GRU over the attention-scaled states; a row's final state is
            # its output at its last real position (zero for an empty history).
            seq, _ = self.evolution(out * att_p.T.unsqueeze(2))  # [T, B, E]
            last = seq[(lengths - 1).clamp_min(0), torch.arange(b)]
            return torch.where((lengths > 0)[:, None], last, torch.zeros_like(last)), states
        h = target.new_zeros(b, self.dim)
        for step in range(t):
            nxt = self.evolution(out[step], h, att_p[:, step])
            h = torch.where((lengths > step)[:, None], nxt, h)
        return h, states

    def forward(self, pooled: torch.Tensor, target: torch.Tensor, values: List[torch.Tensor],
                lengths: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        logits = self.head(self.representation(pooled, target, values, lengths)).squeeze(1)
        return logits, logits.new_zeros(())


def plain_copy(model: nn.Module, quant: str = "fp32", max_len: int = 0) -> nn.Module:
    """``model`` with every torchrec embedding collection replaced by its pure-torch
    counterpart (weights copied, optionally quantised) and DIEN's recurrences padded to
    ``max_len`` (the schema's longest sequence); the original is left untouched."""
    import copy

    model = copy.deepcopy(model)

    def swap(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            if isinstance(child, EmbeddingBagCollection):
                setattr(parent, name, PlainEmbeddingBags(child, quant))
            elif isinstance(child, EmbeddingCollection):
                setattr(parent, name, PlainEmbeddings(child, quant))
            else:
                if type(child) is DIENArch:
                    child.__class__ = PaddedDIENArch  # same parameters, exportable loops
                    child.max_len = max(1, max_len)
                swap(child)

    swap(model)
    return model


# -- the programs ---------------------------------------------------------------------------

def input_features(schema: Schema, sequential_item: Optional[str] = None,
                   action: str = "") -> List[str]:
    """The feature order of ``values`` / ``lengths``: sparse then sequence features in schema
    order (CTR); the item (and action) feature (sequential)."""
    if sequential_item is not None:
        return [sequential_item] + ([action] if action else [])
    return [f.name for f in schema.sparse_features] + [f.name for f in schema.sequence_features]


class ScoringProgram(nn.Module):
    """CTR / multi-task model → ``(dense, values, lengths) → scores [B, P]`` (see the module
    docstring). ``binary``: per output column, whether to apply the sigmoid."""

    def __init__(self, model: nn.Module, schema: Schema, binary: Sequence[bool],
                 quant: str = "fp32") -> None:
        super().__init__()
        max_len = max([f.max_len or 0 for f in schema.sequence_features], default=0)
        self.model = plain_copy(model, quant, max_len).eval()
        self.sparse = [f.name for f in schema.sparse_features]
        self.sequence = [f.name for f in schema.sequence_features]
        self.register_buffer("binary", torch.tensor(list(binary), dtype=torch.bool))

    def forward(self, dense: torch.Tensor, values: List[torch.Tensor],
                lengths: List[torch.Tensor]) -> torch.Tensor:
        b = dense.shape[0]
        rows = torch.zeros(b, dtype=torch.int64)
        feats = {n: PlainJagged(v, ln) for n, v, ln in zip(self.sparse + self.sequence,
                                                            values, lengths)}
        batch = Batch(
            dense=dense,
            sparse=PlainFeatures({n: feats[n] for n in self.sparse}, rows),  # type: ignore[arg-type]
            labels=dense.new_zeros(b),
            sequence=PlainFeatures({n: feats[n] for n in self.sequence}, rows)  # type: ignore[arg-type]
            if self.sequence else None)
        logits = self.model(batch).reshape(b, -1)
        return torch.where(self.binary, torch.sigmoid(logits), logits)


class UserProgram(nn.Module):
    """Sequential model → ``(dense, values, lengths[, timestamps]) → user [B, D]``: the
    L2-normalised output at each history's last position (see the module docstring).
    Histories must be at most ``max_len`` long (:func:`trainer.package` callers truncate to
    the most recent ``max_len`` ids); an empty history gives a zero vector."""

    def __init__(self, model: nn.Module, quant: str = "fp32") -> None:
        super().__init__()
        self.model = plain_copy(model, quant).eval()
        enc = self.model.encoder
        self.item, self.action = enc.item_feature, enc.action_feature
        self.max_len, self.dim = enc.max_len, enc.dim
        # The padded attention reference pads to the configured max_len under export (its
        # width must not depend on data); same numbers as the jagged kernels.
        for m in self.model.modules():
            if hasattr(m, "impl") and isinstance(getattr(m, "impl"), str):
                m.impl = "pytorch_padded"

    def forward(self, dense: torch.Tensor, values: List[torch.Tensor],
                lengths: List[torch.Tensor],
                timestamps: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        names = [self.item] + ([self.action] if self.action else [])
        seq = PlainFeatures({n: PlainJagged(v, ln) for n, v, ln in zip(names, values, lengths)},
                            lengths[0])
        ts = None
        if timestamps is not None:
            from models.sequential import query_time_key
            ts = PlainFeatures({
                self.item: PlainJagged(timestamps[0], lengths[0]),
                query_time_key(self.item): PlainJagged(timestamps[1],
                                                       torch.ones_like(lengths[0]))},
                lengths[0])
        b = lengths[0].shape[0]
        enc = self.model(Batch(dense=dense, sparse=None, labels=dense.new_zeros(b),  # type: ignore[arg-type]
                               sequence=seq, timestamps=ts))  # type: ignore[arg-type]
        last = enc.offsets[1:] - 1
        has = lengths[0] > 0
        user = enc.user[last.clamp_min(0)]
        return torch.where(has[:, None], user, torch.zeros_like(user))
