"""POSO (Wang et al. 2021, "POSO: Personalized Cold Start Modules for Large-scale
Recommender Systems") on MMoE: every hidden layer of every expert and tower is scaled unit
by unit by a personalisation gate of the user's cold-start features ``pc``::

    g_l(pc) = C · σ(MLP_l(pc))         (C = ``poso_scale``, 2 in the paper)
    h_l ← h_l ⊙ g_l(pc)

so new or inactive users (e.g. a low user-activity dense feature, a sparse user-group id)
get their own effective sub-network. ``pc`` = the dense features ``poso_dense`` and the
pooled embeddings of the sparse features ``poso_sparse``; at least one must be set.
A fresh gate is the constant ``C/2`` (its last layer starts at zero), i.e. with C = 2 the
model starts as the plain MMoE.

Shapes: ``rep [B, H]``, ``pc [B, P]`` → logits ``[B, T]``.

Example::

    spec = get_model_spec("poso")
    model = spec.build(schema, spec.make_args("default", {"poso_dense": ["d0"]}), "cpu")
    model(batch).shape     # [B, T]
"""

from __future__ import annotations

from data.schema import Schema
from models.blocks import place
from models.multitask.common import MultiTaskArgs
from models.multitask.mmoe import MMoE
from models.spec import ModelSpec


class POSO(MMoE):
    """MMoE with POSO gates; see the module docstring."""

    def __init__(self, schema: Schema, args: MultiTaskArgs, device: str) -> None:
        if not args.poso:
            raise ValueError("model.args.poso_dense and model.args.poso_sparse are both empty; "
                             "POSO needs the user cold-start features its gates read (e.g. "
                             "poso_dense = [\"d0\"] or poso_sparse = [\"user_group\"])")
        super().__init__(schema, args, device)


def build_poso(schema: Schema, args: MultiTaskArgs, device: str = "meta") -> POSO:
    model = POSO(schema, args, device)
    return place(model, device)


MODEL_SPEC = ModelSpec(
    name="poso",
    args_cls=MultiTaskArgs,
    build=build_poso,
    flavours={
        # The synthetic datasets' first dense column stands in for a user-activity feature.
        "default": MultiTaskArgs(poso_dense=["d0"]),
    },
    task="multitask",
    description="POSO: MMoE whose expert and tower units are scaled by personalisation gates "
                "C*sigmoid(MLP(pc)) of user cold-start features",
)
