"""Shared parts of the multi-task heads: arguments, the backbone, POSO gates, towers, the
prediction list and the multi-task loss wrapper.

A head model is ``backbone → representation [B, H] → head → logits [B, P]``:

* the **backbone** is a registered single-task model with a ``representation(batch)``
  method (DeepFM, DCN-v2, InterFormer, Wide&Deep, DCN, xDeepFM, MaskNet, DIN, DIEN; DIEN's
  auxiliary loss is not used there): its embeddings (pooled and sequence) and
  interaction layers up to, not including, its final logit layer, which is removed so it
  holds no unused parameters (DDP requires every parameter to get a gradient);
* the **head** (shared-bottom, MMoE, PLE, ESMM, POSO) maps the representation to one
  logit per prediction; predictions are described by :class:`Prediction` (which label a
  prediction is trained and evaluated against, its loss weight and row mask).

POSO (Wang et al. 2021) personalisation gates, ``g(pc) = C · σ(MLP(pc))`` with ``pc`` the
configured user cold-start features (dense columns and/or pooled embeddings of sparse
features), multiply every hidden layer of every expert and tower, unit by unit, when
``poso_dense`` / ``poso_sparse`` are set. The gate's last layer starts at zero, so a fresh
gate is the constant ``C/2`` (= 1 for the paper's C = 2) and the model starts as the plain one.

Example::

    spec = get_model_spec("mmoe")
    model = spec.build(schema, spec.make_args("default"), "cpu")
    logits = model(batch)                  # [B, P], P = len(model.predictions)
    loss, (_, logits, labels) = MultiTaskTrain(model)(batch)   # trainer.tasks.multitask
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mlp import MLP

from data.batch import Batch
from data.schema import Schema
from models.blocks import pooled_table_configs

#: Models that can be a backbone (their spec says ``backbone=True``): built with
#: ``with_head=False`` they have no logit layer, and ``representation(batch) -> [B, H]``
#: (``H = representation_dim``) is what a head maps.
BACKBONES: Tuple[str, ...] = ("deepfm", "dcn_v2", "interformer", "wide_deep", "dcn", "xdeepfm",
                              "masknet", "din", "dien")


@dataclass
class MultiTaskArgs:
    """Arguments of every multi-task head (each head uses the ones it needs)."""

    #: backbone model name (its representation feeds the head): one of ``BACKBONES``.
    backbone: str = "dcn_v2"
    #: the backbone's flavour and argument overrides (as ``model.flavour`` / ``model.args``
    #: would be for the backbone alone).
    backbone_flavour: str = "small"
    backbone_args: Dict[str, Any] = field(default_factory=dict)
    #: labels trained as tasks, in order (default: every label not marked ``eval_only``).
    tasks: List[str] = field(default_factory=list)
    #: loss weight per task name (default 1.0 each); 0 keeps a task for metrics only.
    loss_weights: Dict[str, float] = field(default_factory=dict)
    #: task → label: the task's loss and metrics use only rows where that label is 1
    #: (e.g. ``{conversion = "click"}``: a CVR model trained on clicked rows only).
    loss_given: Dict[str, str] = field(default_factory=dict)
    #: prediction → label to evaluate it against over all rows instead of its own label
    #: (e.g. ESMM's ``{cvr = "would_convert"}`` on the synthetic data).
    eval_labels: Dict[str, str] = field(default_factory=dict)
    #: shared-bottom MLP (shared_bottom).
    bottom_dims: List[int] = field(default_factory=lambda: [128, 64])
    #: experts (MMoE, POSO): count and hidden sizes.
    num_experts: int = 4
    expert_dims: List[int] = field(default_factory=lambda: [64])
    #: PLE: shared and task-specific experts per level, and the number of levels.
    num_shared_experts: int = 2
    num_task_experts: int = 1
    num_levels: int = 2
    #: hidden sizes of each task's tower (a final linear maps to one logit).
    tower_dims: List[int] = field(default_factory=lambda: [32])
    #: POSO personalisation inputs: dense feature names and sparse feature names (pooled
    #: embeddings of their own small tables); empty: no POSO gates.
    poso_dense: List[str] = field(default_factory=list)
    poso_sparse: List[str] = field(default_factory=list)
    #: hidden sizes of each POSO gate MLP, the gate's scale C, the width of the POSO
    #: sparse features' embeddings (a multiple of 4).
    poso_dims: List[int] = field(default_factory=lambda: [16])
    poso_scale: float = 2.0
    poso_embedding_dim: int = 8

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad ``model.args`` key."""
        if self.backbone not in BACKBONES:
            raise ValueError(f"model.args.backbone={self.backbone!r}; choose one of "
                             f"{sorted(BACKBONES)}")
        for key in ("num_experts", "num_shared_experts", "num_levels"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.args.{key}={getattr(self, key)} must be >= 1")
        if self.num_task_experts < 0:
            raise ValueError(f"model.args.num_task_experts={self.num_task_experts} must be "
                             f">= 0")
        for key in ("bottom_dims", "expert_dims", "tower_dims", "poso_dims"):
            if any(int(d) < 1 for d in getattr(self, key)):
                raise ValueError(f"model.args.{key}={getattr(self, key)}: sizes must be >= 1")
        if not self.expert_dims:
            raise ValueError("model.args.expert_dims must name at least one layer")
        if not (self.poso_scale > 0 and math.isfinite(self.poso_scale)):
            raise ValueError(f"model.args.poso_scale={self.poso_scale} must be > 0")
        if self.poso_embedding_dim % 4 or self.poso_embedding_dim < 4:
            raise ValueError(f"model.args.poso_embedding_dim={self.poso_embedding_dim} must be "
                             f"a positive multiple of 4 (fbgemm kernels)")

    @property
    def poso(self) -> bool:
        return bool(self.poso_dense or self.poso_sparse)


@dataclass(frozen=True)
class Prediction:
    """One output column of a head and how it is trained and evaluated.

    Args:
        name: metric suffix (``auc_<name>``) — the task (label) name, or a derived output
            such as ESMM's ``cvr``.
        kind: ``binary`` (a logit; BCE, AUC/NE) or ``regression`` (a value; MSE).
        label: column of ``Batch.labels`` the loss uses.
        weight: loss weight (0: evaluated only).
        given: column whose rows equal to 1 are the only ones the loss sees (-1: all rows).
        eval_label, eval_given: the same two for evaluation (``None``: as for the loss).
    """

    name: str
    kind: str
    label: int
    weight: float
    given: int = -1
    eval_label: Optional[int] = None
    eval_given: Optional[int] = None

    def __post_init__(self) -> None:
        # Frozen: fill the evaluation defaults through object.__setattr__.
        if self.eval_label is None:
            object.__setattr__(self, "eval_label", self.label)
        if self.eval_given is None:
            object.__setattr__(self, "eval_given", self.given)


def resolve_tasks(schema: Schema, args: MultiTaskArgs) -> List[str]:
    """The trained task names (labels), validated against the schema."""
    names = [lab.name for lab in schema.labels]
    tasks = list(args.tasks) or [lab.name for lab in schema.labels if not lab.eval_only]
    unknown = [t for t in tasks if t not in names]
    if unknown or not tasks:
        raise ValueError(f"model.args.tasks={list(args.tasks)}: unknown label(s) {unknown}; the "
                         f"dataset's labels are {names}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"model.args.tasks={tasks} names a label twice")
    return tasks


def make_predictions(schema: Schema, args: MultiTaskArgs,
                     outputs: List[Tuple[str, str, float]]) -> List[Prediction]:
    """:class:`Prediction`s for ``outputs`` = ``(name, label, default weight)`` after
    ``loss_weights``, ``loss_given`` and ``eval_labels``; every unknown name is an error
    naming its ``model.args`` key."""
    labels = {lab.name: (k, lab.kind) for k, lab in enumerate(schema.labels)}
    names = [o[0] for o in outputs]
    for key in ("loss_weights", "loss_given", "eval_labels"):
        unknown = sorted(set(getattr(args, key)) - set(names))
        if unknown:
            raise ValueError(f"model.args.{key}: unknown task(s) {unknown}; this head's "
                             f"outputs are {names}")
    for key in ("loss_given", "eval_labels"):
        bad = sorted(v for v in getattr(args, key).values() if v not in labels)
        if bad:
            raise ValueError(f"model.args.{key}: unknown label(s) {bad}; the dataset's labels "
                             f"are {sorted(labels)}")
    for task, w in args.loss_weights.items():
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise ValueError(f"model.args.loss_weights.{task}={w!r} must be a finite number "
                             f">= 0")
    preds = []
    for name, label, default_weight in outputs:
        col, kind = labels[label]
        weight = float(args.loss_weights.get(name, default_weight)) if default_weight else 0.0
        given = labels[args.loss_given[name]][0] if name in args.loss_given else -1
        if name in args.eval_labels:
            eval_label, eval_given = labels[args.eval_labels[name]][0], -1
        else:
            eval_label, eval_given = col, given
        preds.append(Prediction(name, kind, col, weight, given, eval_label, eval_given))
    if not any(p.weight > 0 for p in preds):
        raise ValueError(f"model.args.loss_weights={args.loss_weights}: every task has weight "
                         f"0, nothing would be trained")
    return preds


def build_backbone(schema: Schema, args: MultiTaskArgs, device: str) -> Tuple[nn.Module, int]:
    """The backbone (built without its logit layer) and its representation width H."""
    from models import get_model_spec  # the registry imports this package lazily

    spec = get_model_spec(args.backbone)
    try:
        bargs = spec.make_args(args.backbone_flavour, args.backbone_args)
    except KeyError as e:
        raise ValueError(f"model.args.backbone_flavour / backbone_args: {e.args[0]}") from None
    model = spec.build(schema, bargs, device, with_head=False)
    return model, int(model.representation_dim)


class PosoGate(nn.Module):
    """``g(pc) = C · σ(MLP(pc))``: ``[B, P]`` → ``[B, width]`` (Wang et al. 2021). The last
    linear layer starts at zero, so a fresh gate is the constant ``C/2``.

    Example::

        PosoGate(3, [16], 64, 2.0)(torch.randn(8, 3)).shape   # [8, 64], all ones at init
    """

    def __init__(self, in_dim: int, hidden: List[int], width: int, scale: float) -> None:
        super().__init__()
        self.mlp = MLP(in_dim, hidden) if hidden else nn.Identity()
        self.out = nn.Linear(hidden[-1] if hidden else in_dim, width)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.scale = scale

    def forward(self, pc: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.sigmoid(self.out(self.mlp(pc)))


class GatedMLP(nn.Module):
    """torchrec ``MLP`` whose hidden layers are each scaled unit-wise by a POSO gate.

    Shapes: ``x [B, in]``, ``pc [B, P]`` (or ``None`` without gates) → ``[B, dims[-1]]``
    (``[B, in]`` when ``dims`` is empty).
    """

    def __init__(self, in_dim: int, dims: List[int], pc_dim: int = 0,
                 gate_dims: Optional[List[int]] = None, scale: float = 2.0) -> None:
        super().__init__()
        self.out_dim = dims[-1] if dims else in_dim
        self.mlp = MLP(in_dim, dims) if dims else None
        self.gates = nn.ModuleList(PosoGate(pc_dim, gate_dims or [], d, scale)
                                   for d in dims) if pc_dim else None

    def forward(self, x: torch.Tensor, pc: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.mlp is None:
            return x
        if self.gates is None:
            return self.mlp(x)
        # The layers of torchrec's MLP one by one, so each layer's units get their gate.
        for layer, gate in zip(self.mlp._mlp, self.gates):
            x = layer(x) * gate(pc)
        return x


class Tower(nn.Module):
    """A task tower: ``GatedMLP`` then a linear map to one output; ``[B, in]`` → ``[B, 1]``."""

    def __init__(self, in_dim: int, dims: List[int], pc_dim: int, args: MultiTaskArgs) -> None:
        super().__init__()
        self.body = GatedMLP(in_dim, dims, pc_dim, args.poso_dims, args.poso_scale)
        self.out = nn.Linear(self.body.out_dim, 1)

    def forward(self, x: torch.Tensor, pc: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.out(self.body(x, pc))


class MultiTaskModel(nn.Module, abc.ABC):
    """Backbone representation → :meth:`head` → logits ``[B, P]``; subclasses build the
    head's modules and implement :meth:`head`.

    Args:
        schema: the dataset schema (labels, POSO feature names).
        args: :class:`MultiTaskArgs`.
        outputs: ``(prediction name, label, default loss weight)`` per output column.
        device: where the embedding tables live (``meta`` for sharding).
    """

    def __init__(self, schema: Schema, args: MultiTaskArgs,
                 outputs: List[Tuple[str, str, float]], device: str) -> None:
        super().__init__()
        args.validate()
        self.args = args
        self.predictions = make_predictions(schema, args, outputs)
        self.backbone, self.rep_dim = build_backbone(schema, args, device)
        dense_names = [f.name for f in schema.dense_features]
        sparse_names = [f.name for f in schema.sparse_features]
        bad = [n for n in args.poso_dense if n not in dense_names]
        if bad:
            raise ValueError(f"model.args.poso_dense: unknown dense feature(s) {bad}; dense "
                             f"features are {dense_names}")
        bad = [n for n in args.poso_sparse if n not in sparse_names]
        if bad:
            raise ValueError(f"model.args.poso_sparse: unknown sparse feature(s) {bad}; sparse "
                             f"features are {sparse_names}")
        self.poso_dense_idx = [dense_names.index(n) for n in args.poso_dense]
        self.poso_sparse = list(args.poso_sparse)
        self.poso_ebc: Optional[EmbeddingBagCollection] = None
        if self.poso_sparse:
            # The gate's own small tables (``poso_<table>``): the backbone's pooled outputs
            # are not exposed, and cold-start gates want their own, narrow embeddings.
            sub = schema.project(self.poso_sparse)
            configs = pooled_table_configs(sub, args.poso_embedding_dim)
            for c in configs:
                c.name = f"poso_{c.name}"
            self.poso_ebc = EmbeddingBagCollection(tables=configs, device=torch.device(device))
        self.pc_dim = len(self.poso_dense_idx) + len(self.poso_sparse) * args.poso_embedding_dim

    def personalisation(self, batch: Batch) -> Optional[torch.Tensor]:
        """``pc [B, P]``: the POSO inputs (dense columns ‖ pooled sparse embeddings), or
        ``None`` without POSO."""
        if self.pc_dim == 0:
            return None
        parts: List[torch.Tensor] = []
        if self.poso_dense_idx:
            parts.append(batch.dense[:, self.poso_dense_idx])
        if self.poso_ebc is not None:
            pooled = self.poso_ebc(batch.sparse).to_dict()
            parts.extend(pooled[n] for n in self.poso_sparse)
        return torch.cat(parts, dim=1)

    @abc.abstractmethod
    def head(self, rep: torch.Tensor, pc: Optional[torch.Tensor]) -> torch.Tensor:
        """``rep [B, H]``, ``pc [B, P] | None`` → logits ``[B, len(predictions)]``."""

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.head(self.backbone.representation(batch), self.personalisation(batch))


def task_outputs(schema: Schema, args: MultiTaskArgs) -> List[Tuple[str, str, float]]:
    """One output per trained task (name = label), default weight 1."""
    return [(t, t, 1.0) for t in resolve_tasks(schema, args)]

