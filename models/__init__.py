"""Model registry: ``get_model_spec(name)`` → :class:`models.spec.ModelSpec`.

Models are imported lazily so that ``python -m trainer --help`` and the config validator do
not pay for every model's imports. Nothing under ``models/`` imports distributed code: models
receive unsharded embedding modules built on the meta device and ``sharding/`` wraps them.
"""

from __future__ import annotations

import importlib
from typing import Dict, List

from models.spec import ModelSpec

# name → module that defines ``MODEL_SPEC``
_MODEL_MODULES: Dict[str, str] = {
    "autoint": "models.autoint",
    "dcn": "models.dcn",
    "dcn_v2": "models.dcn_v2",
    "deepfm": "models.deepfm",
    "dien": "models.dien",
    "din": "models.din",
    "esmm": "models.multitask.esmm",
    "hstu": "models.hstu.model",
    "interformer": "models.interformer",
    "masknet": "models.masknet",
    "mind": "models.mind",
    "mmoe": "models.multitask.mmoe",
    "ple": "models.multitask.ple",
    "poso": "models.multitask.poso",
    "sasrec": "models.sasrec",
    "shared_bottom": "models.multitask.shared_bottom",
    "two_tower": "models.two_tower",
    "wide_deep": "models.wide_deep",
    "xdeepfm": "models.xdeepfm",
}


def list_models() -> List[str]:
    return sorted(_MODEL_MODULES)


def get_model_spec(name: str) -> ModelSpec:
    """The registered spec for ``name``; unknown names list the known ones."""
    if name not in _MODEL_MODULES:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    spec = importlib.import_module(_MODEL_MODULES[name]).MODEL_SPEC
    assert spec.name == name, f"{_MODEL_MODULES[name]}.MODEL_SPEC is named {spec.name!r}"
    return spec


__all__ = ["ModelSpec", "get_model_spec", "list_models"]
