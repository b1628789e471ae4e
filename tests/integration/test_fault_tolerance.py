"""Fault tolerance under torchrun on 2 gloo ranks: a killed run resumes exactly, a kill during
a checkpoint write loses nothing, ``torchrun --max-restarts`` recovers without a rerun, and
checkpoints reshard between world sizes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Dict, List

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.integration.runner import parse_final, run_trainer
from trainer.checkpoint import find_latest, list_complete

pytestmark = pytest.mark.slow

STEPS = 24


def _args(data: str, run_dir: str, *extra: str) -> List[str]:
    return ["--config", "launch/configs/deepfm_synthetic.toml", f"--data.path={data}",
            "--data.batch_size=64", f"--training.steps={STEPS}", "--training.log_every=4",
            "--checkpoint.every_steps=8", "--metrics.record_sample_ids=true",
            "--model.flavour=small", f"--training.run_dir={run_dir}", *extra]


def _sample_ids(run_dir: str, rank: int) -> Dict[int, str]:
    """step → ids; a step handed out again after a resume keeps its last record."""
    out: Dict[int, str] = {}
    for line in open(os.path.join(run_dir, f"sample_ids.rank{rank}.txt")):
        step, ids = line.split()
        out[int(step)] = ids
    return {s: ids for s, ids in out.items() if s <= STEPS}


def _final_weights(run_dir: str, tmp_path) -> Dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    path = find_latest(os.path.join(run_dir, "checkpoints"))
    assert path is not None and path.endswith(f"step_{STEPS:08d}")
    out = tmp_path / (os.path.basename(run_dir) + ".pt")
    dcp_to_torch_save(path, out)
    return torch.load(out, weights_only=True)["model"]


@pytest.fixture(scope="module")
def straight_run(repo_root: str, tiny_ctr: str, tmp_path_factory) -> str:  # type: ignore[no-untyped-def]
    run_dir = str(tmp_path_factory.mktemp("ft") / "straight")
    proc = run_trainer(repo_root, 2, _args(tiny_ctr, run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def _assert_same_run(a: str, b: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    for rank in (0, 1):
        ids_a, ids_b = _sample_ids(a, rank), _sample_ids(b, rank)
        assert sorted(ids_a) == list(range(1, STEPS + 1))
        assert ids_a == ids_b, f"rank {rank} consumed different samples"
    wa, wb = _final_weights(a, tmp_path), _final_weights(b, tmp_path)
    assert wa.keys() == wb.keys() and len(wa) > 5
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)


def test_killed_rank_then_resume_equals_straight_run(repo_root: str, tiny_ctr: str,
                                                      straight_run: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    run_dir = str(tmp_path / "killed")
    proc = run_trainer(repo_root, 2, _args(tiny_ctr, run_dir, "--training.fail_at=step:13",
                                           "--training.fail_rank=1"))
    assert proc.returncode != 0  # rank 1 was SIGKILLed, torchrun tore the job down
    assert [s for s, _ in list_complete(os.path.join(run_dir, "checkpoints"))] == [8]
    proc = run_trainer(repo_root, 2, _args(tiny_ctr, run_dir, "--training.fail_at=step:13",
                                           "--training.fail_rank=1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming at step 8" in proc.stderr + proc.stdout
    _assert_same_run(straight_run, run_dir, tmp_path)


def test_kill_during_checkpoint_write_keeps_previous(repo_root: str, tiny_ctr: str,
                                                     straight_run: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Rank 0 dies while writing step 16: the half-written checkpoint is never used; the
    relaunched job resumes from step 8 and ends exactly like the uninterrupted run."""
    run_dir = str(tmp_path / "in_save")
    args = _args(tiny_ctr, run_dir, "--training.fail_at=save:16", "--training.fail_rank=0",
                 "--dist.timeout_s=120")
    proc = run_trainer(repo_root, 2, args)
    assert proc.returncode != 0
    ckpts = os.path.join(run_dir, "checkpoints")
    assert [s for s, _ in list_complete(ckpts)] == [8]
    assert [n for n in os.listdir(ckpts) if n.startswith(".tmp-step_00000016")]
    proc = run_trainer(repo_root, 2, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming at step 8" in proc.stderr + proc.stdout
    assert parse_final(proc.stdout)["steps"] == STEPS
    assert not [n for n in os.listdir(ckpts) if n.startswith(".tmp")]
    _assert_same_run(straight_run, run_dir, tmp_path)


def test_torchrun_max_restarts_recovers_on_its_own(repo_root: str, tiny_ctr: str,
                                                   straight_run: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``torchrun --max-restarts 1``: rank 0 is SIGKILLed while writing step 16, the elastic
    agent restarts the group, which resumes from step 8 and ends like the uninterrupted run,
    with no rerun by hand. Regression test for the restarted group reading the killed
    attempt's gloo addresses from the agent's store (connectFullMesh refused, or a hang)."""
    run_dir = str(tmp_path / "elastic")
    proc = run_trainer(repo_root, 2, _args(tiny_ctr, run_dir, "--training.fail_at=save:16",
                                           "--training.fail_rank=0", "--dist.timeout_s=120"),
                       timeout=420, extra_torchrun=["--max-restarts=1"])
    log = proc.stderr + proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fault injection: killing rank 0 at save:16" in log
    assert "torchelastic restart 1 of at most 1" in log
    assert "resuming at step 8" in log
    assert parse_final(proc.stdout)["steps"] == STEPS
    ckpts = os.path.join(run_dir, "checkpoints")
    assert list_complete(ckpts)[-1][0] == STEPS
    assert not [n for n in os.listdir(ckpts) if n.startswith(".tmp")]
    _assert_same_run(straight_run, run_dir, tmp_path)


@pytest.mark.parametrize("train_ranks,resume_ranks", [(2, 1), (1, 2)])
def test_resume_into_another_world_size(repo_root: str, tiny_ctr: str, tmp_path,
                                        train_ranks: int, resume_ranks: int) -> None:  # type: ignore[no-untyped-def]
    run_dir = str(tmp_path / "a")
    base = ["--data.eval_batch_size=256", "--checkpoint.every_steps=0"]
    proc = run_trainer(repo_root, train_ranks, _args(tiny_ctr, run_dir, *base))
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = parse_final(proc.stdout)
    ckpt = find_latest(os.path.join(run_dir, "checkpoints"))
    # Same step count: nothing left to train, so the final eval scores the loaded state.
    proc = run_trainer(repo_root, resume_ranks, _args(
        tiny_ctr, str(tmp_path / "b"), *base, f"--checkpoint.resume_from={ckpt}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = parse_final(proc.stdout)
    assert re.search(r"written by \d ranks, resuming on \d", proc.stderr)
    assert second["auc"] == pytest.approx(first["auc"], abs=1e-6)
    assert second["logloss"] == pytest.approx(first["logloss"], abs=1e-6)


def test_export_then_predict_matches_sharded_model(repo_root: str, tiny_ctr: str,
                                                   tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The exported unsharded model scores the eval split exactly as the sharded model did
    (the eval batch covers every eval row on 2 ranks, so the final line is over the same
    rows)."""
    run_dir = str(tmp_path / "run")
    proc = run_trainer(repo_root, 2, _args(tiny_ctr, run_dir, "--data.eval_batch_size=256"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = parse_final(proc.stdout)
    ckpt = find_latest(os.path.join(run_dir, "checkpoints"))
    out = str(tmp_path / "export")
    exp = subprocess.run([sys.executable, "-m", "trainer.export", "--checkpoint", ckpt,
                          "--out", out, "--format", "weights"], cwd=repo_root,
                         capture_output=True, text=True,
                         timeout=300)
    assert exp.returncode == 0, exp.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["config.toml", "export.json", "model.pt", "schema.json"]
    pred = subprocess.run([sys.executable, "-m", "trainer.predict", "--model", out, "--data",
                           tiny_ctr, "--out", str(tmp_path / "scores.parquet")],
                          cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert pred.returncode == 0, pred.stderr[-3000:]
    single = parse_final(pred.stdout)
    assert single["rows"] == 1024
    assert single["auc"] == pytest.approx(sharded["auc"], abs=1e-5)
    assert single["logloss"] == pytest.approx(sharded["logloss"], abs=1e-5)
    # Inference needs no distributed code: the predict module imports none of it.
    import ast
    tree = ast.parse(open(os.path.join(repo_root, "trainer", "predict.py")).read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m and ("distributed" in m or m.startswith("sharding"))}
