"""The unit of work flowing from the reader through the train pipeline into the model.

``Batch`` implements torchrec's ``Pipelineable`` (``to``, ``record_stream``, ``pin_memory``)
so ``TrainPipelineSparseDist`` can copy it to the device and overlap input distribution.

Shapes (B = batch size on this rank):

* ``dense``: float32 ``[B, Dd]`` (``Dd`` may be 0);
* ``sparse``: ``KeyedJaggedTensor`` of pooled features, one key per sparse feature,
  ``lengths`` of shape ``[num_keys * B]`` (key-major);
* ``labels``: float32 ``[B]`` (first label) — ``[B, T]`` when the schema has T > 1 labels;
* ``sequence``: optional ``KeyedJaggedTensor`` of unpooled sequence ids (most recent
  ``max_len`` per row, oldest first), one key per sequence feature;
* ``timestamps``: optional ``KeyedJaggedTensor`` with the same keys and lengths as
  ``sequence`` holding the event times (sequential eval batches add one key,
  ``<item>_query_ts``: each row's held-out event time, see ``trainer.tasks.sequential``);
* ``sample_ids``: int64 ``[B]`` global row ids (for exact-resume checks and debugging).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


@dataclass
class Batch(Pipelineable):
    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    labels: torch.Tensor
    sequence: Optional[KeyedJaggedTensor] = None
    timestamps: Optional[KeyedJaggedTensor] = None
    sample_ids: Optional[torch.Tensor] = None

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        def move(x):  # type: ignore[no-untyped-def]
            return None if x is None else x.to(device=device, non_blocking=non_blocking)

        return Batch(
            dense=move(self.dense),
            sparse=move(self.sparse),
            labels=move(self.labels),
            sequence=move(self.sequence),
            timestamps=move(self.timestamps),
            sample_ids=move(self.sample_ids),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        # Only meaningful for CUDA streams; on CPU torchrec pipelines never call it with
        # one, and KJT.record_stream would fail there.
        if self.dense.device.type != "cuda":
            return
        for x in (self.dense, self.sparse, self.labels, self.sequence, self.timestamps,
                  self.sample_ids):
            if x is not None:
                x.record_stream(stream)  # type: ignore[arg-type]

    def pin_memory(self) -> "Batch":
        def pin(x):  # type: ignore[no-untyped-def]
            return None if x is None else x.pin_memory()

        return Batch(
            dense=pin(self.dense),
            sparse=pin(self.sparse),
            labels=pin(self.labels),
            sequence=pin(self.sequence),
            timestamps=pin(self.timestamps),
            sample_ids=pin(self.sample_ids),
        )
