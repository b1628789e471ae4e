"""Tests never read the checkout's ``datasets/`` or ``runs/`` (the conftest's ``isolated_cwd``).

`make demo` writes ``datasets/synthetic_ctr_demo``, the default ``data.path``; a config test that
validated against it passed in a fresh CI clone and failed on a user's machine after the
README's own `make demo`. Here a demo-shaped dataset sits at the default path of the test's
working directory and the config tests that used to read it still pass.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tests.unit import test_config, test_sharding_config
from trainer.config import DataConfig, TrainingConfig


def test_cwd_is_a_mirror_without_checkout_state(repo_root: str) -> None:
    cwd = os.getcwd()
    assert os.path.realpath(cwd) != os.path.realpath(repo_root)
    assert os.path.isfile("launch/configs/deepfm_synthetic.toml")  # relative paths resolve
    assert not os.path.exists("datasets") and not os.path.exists("runs")
    assert not os.path.exists(DataConfig().path) and not os.path.exists(TrainingConfig().run_dir)


def test_config_tests_pass_with_a_demo_dataset_at_the_default_path(tiny_ctr: str,
                                                                   tmp_path: Path) -> None:
    shutil.copytree(tiny_ctr, DataConfig().path)
    assert os.path.isfile(os.path.join(DataConfig().path, "schema.json"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    test_config.test_resolved_config_round_trips(tmp_path / "a")
    test_sharding_config.test_per_table_toml_parses_and_round_trips(tmp_path / "b")
