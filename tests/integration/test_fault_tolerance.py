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
    assert sorted(os.listdir(out)) == [".shardrec-export", "config.toml", "export.json", "model.pt",
                                       "schema.json"]
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


def _flip_tensor_bytes(checkpoint: str) -> str:
    """Flip 16 bytes in the middle of the largest ``.distcp`` (inside a tensor's data)."""
    shard = max((os.path.join(checkpoint, n) for n in os.listdir(checkpoint)
                 if n.endswith(".distcp")), key=os.path.getsize)
    with open(shard, "r+b") as fh:
        fh.seek(os.path.getsize(shard) // 2)
        chunk = fh.read(16)
        fh.seek(-16, os.SEEK_CUR)
        fh.write(bytes(b ^ 0xFF for b in chunk))
    return shard


def _plant_payload(checkpoint: str, sentinel: str) -> None:
    """A ``.metadata`` whose unpickling runs ``touch sentinel``; the manifest is rewritten to
    match, as an attacker who can write the directory would do."""
    import pickle

    from trainer.checkpoint import MANIFEST, checksum_entries, write_manifest

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, (f"touch {sentinel}",))

    with open(os.path.join(checkpoint, ".metadata"), "wb") as fh:
        pickle.dump({"storage_data": Payload()}, fh)
    write_manifest(checkpoint, checksum_entries(checkpoint, sorted(
        n for n in os.listdir(checkpoint) if n not in (MANIFEST, "COMPLETE"))))


def test_preemption_corruption_nonfinite_and_busy_run_dir(repo_root: str, tiny_ctr: str,
                                                          straight_run: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The issue's fault drills in one run dir, three 2-rank launches:

    1. SIGTERM to torchrun after step 11 (``fail_at=sigterm:11``; torchrun forwards it): every
       rank finishes the steps in flight, they agree, save and exit 75; a rerun resumes there
       and ends exactly like the uninterrupted run, with one metrics record per step.
    2. 16 bytes flipped in a tensor of the newest checkpoint and a crafted ``.metadata`` in
       the one before: ``trainer.export`` refuses the crafted one and its payload never runs;
       a rerun (lr 1e8, fresh optimizer, 40 steps) skips both, naming the file and the
       refused type, and falls back to the preemption checkpoint; then the loss goes
       non-finite and the run stops with exit 3 naming step, rank and that checkpoint, writing
       no checkpoint and removing none.
    3. A second run on a run dir another run holds fails at start naming the holder.
    """
    import json
    import shutil

    run_dir = str(tmp_path / "drills")
    ckpts = os.path.join(run_dir, "checkpoints")
    args = _args(tiny_ctr, run_dir, "--training.fail_at=sigterm:11")
    proc = run_trainer(repo_root, 2, args)
    log = proc.stderr + proc.stdout
    assert proc.returncode != 0
    assert "fault injection: SIGTERM to the launcher at step 11" in log
    m = re.search(r"rank 0 preempted: stopped by SIGTERM after step (\d+)", log)
    assert m, log[-3000:]
    stop = int(m.group(1))
    assert "rank 1 preempted" in log
    # The signalling rank waits for the forwarded SIGTERM, so the ranks agree at step 11 and
    # finish the 2 batches the pipeline already holds.
    assert stop == 13
    assert [s for s, _ in list_complete(ckpts)] == [8, stop]
    # Both workers exited with the documented code (torchrun itself then dies of the signal).
    assert "exitcode: -" not in log and "SIGKILL" not in log

    proc = run_trainer(repo_root, 2, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming at step {stop}" in proc.stderr + proc.stdout
    _assert_same_run(straight_run, run_dir, tmp_path)
    logged = [r["step"] for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl")))
              if r.get("split") == "train"]
    assert logged == sorted(set(logged)) and logged[-1] == STEPS  # no step twice

    # 2. Damage the two newest checkpoints; export refuses the crafted one.
    done = [p for _, p in list_complete(ckpts)]
    assert [os.path.basename(p) for p in done] == [f"step_{stop:08d}", "step_00000016",
                                                   "step_00000024"]
    shard = _flip_tensor_bytes(done[2])
    sentinel = str(tmp_path / "payload_ran")
    _plant_payload(done[1], sentinel)
    crafted = str(tmp_path / "crafted" / "step_00000016")
    shutil.copytree(done[1], crafted)
    export_out = str(tmp_path / "export")
    exp = subprocess.run([sys.executable, "-m", "trainer.export", "--checkpoint", crafted,
                          "--out", export_out], cwd=repo_root, capture_output=True, text=True,
                         timeout=300)
    assert exp.returncode == 2, exp.stderr[-3000:]
    assert f"{crafted}/.metadata: refused to load type posix.system" in exp.stderr
    assert not os.path.exists(export_out) and not os.path.exists(sentinel)

    before = {p: sorted(os.listdir(p)) + [open(os.path.join(p, "manifest.json")).read()]
              for p in done}
    proc = run_trainer(repo_root, 2, _args(
        tiny_ctr, run_dir, "--training.steps=40", "--training.dense_lr=1e8",
        "--training.sparse_lr=1e8", "--checkpoint.reset_optimizer=true"))
    log = proc.stderr + proc.stdout
    assert proc.returncode != 0
    assert f"skipping checkpoint {done[2]}: {shard}: checksum mismatch" in log
    assert (f"skipping checkpoint {done[1]}: {done[1]}/.metadata: refused to load type "
            "posix.system") in log
    assert f"resuming at step {stop}" in log
    assert not os.path.exists(sentinel)
    assert "(exitcode: 3)" in log
    m = re.search(r"non-finite loss \(NaN or inf\) at step (\d+) on rank (\d)", log)
    assert m and stop < int(m.group(1)) <= 40, log[-3000:]
    assert f"the last good checkpoint is {done[0]}" in log
    after = {p: sorted(os.listdir(p)) + [open(os.path.join(p, "manifest.json")).read()]
             for _, p in list_complete(ckpts)}
    assert after == before  # no new checkpoint, none removed or rewritten
    assert not [n for n in os.listdir(ckpts) if n.startswith(".tmp")]

    # 3. A run dir another run holds: refused at start, naming the holder.
    env = {**os.environ, "PYTHONPATH": repo_root}
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from trainer.runlock import RunLock; RunLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(120)"), run_dir], cwd=repo_root,
        stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        busy = subprocess.run([sys.executable, "-m", "trainer", *_args(tiny_ctr, run_dir)],
                              cwd=repo_root, capture_output=True, text=True, timeout=300,
                              env=env)
    finally:
        holder.kill()
        holder.wait()
    assert busy.returncode == 1
    assert re.search(rf"run dir {re.escape(run_dir)} is in use by another run \(host \S+, pid "
                     rf"{holder.pid}, started \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC",
                     busy.stderr), busy.stderr[-3000:]
