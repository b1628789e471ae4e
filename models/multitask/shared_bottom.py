"""Shared-bottom multi-task baseline (Caruana 1997): one MLP shared by all tasks, one tower
per task.

    h = MLP_bottom(rep);  logit_t = Tower_t(h)

Shapes: ``rep [B, H]`` (the backbone's representation) → logits ``[B, T]``, one column per
task (``model.args.tasks``).

Example::

    spec = get_model_spec("shared_bottom")
    model = spec.build(schema, spec.make_args("default"), "cpu")
    model(batch).shape     # [B, T]
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from data.schema import Schema
from models.blocks import place
from models.multitask.common import GatedMLP, MultiTaskArgs, MultiTaskModel, Tower, \
    task_outputs
from models.spec import ModelSpec


class SharedBottom(MultiTaskModel):
    """See the module docstring; POSO gates (when configured) scale the bottom's and the
    towers' hidden units."""

    def __init__(self, schema: Schema, args: MultiTaskArgs, device: str) -> None:
        super().__init__(schema, args, task_outputs(schema, args), device)
        self.bottom = GatedMLP(self.rep_dim, args.bottom_dims, self.pc_dim, args.poso_dims,
                               args.poso_scale)
        self.towers = nn.ModuleList(Tower(self.bottom.out_dim, args.tower_dims, self.pc_dim,
                                          args) for _ in self.predictions)

    def head(self, rep: torch.Tensor, pc: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.bottom(rep, pc)
        return torch.cat([tower(h, pc) for tower in self.towers], dim=1)


def build_shared_bottom(schema: Schema, args: MultiTaskArgs, device: str = "meta"
                        ) -> SharedBottom:
    model = SharedBottom(schema, args, device)
    return place(model, device)


MODEL_SPEC = ModelSpec(
    name="shared_bottom",
    args_cls=MultiTaskArgs,
    build=build_shared_bottom,
    flavours={
        "default": MultiTaskArgs(),
        "deepfm": MultiTaskArgs(backbone="deepfm"),
        "interformer": MultiTaskArgs(backbone="interformer"),
    },
    task="multitask",
    description="shared-bottom multi-task baseline: one shared MLP, one tower per task, over "
                "a backbone's representation",
)
