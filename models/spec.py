"""What a registered model provides to the trainer."""

from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Type

from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """A model family: its class, argument dataclass, named flavours and builder.

    Args:
        name: registry name (``model.name`` in configs).
        args_cls: dataclass of the model's arguments (``[model.args]`` in configs).
        flavours: named argument presets (``model.flavour``); ``default`` must exist.
        build: ``build(schema, args, device)`` → the unsharded model (a ``Batch`` → logits
            module) with its embedding collections on ``device`` (``meta`` for sharding).
        task: the task kind (``trainer.tasks.TASK_KINDS``): the loss wrapper, metrics,
            evaluation and ``final`` line the trainer uses for it (``ctr``).
        description: one line for ``--help`` and error messages.
        backbone: the model can be a multi-task backbone: ``build(schema, args, device,
            with_head=False)`` builds it without its final logit layer(s), and its
            ``representation(batch) -> [B, H]`` (``H = representation_dim``) is what the
            head maps (``models.multitask.common.build_backbone``).
    """

    name: str
    args_cls: Type[Any]
    build: Callable[..., nn.Module]
    flavours: Mapping[str, Any] = field(default_factory=dict)
    task: str = "ctr"
    description: str = ""
    backbone: bool = False

    def make_args(self, flavour: str = "default",
                  overrides: Optional[Dict[str, Any]] = None) -> Any:
        """The flavour's args with ``overrides`` applied; unknown names list valid ones."""
        if flavour not in self.flavours:
            raise KeyError(f"model {self.name!r} has no flavour {flavour!r}; flavours: "
                           f"{', '.join(sorted(self.flavours))}")
        overrides = dict(overrides or {})
        valid = {f.name for f in dataclasses.fields(self.args_cls)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise KeyError(f"model.args: unknown key(s) {unknown} for model {self.name!r}; "
                           f"valid keys: {', '.join(sorted(valid))}")
        return dataclasses.replace(self.flavours[flavour], **overrides)

    def args_help(self) -> List[str]:
        """One line per ``[model.args]`` key: type, default-flavour value and the field's
        ``#:`` comment (read from the args dataclasses' source, base classes included), for
        ``python -m trainer --help --model.name=NAME``."""
        docs: Dict[str, str] = {}
        for cls in reversed(self.args_cls.__mro__):
            if not dataclasses.is_dataclass(cls):
                continue
            try:
                lines = inspect.getsource(cls).splitlines()
            except (OSError, TypeError):  # no source (frozen app): keys without comments
                continue
            pending: List[str] = []
            last = ""  # a comment above consecutive fields documents all of them
            for line in lines:
                stripped = line.strip()
                if stripped.startswith("#:"):
                    pending.append(stripped[2:].strip())
                    continue
                m = re.match(r"(\w+)\s*:", stripped)
                last = (" ".join(pending) if pending else last) if m else ""
                if m and last:
                    docs[m.group(1)] = last
                pending = []
        default = self.flavours.get("default")
        out = []
        for f in dataclasses.fields(self.args_cls):
            value = getattr(default, f.name) if default is not None else f.default
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", f.type)
            out.append(f"  --model.args.{f.name} ({kind}, default {value!r}): "
                       f"{docs.get(f.name, '')}".rstrip())
        return out
