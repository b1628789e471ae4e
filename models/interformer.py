"""InterFormer (Zeng et al. 2024, arXiv 2411.09852): interleaved learning of non-sequence
interactions and behaviour sequences, over a sharded ``EmbeddingBagCollection`` (pooled
features) and a sharded ``EmbeddingCollection`` (jagged sequences) in one model.

Tokens (all of width D, the common table width):

* non-sequence ``X [B, n_x, D]``: one pooled embedding per sparse feature plus one token
  projected from the dense features;
* sequence ``S [B, T, D]``: the k behaviour sequences (aligned by position, padded to
  ``T = max_len``) merged by MaskNet, ``S = MLP_lce(S_cat ⊙ MLP_mask(S_cat))`` with
  ``S_cat = [S_1 ‖ … ‖ S_k]`` of width k·D. A row's length is the longest of its sequences;
  empty sequences are allowed. The data is oldest first; the arch flips every row to newest
  first, so that position t (and its rotary offset from the CLS tokens) means "t events
  ago" in every row, whatever its length.

Before the first layer the Cross Arch summarises ``X`` into ``X_sum = Gating(MLP(X))``
(``n_cls`` tokens) and prepends ``X_sum`` to ``S`` as CLS tokens. Each of L layers then runs,
from the previous layer's ``X``, ``S`` and summaries:

* Interaction Arch: ``X ← MLP(DHEN([X ‖ S_sum]))``, DHEN = LayerNorm(DOT + DCN + shortcut)
  where DOT is a linear map of the pairwise token inner products, DCN a low-rank cross layer
  (torchrec ``LowRankCrossNet``) on the flattened tokens, and shortcut a linear projection;
* Sequence Arch: ``S ← MHA(PFFN(X_sum, S))``: a personalised FFN whose D×D weight is
  computed per sample from ``X_sum``, then multi-head self-attention with rotary position
  embeddings; padded positions are masked out as keys (each row keeps its CLS tokens, so no
  query ever sees an empty key set);
* Cross Arch: ``X_sum = Gating(MLP(X))`` and ``S_sum = Gating([S_CLS ‖ S_PMA ‖ S_recent])``
  with the self-gating ``Gating(x) = x ⊙ σ(MLP(x))``; ``S_PMA`` are ``n_pma`` learned seeds
  attending over the valid tokens and ``S_recent`` the ``n_recent`` most recent valid tokens
  (the first ones after the CLS tokens; zero when a row has fewer). Our design notes give
  the paper's form as ``Gating(x) = σ(x ⊙ MLP(x))`` (``gating = "paper"``); that form
  squashes every summary coordinate into (0, 1), so the head and the next layer's DHEN
  and PFFN see gate values instead of the tokens, and it lost 0.038 AUC (0.703 vs 0.741
  after one epoch, 2 ranks, embedding lr 0.5) on the sequence-signal synthetic set; the
  gate-times-input form (``gating = "self"``, the default) keeps the token's sign and
  scale.

Head: ``logit = MLP([X_sum ‖ S_sum])``.

Shapes: ``Batch.dense [B, Dd]``, ``Batch.sparse`` KJT (F keys), ``Batch.sequence`` KJT (k keys,
jagged) → logits ``[B]``.

Example::

    spec = get_model_spec("interformer")
    model = spec.build(schema, spec.make_args("default"), "cpu")
    logits = model(batch)      # [B]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.modules.mlp import MLP

from data.batch import Batch
from data.schema import Schema
from models.blocks import (build_ebc, build_sequence_collection, kept_head, place,
                           stack_fields, uniform_width)
from models.spec import ModelSpec


@dataclass
class InterFormerArgs:
    """Arguments of :class:`InterFormer`."""

    #: width D of every pooled and sequence table (a multiple of 4); ``None`` uses the
    #: schema's (then all tables must agree).
    embedding_dim: Optional[int] = None
    #: number of interleaved layers L.
    num_layers: int = 2
    #: attention heads of the Sequence Arch (D must be divisible by it, head dim even).
    num_heads: int = 2
    #: CLS tokens (= X_sum tokens), PMA seeds and recent tokens of the summaries.
    num_cls: int = 4
    num_pma: int = 2
    num_recent: int = 2
    #: rank of the DCN (LowRankCrossNet) member of the DHEN ensemble.
    dcn_rank: int = 16
    #: hidden sizes of the MaskNet mask MLP (its last layer maps back to k·D).
    mask_dims: List[int] = field(default_factory=lambda: [64])
    #: hidden sizes of the head MLP (a final linear maps to one logit).
    head_dims: List[int] = field(default_factory=lambda: [128, 64])
    #: rotary base frequency.
    rope_base: float = 10_000.0
    #: summary gating: ``"self"`` = ``x ⊙ σ(MLP(x))``, ``"paper"`` = ``σ(x ⊙ MLP(x))``.
    gating: str = "self"


def _mlp(in_dim: int, hidden: List[int], out_dim: int) -> nn.Module:
    """torchrec ``MLP`` hidden layers then a plain linear output (no final activation)."""
    if not hidden:
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(MLP(in_dim, hidden), nn.Linear(hidden[-1], out_dim))


GATINGS = ("self", "paper")


class Gating(nn.Module):
    """Gating over the flattened tokens: ``[B, n, D]`` → ``[B, n, D]``.

    ``mode="self"``: ``x ⊙ σ(MLP(x))`` (the gate scales the token and keeps its sign and
    size); ``mode="paper"``: ``σ(x ⊙ MLP(x))``, the paper's form as DESIGN.md gives it, which
    replaces every summary coordinate by a value in (0, 1).

    Example::

        Gating(4 * 16)(torch.randn(8, 4, 16)).shape   # torch.Size([8, 4, 16])
    """

    def __init__(self, width: int, mode: str = "self") -> None:
        super().__init__()
        if mode not in GATINGS:
            raise ValueError(f"InterFormer: gating {mode!r} is not one of {list(GATINGS)}")
        self.mode = mode
        self.mlp = _mlp(width, [width], width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.flatten(1)
        if self.mode == "paper":
            return torch.sigmoid(flat * self.mlp(flat)).reshape(tokens.shape)
        return (flat * torch.sigmoid(self.mlp(flat))).reshape(tokens.shape)


class DHEN(nn.Module):
    """One DHEN layer: ``LayerNorm(DOT(Z) + DCN(Z) + shortcut(Z))`` with ``n_out`` tokens out.

    Shapes: ``[B, N, D]`` → ``[B, n_out, D]``.

    Args:
        num_tokens: input tokens N.
        dim: token width D.
        num_out: output tokens.
        dcn_rank: rank of the low-rank cross layer.

    Example::

        DHEN(6, 16, 2, 8)(torch.randn(4, 6, 16)).shape   # torch.Size([4, 2, 16])
    """

    def __init__(self, num_tokens: int, dim: int, num_out: int, dcn_rank: int) -> None:
        super().__init__()
        self.num_out, self.dim = num_out, dim
        rows, cols = torch.triu_indices(num_tokens, num_tokens, offset=1)
        self.register_buffer("pair_rows", rows, persistent=False)
        self.register_buffer("pair_cols", cols, persistent=False)
        flat = num_tokens * dim
        self.dot = nn.Linear(rows.numel(), num_out * dim)
        self.cross = LowRankCrossNet(flat, 1, low_rank=dcn_rank)
        self.cross_out = nn.Linear(flat, num_out * dim)
        self.shortcut = nn.Linear(flat, num_out * dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.flatten(1)
        gram = tokens @ tokens.transpose(1, 2)  # [B, N, N] pairwise inner products
        dot = self.dot(gram[:, self.pair_rows, self.pair_cols])
        cross = self.cross_out(self.cross(flat))
        out = (dot + cross + self.shortcut(flat)).reshape(-1, self.num_out, self.dim)
        return self.norm(out)


def rotary(x: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary position embedding over the token axis: ``[B, H, T, d]`` (d even) → same."""
    T, d = x.shape[-2], x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d, 2, dtype=x.dtype, device=x.device) / d)
    angles = torch.arange(T, dtype=x.dtype, device=x.device).unsqueeze(1) * inv_freq
    cos, sin = angles.cos(), angles.sin()  # [T, d/2]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class SequenceLayer(nn.Module):
    """Sequence Arch: ``S ← MHA(PFFN(X_sum, S))`` (pre-norm residual blocks).

    Shapes: ``S [B, T', D]``, ``X_sum [B, n_cls, D]``, ``valid [B, T']`` bool → ``[B, T', D]``.
    """

    def __init__(self, dim: int, num_cls: int, num_heads: int, rope_base: float) -> None:
        super().__init__()
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"InterFormer: embedding_dim {dim} must split into num_heads="
                             f"{num_heads} heads of even width (rotary); change num_heads")
        self.dim, self.num_heads, self.rope_base = dim, num_heads, rope_base
        # Personalised FFN: the per-sample D×D weight is a function of X_sum.
        self.pffn_weight = nn.Linear(num_cls * dim, dim * dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, seq: torch.Tensor, x_sum: torch.Tensor, valid: torch.Tensor
                ) -> torch.Tensor:
        weight = self.pffn_weight(x_sum.flatten(1)).reshape(-1, self.dim, self.dim)
        seq = seq + torch.bmm(self.norm1(seq), weight) / self.dim ** 0.5
        q, k, v = self.qkv(self.norm2(seq)).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, k, v))
        q, k = rotary(q, self.rope_base), rotary(k, self.rope_base)
        # Padded positions are never keys; they still produce (unused) query rows.
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
        return seq + self.proj(attn.transpose(1, 2).flatten(2))


