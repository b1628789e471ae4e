"""DCN-v2 (Wang et al. 2021, "DCN V2: Improved Deep & Cross Network") over sharded pooled
embeddings.

The input is ``x_0 = [dense ‖ e_1 ‖ … ‖ e_F]``: the raw dense features concatenated with the
flattened pooled embeddings of the F sparse features (tables may differ in width). The cross
network applies L layers of

    x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l

with ``W_l`` full rank (torchrec ``CrossNet``), low rank ``U_l V_lᵀ`` (``LowRankCrossNet``) or
a gated mixture of low-rank experts with a non-linearity in the low-rank space
(``LowRankMixtureCrossNet``, the paper's DCN-Mix). The deep network is torchrec's ``MLP``.
Two structures from the paper:

* ``stacked``:  logit = w · MLP(Cross(x_0)) + b
* ``parallel``: logit = w · [Cross(x_0) ‖ MLP(x_0)] + b

Shapes: ``Batch.dense [B, Dd]``, ``Batch.sparse`` KJT with F keys → logits ``[B]``.

Example::

    spec = get_model_spec("dcn_v2")
    model = spec.build(schema, spec.make_args("default"), "cpu")
    logits = model(batch)      # [B]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from torch import nn
from torchrec.modules.crossnet import CrossNet, LowRankCrossNet, LowRankMixtureCrossNet
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from data.schema import Schema
from models.blocks import build_ebc, place
from models.cross_deep import CrossDeep, cross_input_width, pooled_feature_names
from models.spec import ModelSpec

CROSS_TYPES = ("full", "low_rank", "mixture")
STRUCTURES = ("stacked", "parallel")


@dataclass
class DCNv2Args:
    """Arguments of :class:`DCNv2`."""

    #: table width for every pooled table (a multiple of 4); ``None`` keeps the schema's.
    embedding_dim: Optional[int] = None
    #: ``full`` (CrossNet), ``low_rank`` (LowRankCrossNet) or ``mixture``
    #: (LowRankMixtureCrossNet, DCN-Mix).
    cross_type: str = "mixture"
    #: number of cross layers L.
    cross_layers: int = 3
    #: rank r of ``W = U Vᵀ`` for ``low_rank`` and ``mixture``.
    low_rank: int = 32
    #: experts per layer for ``mixture``.
    num_experts: int = 4
    #: ``stacked`` (deep after cross) or ``parallel`` (deep beside cross).
    structure: str = "stacked"
    #: hidden layer sizes of the deep MLP (empty: no deep network, cross only).
    deep_dims: List[int] = field(default_factory=lambda: [256, 128])

    def validate(self) -> None:
        if self.cross_type not in CROSS_TYPES:
            raise ValueError(f"model.args.cross_type={self.cross_type!r}; choose one of "
                             f"{list(CROSS_TYPES)}")
        if self.structure not in STRUCTURES:
            raise ValueError(f"model.args.structure={self.structure!r}; choose one of "
                             f"{list(STRUCTURES)}")
        if self.cross_layers < 1:
            raise ValueError(f"model.args.cross_layers={self.cross_layers} must be >= 1")
        if self.low_rank < 1 or self.num_experts < 1:
            raise ValueError(f"model.args.low_rank={self.low_rank} and num_experts="
                             f"{self.num_experts} must be >= 1")


def build_cross_net(in_features: int, args: DCNv2Args) -> nn.Module:
    """The cross network selected by ``args.cross_type``: ``[B, N]`` → ``[B, N]``."""
    if args.cross_type == "full":
        return CrossNet(in_features, args.cross_layers)
    if args.cross_type == "low_rank":
        return LowRankCrossNet(in_features, args.cross_layers, low_rank=args.low_rank)
    return LowRankMixtureCrossNet(in_features, args.cross_layers,
                                  num_experts=args.num_experts, low_rank=args.low_rank)


class DCNv2(CrossDeep):
    """See the module docstring (the stacking, head and representation are
    :class:`models.cross_deep.CrossDeep`'s).

    Args:
        ebc: unsharded EBC over the pooled tables.
        feature_names: the pooled features, in the order they are concatenated into ``x_0``.
        dense_in: number of dense features ``Dd``.
        args: :class:`DCNv2Args`.
        with_head: False builds a backbone for multi-task heads: no ``head`` (the logit
            layer); only :meth:`representation` is used.
    """

    def __init__(self, ebc: EmbeddingBagCollection, feature_names: List[str], dense_in: int,
                 args: DCNv2Args, with_head: bool = True) -> None:
        args.validate()
        cross = build_cross_net(cross_input_width(ebc, feature_names, dense_in), args)
        # Without a deep network the parallel model's head sees [Cross(x_0) ‖ x_0].
        super().__init__(ebc, feature_names, dense_in, cross, args.structure,
                         list(args.deep_dims), parallel_keeps_input=True,
                         with_head=with_head)
        self.structure = args.structure


def build_dcn_v2(schema: Schema, args: DCNv2Args, device: str = "meta",
                 with_head: bool = True) -> DCNv2:
    if args.embedding_dim is not None and args.embedding_dim % 4:
        raise ValueError(f"model.args.embedding_dim={args.embedding_dim} must be a multiple "
                         f"of 4 (fbgemm kernels)")
    ebc = build_ebc(schema, device, embedding_dim=args.embedding_dim)
    model = DCNv2(ebc, pooled_feature_names(schema), schema.dense_dim, args, with_head)
    return place(model, device)


MODEL_SPEC = ModelSpec(
    name="dcn_v2",
    args_cls=DCNv2Args,
    build=build_dcn_v2,
    flavours={
        # DCN-Mix, stacked: the paper's recommended configuration.
        "default": DCNv2Args(),
        "full": DCNv2Args(cross_type="full"),
        "low_rank": DCNv2Args(cross_type="low_rank"),
        "parallel": DCNv2Args(structure="parallel"),
        "small": DCNv2Args(cross_layers=2, low_rank=8, num_experts=2, deep_dims=[64, 32]),
    },
    task="ctr",
    description="DCN-v2: cross network (full / low-rank / mixture of experts) with a deep "
                "MLP, stacked or parallel, over dense inputs and pooled embeddings",
    backbone=True,
)
