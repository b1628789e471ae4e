"""Building blocks shared by the models: embedding collections from a schema, pooled-field
stacking, device placement, and the backbone seam (:func:`kept_head`).

torchrec's own blocks (``MLP``, ``FactorizationMachine``, ``CrossNet`` ...) are used directly
by the models; only what torchrec lacks lives here.
"""

from __future__ import annotations

from typing import Any, List, Optional, TypeVar

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedTensor

from data.batch import Batch
from data.schema import Schema

_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


def pooled_table_configs(schema: Schema, embedding_dim: Optional[int] = None
                         ) -> List[EmbeddingBagConfig]:
    """One ``EmbeddingBagConfig`` per pooled table of ``schema``.

    Args:
        embedding_dim: override every table's dim (models whose interaction needs one dim).
    """
    return [
        EmbeddingBagConfig(
            name=t.name,
            num_embeddings=t.num_embeddings,
            embedding_dim=embedding_dim or t.embedding_dim,
            feature_names=list(t.features),
            pooling=_POOLING[t.pooling],
        )
        for t in schema.tables("sparse").values()
    ]


def build_ebc(schema: Schema, device: str = "meta",
              embedding_dim: Optional[int] = None) -> EmbeddingBagCollection:
    """Unsharded ``EmbeddingBagCollection`` over the schema's pooled tables on ``device``."""
    return EmbeddingBagCollection(
        tables=pooled_table_configs(schema, embedding_dim),
        device=torch.device(device),
    )


def uniform_width(schema: Schema, embedding_dim: Optional[int], model: str,
                  kind: Optional[str] = None, min_width: int = 4) -> int:
    """The one table width a model that stacks its fields needs: ``embedding_dim`` if set,
    else the schema's tables' (``kind="sparse"``: the pooled tables only), which must agree;
    a multiple of 4 (fbgemm's kernels) and at least ``min_width``. Errors name ``model`` and
    ``model.args.embedding_dim``."""
    if embedding_dim:
        width = embedding_dim
    else:
        dims = {t.embedding_dim for t in schema.tables(kind).values()}
        if len(dims) != 1:
            which = "pooled tables" if kind == "sparse" else "tables"
            raise ValueError(f"{model} needs one embedding_dim for all {which}; the schema "
                             f"has {sorted(dims)}: set model.args.embedding_dim")
        width = dims.pop()
    if width % 4 or width < min_width:
        floor = f" and >= {min_width}" if min_width > 4 else ""
        raise ValueError(f"{model} table width {width} must be a multiple of 4{floor} (fbgemm "
                         f"kernels need multiples of 4); set model.args.embedding_dim")
    return width


def build_sequence_collection(schema: Schema, width: int, device: str = "meta"
                              ) -> EmbeddingCollection:
    """Unsharded ``EmbeddingCollection`` over every sequence table of the schema, each
    ``width`` wide, on ``device`` (the batch carries every sequence key)."""
    return EmbeddingCollection(
        tables=[EmbeddingConfig(name=t.name, num_embeddings=t.num_embeddings,
                                embedding_dim=width, feature_names=list(t.features))
                for t in schema.tables("sequence").values()],
        device=torch.device(device),
    )


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def place(model: ModuleT, device: str) -> ModuleT:
    """A freshly built model on ``device``. On ``"meta"`` (the sharded path) nothing moves:
    the embedding collections were built on meta for the planner, and the dense part stays
    on the CPU until ``DistributedModelParallel`` moves it to the rank's device."""
    if device != "meta":
        model.to(device)
    return model


def kept_head(layer: ModuleT, with_head: bool) -> Optional[ModuleT]:
    """A CTR model's final logit layer(s) ``layer`` when the model keeps them, else ``None``:
    built with ``with_head=False`` the model is a backbone, and a multi-task head maps its
    ``representation(batch) -> [B, H]`` instead (``models.multitask.common.build_backbone``).

    The model builds ``layer`` in both modes and drops it here, unregistered: building draws
    its initial weights from the global RNG, so a backbone leaves the RNG where the whole model
    does, and what is built after it (a multi-task model's towers) starts from the same
    weights whichever way the backbone was made (seeded multi-task runs are unchanged)."""
    return layer if with_head else None


def stack_fields(pooled: KeyedTensor, feature_names: List[str], dim: int) -> torch.Tensor:
    """``[B, F, dim]`` from a KeyedTensor of F pooled features of width ``dim``, in
    ``feature_names`` order (sharded and unsharded EBCs may order keys differently)."""
    by_name = pooled.to_dict()
    return torch.cat([by_name[n] for n in feature_names], dim=1).reshape(
        -1, len(feature_names), dim)


class FactorizationMachine(nn.Module):
    """Second-order FM interaction over F field vectors (Rendle 2010):
    ``Σ_{i<j} <v_i, v_j> = ½ Σ_d [(Σ_i v_id)² − Σ_i v_id²]`` — O(F·D) instead of O(F²·D).

    torchrec's ``FactorizationMachine`` flattens its input to ``[B, F·D]`` and so pairs every
    scalar with every other (including the D coordinates of one field with each other),
    which is not the field-wise FM of DeepFM; hence this module.

    Shapes: ``[B, F, D]`` → ``[B]``.

    Example::

        FactorizationMachine()(torch.randn(8, 5, 16)).shape   # torch.Size([8])
    """

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        square_of_sum = fields.sum(dim=1).pow(2)
        sum_of_squares = fields.pow(2).sum(dim=1)
        return 0.5 * (square_of_sum - sum_of_squares).sum(dim=1)


DENSE_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(dense_dtype: str) -> Optional[torch.dtype]:
    """The autocast dtype of a ``dense_dtype`` setting (``None`` for fp32: no autocast)."""
    if dense_dtype not in DENSE_DTYPES:
        raise ValueError(f"dense_dtype {dense_dtype!r} is not one of {list(DENSE_DTYPES)}")
    return DENSE_DTYPES[dense_dtype]


def autocast_forward(model: nn.Module, batch: Batch, dtype: Optional[torch.dtype],
                     device_type: str) -> Any:
    """``model(batch)`` with its dense compute autocast to ``dtype`` (``None``: fp32), the
    result back in fp32 (its ``float()``: a tensor, or an output type that defines one) so
    losses and metrics stay full precision."""
    if dtype is None:
        return model(batch)
    with torch.autocast(device_type, dtype=dtype):
        out = model(batch)
    return out.float()

