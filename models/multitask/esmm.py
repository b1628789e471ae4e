"""ESMM (Ma et al. 2018, "Entire Space Multi-Task Model"): CTR and CVR towers over a shared
representation; the CVR tower is supervised only through pCTCVR = pCTR · pCVR on the whole
impression space, so it never trains on the clicked rows alone (no sample selection bias).

    pCTR = σ(Tower_ctr(rep)),  pCVR = σ(Tower_cvr(rep)),  pCTCVR = pCTR · pCVR
    loss = w_ctr · BCE(pCTR, click) + w_ctcvr · BCE(pCTCVR, conversion)   (no CVR loss)

Outputs (logits, ``[B, 3]``): ``<ctr task>`` = logit(pCTR), ``<ctcvr task>`` =
logit(pCTCVR), computed in log space (``log pCTCVR = log σ(a) + log σ(b)``) so the product is
exact where it matters, and ``cvr`` = logit(pCVR), evaluated only: by default against the
conversion label on clicked rows (the paper's CVR AUC); ``eval_labels = {cvr = "..."}``
evaluates it against another label over all rows (the synthetic data's ``would_convert``).
``model.args.tasks`` = ``[click label, conversion label]`` (default: the schema's first two
trainable labels).

Shapes: ``rep [B, H]`` → logits ``[B, 3]``.

Example::

    spec = get_model_spec("esmm")
    model = spec.build(schema, spec.make_args("default"), "cpu")
    p_ctr, p_ctcvr, p_cvr = torch.sigmoid(model(batch)).unbind(1)
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from data.schema import Schema
from models.blocks import place
from models.multitask.common import MultiTaskArgs, MultiTaskModel, Tower, resolve_tasks
from models.spec import ModelSpec


def esmm_outputs(schema: Schema, args: MultiTaskArgs) -> List[Tuple[str, str, float]]:
    tasks = resolve_tasks(schema, args)
    if len(tasks) != 2:
        raise ValueError(f"model.args.tasks={tasks}: ESMM needs exactly two tasks, the click "
                         f"label and the conversion (click and convert) label")
    kinds = {lab.name: lab.kind for lab in schema.labels}
    if any(kinds[t] != "binary" for t in tasks):
        raise ValueError(f"model.args.tasks={tasks}: ESMM's tasks must be binary labels")
    ctr, ctcvr = tasks
    # cvr: no loss (weight 0); its metrics default to conversion on clicked rows.
    return [(ctr, ctr, 1.0), (ctcvr, ctcvr, 1.0), ("cvr", ctcvr, 0.0)]


class ESMM(MultiTaskModel):
    """See the module docstring."""

    def __init__(self, schema: Schema, args: MultiTaskArgs, device: str) -> None:
        if "cvr" not in args.loss_given and "cvr" not in args.eval_labels:
            tasks = resolve_tasks(schema, args)
            args = _with_cvr_given(args, tasks[0])
        super().__init__(schema, args, esmm_outputs(schema, args), device)
        self.ctr_tower = Tower(self.rep_dim, args.tower_dims, self.pc_dim, args)
        self.cvr_tower = Tower(self.rep_dim, args.tower_dims, self.pc_dim, args)

    def head(self, rep: torch.Tensor, pc: Optional[torch.Tensor]) -> torch.Tensor:
        a = self.ctr_tower(rep, pc)
        b = self.cvr_tower(rep, pc)
        log_p = F.logsigmoid(a) + F.logsigmoid(b)  # log pCTCVR
        # logit(p) = log p − log(1 − p); the clamp keeps log(1 − p) finite when p rounds to 1.
        ctcvr = log_p - torch.log(-torch.expm1(log_p.clamp(max=-1e-7)))
        return torch.cat([a, ctcvr, b], dim=1)


def _with_cvr_given(args: MultiTaskArgs, click: str) -> MultiTaskArgs:
    # The paper's CVR evaluation: conversions among clicked rows.
    return dataclasses.replace(args, loss_given={**args.loss_given, "cvr": click})


def build_esmm(schema: Schema, args: MultiTaskArgs, device: str = "meta") -> ESMM:
    model = ESMM(schema, args, device)
    return place(model, device)


MODEL_SPEC = ModelSpec(
    name="esmm",
    args_cls=MultiTaskArgs,
    build=build_esmm,
    flavours={
        "default": MultiTaskArgs(tower_dims=[64, 32]),
        "deepfm": MultiTaskArgs(backbone="deepfm", tower_dims=[64, 32]),
    },
    task="multitask",
    description="ESMM: CTR and CVR towers, pCTCVR = pCTR x pCVR trained on all impressions",
)
