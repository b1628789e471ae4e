"""The wheel a user installs: built from the sources, installed into a fresh venv, and run
from outside the repository by its console script with a built-in config by name."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from tests.integration.runner import parse_final

SOURCES = ("trainer", "models", "sharding", "data", "launch", "bench", "setup.cfg",
           "pyproject.toml", "README.md")


@pytest.mark.slow
def test_wheel_installs_and_trains_from_outside_the_repo(repo_root: str, tiny_ctr: str,
                                                         tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Build from a copy, so setuptools' build/ and egg-info never land in the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        path = os.path.join(repo_root, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    # No network and seconds, not minutes: no build isolation, no dependencies.
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, env=env,
                   capture_output=True, text=True)
    (wheel,) = (tmp_path / "dist").glob("shardrec-*.whl")

    # A fresh venv that sees the already-installed stack (torch, torchrec, ...) through a
    # .pth line, and gets shardrec itself only from the wheel.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site,) = (venv / "lib").glob("python*/site-packages")
    (site / "_stack.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([*pip, "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, env=env,
                   capture_output=True, text=True)

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import launch, trainer; print(trainer.__file__)"],
                           cwd=outside, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(site)), where.stdout
    proc = subprocess.run([str(venv / "bin" / "shardrec-train"), "--config", "deepfm_synthetic",
                           "--training.steps=5", f"--data.path={tiny_ctr}",
                           "--data.batch_size=256", "--training.run_dir=run"],
                          cwd=outside, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    final = parse_final(proc.stdout)
    assert final["steps"] == 5 and 0.5 < final["auc"] <= 1.0
    assert (outside / "run" / "metrics.jsonl").is_file()
    assert list((outside / "run" / "tb").glob("events.out.tfevents.*"))
