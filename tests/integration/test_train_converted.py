"""2 gloo ranks train DeepFM under torchrun from datasets made by ``data.convert``: a
Criteo-format TSV and a MovieLens-1M-format ratings/movies/users set, both with a planted
signal, so the eval AUC must clear chance by a margin."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Dict, List

import numpy as np
import pytest

from data.convert.__main__ import main as convert_main
from tests.integration.runner import parse_final

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def train(data: str, run_dir: str, extra: List[str]) -> Dict[str, float]:
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "trainer",
         "--config", "launch/configs/deepfm_synthetic.toml", f"--data.path={data}",
         f"--training.run_dir={run_dir}", "--training.log_every=50", *extra],
        cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return parse_final(proc.stdout)


def write_criteo(path: str, rows: int, seed: int = 0) -> None:
    """Criteo TSV whose click logit is a sum of per-value weights of the first three
    categoricals (10 values each) plus the first integer column; the other 23 categoricals
    are noise; 10% of integers are missing."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(0, 1.5, (3, 10))
    cats = rng.integers(0, 40, (rows, 26))
    cats[:, :3] %= 10
    ints = rng.poisson(3, (rows, 13))
    logit = weights[np.arange(3), cats[:, :3]].sum(1) + 0.2 * ints[:, 0] - 1.0
    labels = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(int)
    missing = rng.random((rows, 13)) < 0.1
    with open(path, "w") as fh:
        for i in range(rows):
            ints_txt = ["" if missing[i, j] else str(ints[i, j]) for j in range(13)]
            cats_txt = [f"{(int(c) * 2654435761 + j) & 0xFFFFFFFF:08x}" for j, c in enumerate(cats[i])]
            fh.write("\t".join([str(labels[i]), *ints_txt, *cats_txt]) + "\n")


def write_movielens_1m(d: str, users: int = 250, movies: int = 150, seed: int = 0) -> None:
    """ML-1M layout; a movie's ratings follow its hidden quality, so item ids predict
    rating >= 4."""
    rng = np.random.default_rng(seed)
    genres = ["Action", "Comedy", "Drama", "Horror", "Romance"]
    with open(os.path.join(d, "movies.dat"), "w") as fh:
        for m in range(1, movies + 1):
            g = rng.choice(genres, size=int(rng.integers(1, 3)), replace=False)
            fh.write(f"{m}::Movie {m}: Part {m % 3} (1999)::{'|'.join(g)}\n")
    with open(os.path.join(d, "users.dat"), "w") as fh:
        for u in range(1, users + 1):
            fh.write(f"{u}::{'MF'[u % 2]}::{[1, 18, 25, 35][u % 4]}::{u % 20}::{10000 + u}\n")
    quality = rng.normal(0, 1, movies + 1)
    with open(os.path.join(d, "ratings.dat"), "w") as fh:
        for u in range(1, users + 1):
            items = rng.choice(np.arange(1, movies + 1), size=int(rng.integers(5, 60)),
                               replace=False)
            times = 978300000 + np.sort(rng.integers(0, 10 ** 6, items.size))
            for m, t in zip(items, times):
                r = int(np.clip(np.rint(3 + quality[m] + rng.normal(0, 0.7)), 1, 5))
                fh.write(f"{u}::{m}::{r}::{t}\n")


def test_two_ranks_train_from_converted_criteo(tmp_path) -> None:
    tsv = str(tmp_path / "day_0")
    write_criteo(tsv, 16_000)
    data = str(tmp_path / "criteo")
    assert convert_main(["criteo", tsv, "--out", data, "--num-embeddings", "1000",
                         "--row-group-rows", "256", "--no-progress"]) == 0
    # Small batches: DeepFM's FM term over 26 freshly initialised fields needs a couple of
    # hundred steps before its initial noise fades.
    final = train(data, str(tmp_path / "run"), ["--data.batch_size=64",
                                                "--training.epochs=2"])
    assert final["auc"] > 0.65, final


def test_two_ranks_train_from_converted_movielens(tmp_path) -> None:
    d = tmp_path / "ml-1m"
    d.mkdir()
    write_movielens_1m(str(d))
    data = str(tmp_path / "ml")
    assert convert_main(["movielens", str(d / "ratings.dat"), str(d / "movies.dat"),
                         str(d / "users.dat"), "--task", "ctr", "--embedding-dim", "16",
                         "--out", data, "--row-group-rows", "128", "--no-progress"]) == 0
    final = train(data, str(tmp_path / "run"), ["--data.batch_size=64",
                                                "--data.eval_batch_size=32",
                                                "--training.epochs=2"])
    assert final["auc"] > 0.7, final
