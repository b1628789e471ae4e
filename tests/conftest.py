"""Shared fixtures: small synthetic datasets generated once per test session."""

from __future__ import annotations

import os
import warnings
from typing import Callable

import pytest

from data.synth.ctr import PRESETS, CTRSynthArgs, generate_ctr
from data.synth.ctr2 import MultiTaskSynthArgs, ctr2_preset, generate_ctr2
from data.synth.next_item import NEXT_ITEM_PRESETS, NextItemSynthArgs, generate_next_item
from data.synth.ctr_seq import SEQ_PRESETS, SeqCTRSynthArgs, generate_ctr_seq

warnings.filterwarnings("ignore", category=DeprecationWarning)


def _generated(factory: pytest.TempPathFactory, name: str, generate: Callable[..., object],
               args: object) -> str:
    out = str(factory.mktemp("data") / name)
    generate(out, args, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_ctr(tmp_path_factory: pytest.TempPathFactory) -> str:
    """4k-row CTR dataset (4 sparse features, one multi-hot with empty rows, 4 dense)."""
    return _generated(tmp_path_factory, "tiny_ctr", generate_ctr,
                      CTRSynthArgs(**PRESETS["tiny"]))  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def ci_ctr(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The CI-sized CTR dataset used by the learning tests."""
    return _generated(tmp_path_factory, "ci_ctr", generate_ctr,
                      CTRSynthArgs(**PRESETS["ci"]))  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def tiny_seq(tmp_path_factory: pytest.TempPathFactory) -> str:
    """2k-row CTR dataset with behaviour sequences (max_len 8, empty ones included)."""
    return _generated(tmp_path_factory, "tiny_seq", generate_ctr_seq,
                      SeqCTRSynthArgs(**SEQ_PRESETS["tiny"]))  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def ci_seq(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The CI-sized sequence-signal CTR dataset (``data.synth ctr_seq --preset ci``)."""
    return _generated(tmp_path_factory, "ci_seq", generate_ctr_seq,
                      SeqCTRSynthArgs(**SEQ_PRESETS["ci"]))  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def tiny_nextitem(tmp_path_factory: pytest.TempPathFactory) -> str:
    """256-user next-item dataset (``data.synth seq --preset tiny``, timestamps, max_len 10)."""
    return _generated(tmp_path_factory, "tiny_nextitem", generate_next_item,
                      NextItemSynthArgs(**NEXT_ITEM_PRESETS["tiny"]))  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def ci_nextitem(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The CI-sized next-item dataset (``data.synth seq --preset ci``)."""
    return _generated(tmp_path_factory, "ci_nextitem", generate_next_item,
                      NextItemSynthArgs(**NEXT_ITEM_PRESETS["ci"]))  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def tiny_ctr2(tmp_path_factory: pytest.TempPathFactory) -> str:
    """4k-row two-task dataset (click, conversion, eval-only would_convert)."""
    return _generated(tmp_path_factory, "tiny_ctr2", generate_ctr2,
                      MultiTaskSynthArgs(**ctr2_preset("tiny")))  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def ci_ctr2(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The CI-sized two-task dataset (``data.synth ctr2 --preset ci``)."""
    return _generated(tmp_path_factory, "ci_ctr2", generate_ctr2,
                      MultiTaskSynthArgs(**ctr2_preset("ci")))  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def esmm_ctr2(tmp_path_factory: pytest.TempPathFactory) -> str:
    """ESMM's data-sparsity setting (``data.synth ctr2 --preset esmm_ci``)."""
    return _generated(tmp_path_factory, "esmm_ctr2", generate_ctr2,
                      MultiTaskSynthArgs(**ctr2_preset("esmm_ci")))  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Checkout entries a test must never see through the working directory: what `make demo`
# and training runs leave behind (a fresh CI clone has neither).
CHECKOUT_STATE = frozenset({"datasets", "runs", ".git"})


@pytest.fixture(autouse=True)
def isolated_cwd(tmp_path_factory: pytest.TempPathFactory, repo_root: str,
                 monkeypatch: pytest.MonkeyPatch) -> str:
    """Run every test in a fresh directory that mirrors the checkout through symlinks minus
    ``datasets/`` and ``runs/``: relative paths such as ``launch/configs/x.toml`` and
    ``python -m trainer`` still resolve, while the default ``data.path`` and ``run_dir`` point
    at nothing (as in a fresh clone) and anything a test writes there stays out of the checkout."""
    cwd = tmp_path_factory.mktemp("cwd")
    for name in os.listdir(repo_root):
        if name not in CHECKOUT_STATE and not name.startswith(".pytest_cache"):
            os.symlink(os.path.join(repo_root, name), cwd / name)
    monkeypatch.chdir(cwd)
    return str(cwd)
