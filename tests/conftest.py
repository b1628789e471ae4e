"""Shared fixtures: small synthetic datasets generated once per test session."""

from __future__ import annotations

import os
import warnings

import pytest

from data.synth import PRESETS, CTRSynthArgs, generate_ctr
from data.synth_seq import SEQ_PRESETS, SeqCTRSynthArgs, generate_ctr_seq

warnings.filterwarnings("ignore", category=DeprecationWarning)


@pytest.fixture(scope="session")
def tiny_ctr(tmp_path_factory: pytest.TempPathFactory) -> str:
    """4k-row CTR dataset (4 sparse features, one multi-hot with empty rows, 4 dense)."""
    out = str(tmp_path_factory.mktemp("data") / "tiny_ctr")
    generate_ctr(out, CTRSynthArgs(**PRESETS["tiny"]), progress=False)  # type: ignore[arg-type]
    return out


@pytest.fixture(scope="session")
def ci_ctr(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The CI-sized CTR dataset used by the learning tests."""
    out = str(tmp_path_factory.mktemp("data") / "ci_ctr")
    generate_ctr(out, CTRSynthArgs(**PRESETS["ci"]), progress=False)  # type: ignore[arg-type]
    return out


@pytest.fixture(scope="session")
def tiny_seq(tmp_path_factory: pytest.TempPathFactory) -> str:
    """2k-row CTR dataset with behaviour sequences (max_len 8, empty ones included)."""
    out = str(tmp_path_factory.mktemp("data") / "tiny_seq")
    generate_ctr_seq(out, SeqCTRSynthArgs(**SEQ_PRESETS["tiny"]), progress=False)  # type: ignore[arg-type]
    return out


@pytest.fixture(scope="session")
def ci_seq(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The CI-sized sequence-signal CTR dataset (``data.synth ctr_seq --preset ci``)."""
    out = str(tmp_path_factory.mktemp("data") / "ci_seq")
    generate_ctr_seq(out, SeqCTRSynthArgs(**SEQ_PRESETS["ci"]), progress=False)  # type: ignore[arg-type]
    return out


@pytest.fixture(scope="session")
def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
