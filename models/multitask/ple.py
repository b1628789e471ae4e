"""PLE (Tang et al. 2020, "Progressive Layered Extraction"): per level, shared experts plus
task-specific experts, combined by Customized Gate Control (CGC), stacked in levels.

Level l takes one input per task ``x_t`` and a shared input ``x_s`` (all equal to ``rep`` at
the first level)::

    E_t = [TaskExpert_{t,1}(x_t) … TaskExpert_{t,m}(x_t)]      m = num_task_experts
    S   = [SharedExpert_1(x_s) … SharedExpert_n(x_s)]           n = num_shared_experts
    x_t ← softmax(W_t x_t) · [E_t ‖ S]                          (task t's CGC gate)
    x_s ← softmax(W_s x_s) · [E_1 ‖ … ‖ E_T ‖ S]                (shared gate; not on the last level)

and ``logit_t = Tower_t(x_t)`` after the last level. One level is the paper's CGC.

Shapes: ``rep [B, H]`` → logits ``[B, T]``.

Example::

    spec = get_model_spec("ple")
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


class ExtractionLevel(nn.Module):
    """One PLE level (a CGC block, plus the shared gate when another level follows).

    Shapes: ``task_inputs`` T × ``[B, in_dim]``, ``shared [B, in_dim]`` → T × ``[B, E]``,
    ``[B, E]`` (or ``None`` on the last level), and the gate weights: T × ``[B, m + n]``
    (plus ``[B, T·m + n]`` for the shared gate).
    """

    def __init__(self, in_dim: int, num_tasks: int, last: bool, pc_dim: int,
                 args: MultiTaskArgs) -> None:
        super().__init__()

        def expert() -> GatedMLP:
            return GatedMLP(in_dim, args.expert_dims, pc_dim, args.poso_dims, args.poso_scale)

        m, n = args.num_task_experts, args.num_shared_experts
        self.task_experts = nn.ModuleList(nn.ModuleList(expert() for _ in range(m))
                                          for _ in range(num_tasks))
        self.shared_experts = nn.ModuleList(expert() for _ in range(n))
        self.task_gates = nn.ModuleList(nn.Linear(in_dim, m + n) for _ in range(num_tasks))
        self.shared_gate = None if last else nn.Linear(in_dim, num_tasks * m + n)

    def forward(self, task_inputs: List[torch.Tensor], shared: torch.Tensor,
                pc: Optional[torch.Tensor]
                ) -> Tuple[List[torch.Tensor], Optional[torch.Tensor], List[torch.Tensor]]:
        shared_out = [e(shared, pc) for e in self.shared_experts]
        task_out = [[e(x, pc) for e in experts]
                    for experts, x in zip(self.task_experts, task_inputs)]
        outputs, weights = [], []
        for t, x in enumerate(task_inputs):
            w = torch.softmax(self.task_gates[t](x), dim=1)  # [B, m + n]
            experts = torch.stack(task_out[t] + shared_out, dim=1)  # [B, m + n, E]
            outputs.append(torch.bmm(w.unsqueeze(1), experts).squeeze(1))
            weights.append(w)
        shared_next = None
        if self.shared_gate is not None:
            w = torch.softmax(self.shared_gate(shared), dim=1)  # [B, T·m + n]
            experts = torch.stack([o for outs in task_out for o in outs] + shared_out, dim=1)
            shared_next = torch.bmm(w.unsqueeze(1), experts).squeeze(1)
            weights.append(w)
        return outputs, shared_next, weights


class PLE(MultiTaskModel):
    """See the module docstring; POSO gates (when configured) scale the experts' and the
    towers' hidden units."""

    def __init__(self, schema: Schema, args: MultiTaskArgs, device: str) -> None:
        super().__init__(schema, args, task_outputs(schema, args), device)
        T = len(self.predictions)
        self.levels = nn.ModuleList(
            ExtractionLevel(self.rep_dim if i == 0 else args.expert_dims[-1], T,
                            i == args.num_levels - 1, self.pc_dim, args)
            for i in range(args.num_levels))
        self.towers = nn.ModuleList(Tower(args.expert_dims[-1], args.tower_dims, self.pc_dim,
                                          args) for _ in range(T))

    def extract(self, rep: torch.Tensor, pc: Optional[torch.Tensor]
                ) -> Tuple[List[torch.Tensor], List[List[torch.Tensor]]]:
        """Per task the last level's output ``[B, E]``, and every level's gate weights."""
        task_inputs = [rep for _ in self.towers]
        shared: Optional[torch.Tensor] = rep
        all_weights = []
        for level in self.levels:
            assert shared is not None  # only the last level has no shared output
            task_inputs, shared, weights = level(task_inputs, shared, pc)
            all_weights.append(weights)
        return task_inputs, all_weights

    def head(self, rep: torch.Tensor, pc: Optional[torch.Tensor]) -> torch.Tensor:
        inputs, _ = self.extract(rep, pc)
        return torch.cat([tower(x, pc) for tower, x in zip(self.towers, inputs)], dim=1)


def build_ple(schema: Schema, args: MultiTaskArgs, device: str = "meta") -> PLE:
    model = PLE(schema, args, device)
    return place(model, device)


MODEL_SPEC = ModelSpec(
    name="ple",
    args_cls=MultiTaskArgs,
    build=build_ple,
    flavours={
        "default": MultiTaskArgs(),
        "cgc": MultiTaskArgs(num_levels=1),
        "deepfm": MultiTaskArgs(backbone="deepfm"),
        "interformer": MultiTaskArgs(backbone="interformer"),
    },
    task="multitask",
    description="PLE: shared and task-specific experts with per-task gates (CGC), in "
                "progressive extraction levels, over a backbone's representation",
)