class PMA(nn.Module):
    """Pooling by multi-head attention: ``n`` learned seeds attend over the valid tokens.

    Shapes: ``[B, T', D]``, ``valid [B, T']`` → ``[B, n, D]``.
    """

    def __init__(self, dim: int, num_seeds: int, num_heads: int) -> None:
        super().__init__()
        self.seeds = nn.Parameter(torch.randn(num_seeds, dim) / dim ** 0.5)
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)

    def forward(self, seq: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        q = self.q(self.seeds).unflatten(-1, (self.num_heads, -1)).transpose(0, 1)  # [H, n, d]
        k, v = self.kv(seq).chunk(2, dim=-1)
        k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (k, v))
        out = F.scaled_dot_product_attention(q.unsqueeze(0).expand(k.shape[0], -1, -1, -1),
                                             k, v, attn_mask=valid[:, None, None, :])
        return out.transpose(1, 2).flatten(2)


class InterFormerArch(nn.Module):
    """The over-arch on padded tokens; see the module docstring.

    Args:
        num_x: non-sequence tokens n_x.
        num_seqs: behaviour sequences k merged by MaskNet.
        dim: token width D.
        args: :class:`InterFormerArgs`.
        with_head: False builds a backbone for multi-task heads: no ``head`` (the MLP from
            the summaries to the logit); only :meth:`representation` is used.

    Shapes: ``x [B, n_x, D]``, ``seqs [B, T, k·D]`` (zero or anything beyond each length),
    ``lengths [B]`` → logits ``[B]``.

    Example::

        arch = InterFormerArch(4, 2, 16, InterFormerArgs())
        arch(torch.randn(8, 4, 16), torch.randn(8, 10, 32), torch.randint(0, 11, (8,)))
    """

    def __init__(self, num_x: int, num_seqs: int, dim: int, args: InterFormerArgs,
                 with_head: bool = True) -> None:
        super().__init__()
        self.dim, self.args = dim, args
        n_cls, n_sum = args.num_cls, args.num_cls + args.num_pma + args.num_recent
        self.mask_mlp = _mlp(num_seqs * dim, args.mask_dims, num_seqs * dim)
        self.lce = nn.Linear(num_seqs * dim, dim)
        self.x_summary = nn.ModuleList()
        self.x_gate = nn.ModuleList()
        self.pma = nn.ModuleList()
        self.s_gate = nn.ModuleList()
        # Summaries exist before layer 1 and after every layer: L + 1 cross arches.
        for _ in range(args.num_layers + 1):
            self.x_summary.append(_mlp(num_x * dim, [num_x * dim], n_cls * dim))
            self.x_gate.append(Gating(n_cls * dim, args.gating))
            self.pma.append(PMA(dim, args.num_pma, args.num_heads))
            self.s_gate.append(Gating(n_sum * dim, args.gating))
        self.interaction = nn.ModuleList(
            nn.ModuleDict({"dhen": DHEN(num_x + n_sum, dim, num_x, args.dcn_rank),
                           "mlp": _mlp(dim, [dim], dim)})
            for _ in range(args.num_layers))
        self.sequence = nn.ModuleList(SequenceLayer(dim, n_cls, args.num_heads, args.rope_base)
                                      for _ in range(args.num_layers))
        self.head = kept_head(_mlp((n_cls + n_sum) * dim, args.head_dims, 1), with_head)

    def cross(self, i: int, x: torch.Tensor, seq: torch.Tensor, valid: torch.Tensor,
              lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Cross Arch ``i``: ``(X_sum [B, n_cls, D], S_sum [B, n_sum, D])``."""
        n_cls = self.args.num_cls
        x_sum = self.x_gate[i](self.x_summary[i](x.flatten(1)).reshape(-1, n_cls, self.dim))
        s_cls = seq[:, :n_cls]
        s_pma = self.pma[i](seq, valid)
        # The most recent tokens (sequence is newest first): positions n_cls + r, zeroed
        # when r >= len (clamped so that a batch padded to fewer than R steps still works).
        back = torch.arange(self.args.num_recent, device=seq.device)
        pos = (n_cls + back).clamp(max=seq.shape[1] - 1).unsqueeze(0).expand(
            lengths.shape[0], -1)  # [B, R]
        recent = seq.gather(1, pos.unsqueeze(2).expand(-1, -1, self.dim))
        recent = recent * (back < lengths.unsqueeze(1)).unsqueeze(2).to(seq.dtype)
        s_sum = self.s_gate[i](torch.cat([s_cls, s_pma, recent], dim=1))
        return x_sum, s_sum

    @property
    def representation_dim(self) -> int:
        """Width H of :meth:`representation`: ``(2·n_cls + n_pma + n_recent) · D``."""
        a = self.args
        return (2 * a.num_cls + a.num_pma + a.num_recent) * self.dim

    def representation(self, x: torch.Tensor, seqs: torch.Tensor, lengths: torch.Tensor
                       ) -> torch.Tensor:
        """``[B, H]``: the last summaries ``[X_sum ‖ S_sum]`` flattened — what the head maps
        to the logit (multi-task heads start from it)."""
        T = seqs.shape[1]
        lengths = lengths.to(torch.long)
        steps = torch.arange(T, device=seqs.device)
        in_seq = steps.unsqueeze(0) < lengths.unsqueeze(1)  # [B, T]
        # Most recent first: row r's position t holds its event len_r - 1 - t (padding stays
        # at the end, zeroed, so whatever the caller put there never reaches a token). The
        # data is oldest first and rows have different lengths, so without this flip the
        # rotary offset of an event from the CLS tokens would be its age from the *start*
        # of the history, and "the last k events" would sit at a different offset in every
        # row; recency is what the click depends on.
        newest_first = (lengths.unsqueeze(1) - 1 - steps).clamp(min=0)  # [B, T]
        seqs = seqs.gather(1, newest_first.unsqueeze(2).expand(-1, -1, seqs.shape[2]))
        seqs = seqs * in_seq.unsqueeze(2).to(seqs.dtype)
        seq = self.lce(seqs * self.mask_mlp(seqs))  # MaskNet merge → [B, T, D]
        cls_valid = torch.ones_like(lengths, dtype=torch.bool).unsqueeze(1).expand(
            -1, self.args.num_cls)
        valid = torch.cat([cls_valid, in_seq], dim=1)
        n_cls = self.args.num_cls
        x_sum = self.x_gate[0](self.x_summary[0](x.flatten(1)).reshape(-1, n_cls, self.dim))
        seq = torch.cat([x_sum, seq], dim=1)  # CLS tokens first
        x_sum, s_sum = self.cross(0, x, seq, valid, lengths)
        for i in range(self.args.num_layers):
            inter = self.interaction[i]
            x_next = inter["mlp"](inter["dhen"](torch.cat([x, s_sum], dim=1)))
            seq = self.sequence[i](seq, x_sum, valid)
            x = x_next
            x_sum, s_sum = self.cross(i + 1, x, seq, valid, lengths)
        return torch.cat([x_sum, s_sum], dim=1).flatten(1)

    def forward(self, x: torch.Tensor, seqs: torch.Tensor, lengths: torch.Tensor
                ) -> torch.Tensor:
        return self.head(self.representation(x, seqs, lengths)).squeeze(1)


class InterFormer(nn.Module):
    """Embeddings → tokens → :class:`InterFormerArch`; see the module docstring.

    Args:
        ebc: unsharded EBC over the pooled tables (width D).
        ec: unsharded EC over the sequence tables (width D).
        feature_names: pooled features, in token order.
        sequence_names: sequence features merged by MaskNet, in this order.
        max_len: padded sequence length T (the schema's largest ``max_len``).
        dense_in: number of dense features.
        args: :class:`InterFormerArgs`.
        with_head: False builds a backbone for multi-task heads (no ``arch.head``).
    """

    def __init__(self, ebc: EmbeddingBagCollection, ec: EmbeddingCollection,
                 feature_names: List[str], sequence_names: List[str], max_len: int,
                 dense_in: int, args: InterFormerArgs, with_head: bool = True) -> None:
        super().__init__()
        dims = {c.embedding_dim for c in ebc.embedding_bag_configs()}
        dims |= {c.embedding_dim for c in ec.embedding_configs()}
        if len(dims) != 1:
            raise ValueError(f"InterFormer tables must share one width, got {sorted(dims)}; "
                             f"set model.args.embedding_dim")
        self.dim = dims.pop()
        self.ebc, self.ec = ebc, ec
        self.feature_names, self.sequence_names = list(feature_names), list(sequence_names)
        self.max_len, self.dense_in = max_len, dense_in
        if dense_in:
            self.dense_proj = _mlp(dense_in, [4 * self.dim], self.dim)
        num_x = len(self.feature_names) + (1 if dense_in else 0)
        self.arch = InterFormerArch(num_x, len(self.sequence_names), self.dim, args,
                                    with_head)

    def tokens(self, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x [B, n_x, D], seqs [B, T, k·D] zero-padded, lengths [B])``."""
        x = stack_fields(self.ebc(batch.sparse), self.feature_names, self.dim)
        if self.dense_in:
            x = torch.cat([self.dense_proj(batch.dense).unsqueeze(1), x], dim=1)
        jagged = self.ec(batch.sequence)
        padded = [jagged[n].to_padded_dense(desired_length=self.max_len)
                  for n in self.sequence_names]
        lengths = torch.stack([jagged[n].lengths() for n in self.sequence_names]).amax(0)
        return x, torch.cat(padded, dim=2), lengths

    @property
    def representation_dim(self) -> int:
        """Width H of :meth:`representation`."""
        return self.arch.representation_dim

    def representation(self, batch: Batch) -> torch.Tensor:
        """``[B, H]``: the summaries the head maps to the logit (for multi-task heads)."""
        x, seqs, lengths = self.tokens(batch)
        return self.arch.representation(x, seqs, lengths)

    def forward(self, batch: Batch) -> torch.Tensor:
        x, seqs, lengths = self.tokens(batch)
        return self.arch(x, seqs, lengths)


def build_interformer(schema: Schema, args: InterFormerArgs, device: str = "meta",
                      with_head: bool = True) -> InterFormer:
    if not schema.sequence_features:
        raise ValueError("InterFormer needs sequence features; the schema has none (make "
                         "sequence data with `python -m data.synth ctr_seq`)")
    width = uniform_width(schema, args.embedding_dim, "InterFormer")
    ec = build_sequence_collection(schema, width, device)
    names = [f for t in schema.tables("sparse").values() for f in t.features]
    seq_names = [f.name for f in schema.sequence_features]
    max_len = max(f.max_len for f in schema.sequence_features)
    model = InterFormer(build_ebc(schema, device, embedding_dim=width), ec, names, seq_names,
                        max_len, schema.dense_dim, args, with_head)
    return place(model, device)


MODEL_SPEC = ModelSpec(
    name="interformer",
    args_cls=InterFormerArgs,
    build=build_interformer,
    flavours={
        "default": InterFormerArgs(),
        "small": InterFormerArgs(num_layers=2, dcn_rank=8, mask_dims=[32], head_dims=[64]),
        "deep": InterFormerArgs(num_layers=3),
    },
    task="ctr",
    description="InterFormer: interleaved DHEN interaction, PFFN + rotary MHA sequence arch "
                "and gated cross summaries over pooled embeddings and behaviour sequences",
    backbone=True,
)
