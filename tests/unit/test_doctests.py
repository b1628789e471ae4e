"""The shaped examples in module docstrings run and give what they print."""

from __future__ import annotations

import doctest
import importlib

import pytest


@pytest.mark.parametrize("module", ["data.io", "data.metrics", "data.synth.common", "models.hstu.jagged"])
def test_module_examples(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0, f"{module} has no examples"
    assert result.failed == 0
