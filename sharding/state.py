"""Moving full (unsharded) tensors into a sharded model's state.

Used to give a sharded model exactly the weights of an unsharded reference (tests, warm
starts from an exported model): for every sharded tensor, each local shard copies its slice
``[row_offset : row_offset + rows, col_offset : col_offset + cols]`` of the full tensor.
"""

from __future__ import annotations

from typing import Dict, Mapping

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor


def _strip(key: str) -> str:
    # DDP-wrapped dense modules show up with a "_dmp_wrapped_module."/"module." infix.
    return key.replace("_dmp_wrapped_module.", "").replace("module.", "")


@torch.no_grad()
def load_full_state(model: nn.Module, full: Mapping[str, torch.Tensor]) -> int:
    """Copy ``full`` (an unsharded model's ``state_dict``) into ``model``'s shards.

    Keys are matched after stripping wrapper prefixes. Returns the number of tensors copied;
    raises ``KeyError`` naming any key of ``model`` that ``full`` lacks.
    """
    by_name: Dict[str, torch.Tensor] = {_strip(k): v for k, v in full.items()}
    copied = 0
    for key, value in model.state_dict().items():
        name = _strip(key)
        if name not in by_name:
            raise KeyError(f"{key}: no tensor {name!r} in the full state dict")
        src = by_name[name]
        if isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.copy_(src[r0 : r0 + nr, c0 : c0 + nc])
        elif isinstance(value, DTensor):
            value.to_local().copy_(src)  # replicated (data-parallel) tables
        else:
            value.copy_(src.to(value.device))
        copied += 1
    return copied


@torch.no_grad()
def gather_full_tensor(value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The full tensor of a ``ShardedTensor`` on every rank (for tests and export)."""
    if isinstance(value, ShardedTensor):
        out = torch.zeros(shape, dtype=value.dtype)
        value.gather(dst=0, out=out if torch.distributed.get_rank() == 0 else None)
        torch.distributed.broadcast(out, src=0)
        return out
    if isinstance(value, DTensor):
        return value.full_tensor()
    return value.detach().clone()
