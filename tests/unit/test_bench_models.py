"""bench.models builds the trainer's real command lines and rejects unknown models."""

from __future__ import annotations

import os

import pytest

from bench.models import CONFIGS, MODELS, main, train_command
from models import list_models


def test_every_ctr_model_has_a_config_and_a_command(repo_root: str) -> None:
    assert set(MODELS) <= set(list_models())
    for m in MODELS:
        assert os.path.exists(os.path.join(repo_root, CONFIGS[m])), m
    one = train_command("interformer", 1, "/d", 7, 64, "/r")
    two = train_command("interformer", 2, "/d", 7, 64, "/r")
    assert one[1:3] == ["-m", "trainer"] and "--training.steps=7" in one
    assert os.path.basename(two[0]) == "torchrun" and "--nproc_per_node=2" in two
    assert "--data.path=/d" in two and "--checkpoint.save_at_end=false" in two


def test_unknown_model_is_named() -> None:
    with pytest.raises(SystemExit):
        main(["--models", "deepfm,wide_and_deep"])
