"""MMoE (Ma et al. 2018, "Modeling Task Relationships in Multi-task Learning with
Multi-gate Mixture-of-Experts"): K shared experts, one softmax gate per task.

    e_k = Expert_k(rep)                          k = 1..K,  [B, E]
    g_t = softmax(W_t rep)                       [B, K], Σ_k g_tk = 1
    logit_t = Tower_t(Σ_k g_tk e_k)

Shapes: ``rep [B, H]`` → logits ``[B, T]``.

Example::

    spec = get_model_spec("mmoe")
    model = spec.build(schema, spec.make_args("default"), "cpu")
    model(batch).shape     # [B, T]
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from data.schema import Schema
from models.blocks import place
from models.multitask.common import GatedMLP, MultiTaskArgs, MultiTaskModel, Tower, \
    task_outputs
from models.spec import ModelSpec


class MMoE(MultiTaskModel):
    """See the module docstring; POSO gates (when configured) scale the experts' and the
    towers' hidden units."""

    def __init__(self, schema: Schema, args: MultiTaskArgs, device: str) -> None:
        super().__init__(schema, args, task_outputs(schema, args), device)
        self.experts = nn.ModuleList(
            GatedMLP(self.rep_dim, args.expert_dims, self.pc_dim, args.poso_dims,
                     args.poso_scale) for _ in range(args.num_experts))
        self.gates = nn.ModuleList(nn.Linear(self.rep_dim, args.num_experts)
                                   for _ in self.predictions)
        self.towers = nn.ModuleList(Tower(args.expert_dims[-1], args.tower_dims, self.pc_dim,
                                          args) for _ in self.predictions)

    def mixture(self, rep: torch.Tensor, pc: Optional[torch.Tensor]
                ) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """Per task the gated mix of experts ``[B, E]``, and the gate weights ``[B, T, K]``."""
        experts = torch.stack([e(rep, pc) for e in self.experts], dim=1)  # [B, K, E]
        weights = torch.stack([torch.softmax(g(rep), dim=1) for g in self.gates], dim=1)
        mixed = torch.bmm(weights, experts)  # [B, T, E]
        return [mixed[:, t] for t in range(len(self.gates))], weights

    def head(self, rep: torch.Tensor, pc: Optional[torch.Tensor]) -> torch.Tensor:
        inputs, _ = self.mixture(rep, pc)
        return torch.cat([tower(x, pc) for tower, x in zip(self.towers, inputs)], dim=1)


def build_mmoe(schema: Schema, args: MultiTaskArgs, device: str = "meta") -> MMoE:
    model = MMoE(schema, args, device)
    return place(model, device)


MODEL_SPEC = ModelSpec(
    name="mmoe",
    args_cls=MultiTaskArgs,
    build=build_mmoe,
    flavours={
        "default": MultiTaskArgs(),
        "deepfm": MultiTaskArgs(backbone="deepfm"),
        "interformer": MultiTaskArgs(backbone="interformer"),
    },
    task="multitask",
    description="MMoE: shared experts mixed by one softmax gate per task, over a backbone's "
                "representation",
)
