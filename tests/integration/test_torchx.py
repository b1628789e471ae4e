"""One config, three launchers: ``torchx run`` locally and as cluster dry runs, vs ``torchrun``.

The local runs train DeepFM for a few steps on the ``tiny`` synthetic preset with 2 CPU ranks
(gloo). ``torchx run -s local_cwd`` must produce the same metrics records as ``torchrun`` of
the same config; the kubernetes and slurm dry runs must carry the same command, the
requested resources and the environment, using the shipped ``launch/torchxconfig.example``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

pytest.importorskip("torchx", reason="torchx is an optional extra: pip install -e .[torchx]")

from sharding.dist import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CONFIG = "launch/configs/deepfm_synthetic.toml"
STEPS = 4
# Values that must agree between launchers; time and throughput legitimately differ.
COMPARED = ("split", "step", "loss", "auc", "ne", "logloss", "oracle_auc", "steps")


def _env(torchxconfig: Path, **extra: str) -> Dict[str, str]:
    env = dict(os.environ)
    # torchx and torchrun start `torchrun` / `python` from PATH: use this interpreter's.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # Pin the torchx config so a developer's ~/.torchxconfig or ./.torchxconfig can't leak in.
    env["TORCHXCONFIG"] = str(torchxconfig)
    env.update(extra)
    return env


def _run(cmd: List[str], env: Dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _torchx(args: List[str], env: Dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "torchx.cli.main", *args], env, timeout)


def _overrides(data: Path, run_dir: Path) -> List[str]:
    return [f"--data.path={data}", "--data.batch_size=256", f"--training.steps={STEPS}",
            "--training.log_every=2", f"--training.run_dir={run_dir}"]


def _records(run_dir: Path) -> List[Dict[str, object]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: r[k] for k in COMPARED if k in r} for r in map(json.loads, lines)]


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7)
    return a == b


def _ok(result: subprocess.CompletedProcess, what: str) -> str:
    out = result.stdout + result.stderr
    assert result.returncode == 0, f"{what} failed (rc {result.returncode}):\n{out[-6000:]}"
    return out


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "tiny"
    subprocess.run([sys.executable, "-m", "data.synth", "ctr", "--out", str(out), "--preset",
                    "tiny"], cwd=REPO, check=True, capture_output=True)
    return out


@pytest.fixture
def empty_torchxconfig(tmp_path: Path) -> Path:
    path = tmp_path / "empty.torchxconfig"
    path.write_text("")
    return path


@pytest.mark.slow
def test_local_cwd_run_writes_the_same_metrics_as_torchrun(tiny_data: Path, tmp_path: Path,
                                                           empty_torchxconfig: Path) -> None:
    env = _env(empty_torchxconfig)
    torchrun_dir, torchx_dir = tmp_path / "torchrun", tmp_path / "torchx"
    torchrun = Path(sys.executable).parent / "torchrun"
    out = _ok(_run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "trainer",
                    "--config", CONFIG, *_overrides(tiny_data, torchrun_dir)], env), "torchrun")
    assert "final auc=" in out

    out = _ok(_torchx(["run", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'torchx_logs'}",
                       "launch/components.py:train", "--nnodes", "1", "--nproc_per_node", "2",
                       "--config", CONFIG, "--", *_overrides(tiny_data, torchx_dir)], env),
              "torchx run -s local_cwd")
    assert "final auc=" in out and "Job finished: SUCCEEDED" in out
    assert "rank 0/2 (local 0/2): device cpu, backend gloo" in out

    expected, got = _records(torchrun_dir), _records(torchx_dir)
    assert [(r["split"], r.get("step")) for r in got] == \
        [("train", 2), ("train", 4), ("final", None)]
    assert len(got) == len(expected)
    for want, have in zip(expected, got):
        assert want.keys() == have.keys()
        assert all(_same(want[k], have[k]) for k in want), (want, have)
    for run_dir in (torchrun_dir, torchx_dir):
        assert (run_dir / "config.toml").is_file() and (run_dir / "train.log").is_file()


@pytest.mark.slow
def test_two_nodes_on_one_host(tiny_data: Path, tmp_path: Path,
                               empty_torchxconfig: Path) -> None:
    run_dir = tmp_path / "run"
    out = _ok(_torchx(["run", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'torchx_logs'}",
                       "launch/components.py:train", "--nnodes", "2", "--nproc_per_node", "1",
                       "--rdzv_port", str(free_port()), "--config", CONFIG, "--",
                       *_overrides(tiny_data, run_dir), "--dist.device=cpu",
                       "--dist.backend=gloo", "--dist.cpu_threads=1"],
                      _env(empty_torchxconfig)), "torchx run --nnodes 2")
    # Each "node" is one torchrun agent with one local rank; c10d rendezvous joined them, and
    # the --dist overrides reached the process-group set-up.
    assert "rank 0/2 (local 0/1): device cpu, backend gloo, 1 intra-op threads" in out
    assert "final auc=" in out
    final = [r for r in _records(run_dir) if r["split"] == "final"]
    assert len(final) == 1 and final[0]["steps"] == STEPS


@pytest.mark.slow
def test_failed_rank_fails_the_job_with_one_line(tmp_path: Path,
                                                 empty_torchxconfig: Path) -> None:
    missing = tmp_path / "no_dataset"
    result = _torchx(["run", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'torchx_logs'}",
                      "launch/components.py:train", "--nproc_per_node", "2", "--config", CONFIG,
                      "--", f"--data.path={missing}", f"--training.run_dir={tmp_path / 'run'}"],
                     _env(empty_torchxconfig))
    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-4000:]
    for rank in (0, 1):
        assert f"rank {rank} failed: SchemaError: {missing} not found" in out, \
            out[-4000:]
    assert "Job finished: FAILED" in out


def _dryrun(scheduler: str, component: List[str], extra_env: Optional[Dict[str, str]] = None
            ) -> str:
    env = _env(REPO / "launch" / "torchxconfig.example", **(extra_env or {}))
    # --workspace "": describe the job on the configured image as is; building a patched
    # image from the working tree would need docker.
    return _ok(_torchx(["run", "--dryrun", "--workspace", "", "-s", scheduler, *component], env),
               f"torchx run --dryrun -s {scheduler}")


CLUSTER_JOB = ["launch/components.py:train", "--nnodes", "2", "--nproc_per_node", "8",
               "--cpu", "16", "--memMB", "65536", "--env", "NCCL_DEBUG=INFO,SHARDREC_TAG=ci",
               "--config", CONFIG, "--", "--training.steps=7"]
TRAINER_CMD = f"-m trainer --config {CONFIG} --training.steps=7"


def test_kubernetes_dryrun_has_command_resources_and_env() -> None:
    pytest.importorskip("kubernetes", reason="torchx's kubernetes scheduler needs the "
                                             "kubernetes client (make setup installs it)")
    spec = _dryrun("kubernetes", CLUSTER_JOB)
    request = spec.split("=== SCHEDULER REQUEST ===", 1)[1]
    flat = " ".join(request.split())  # the YAML folds the long bash -c line
    assert "torchrun --rdzv_backend c10d --rdzv_endpoint ${VC_TRAINER_0_HOSTS:=localhost}:29500" \
        in flat
    assert "--nnodes 2 --nproc_per_node 8" in flat and TRAINER_CMD in flat
    assert "queue: default" in flat  # from launch/torchxconfig.example
    assert "image: registry.example.com/shardrec:latest" in flat
    assert flat.count("cpu: 16000m") == 2 and flat.count("memory: 65536M") == 2
    assert flat.count("nvidia.com/gpu: '8'") == 4  # requests + limits, on both pods
    assert "name: NCCL_DEBUG value: INFO" in flat and "name: SHARDREC_TAG value: ci" in flat


def test_slurm_dryrun_has_command_resources_and_env() -> None:
    spec = _dryrun("slurm", CLUSTER_JOB)
    script = spec.split("=== SCHEDULER REQUEST ===", 1)[1]
    sbatch = [line for line in script.splitlines() if line.startswith("#SBATCH --job-name")]
    assert len(sbatch) == 2  # one heterogeneous group per node
    for line in sbatch:
        assert "--partition=gpu --time=2:00:00" in line
        assert "--cpus-per-task=16 --mem=65536 --gpus-per-task=8" in line
    assert "--rdzv_endpoint ${SLURM_JOB_NODELIST_HET_GROUP_0:=localhost}:29500" in script
    assert "--nnodes 2 --nproc_per_node 8" in script and TRAINER_CMD in script
    assert "--export=ALL,NCCL_DEBUG=INFO,SHARDREC_TAG=ci" in script


def test_plan_dryrun_runs_the_planner_in_one_process() -> None:
    spec = _dryrun("slurm", ["launch/components.py:plan", "--config", CONFIG, "--world_size",
                             "64", "--local_world_size", "8", "--out", "runs/plan64.json"])
    script = spec.split("=== SCHEDULER REQUEST ===", 1)[1]
    assert script.count("#SBATCH --job-name") == 1
    assert ("python -m sharding.plan --config launch/configs/deepfm_synthetic.toml "
            "--world-size 64 --local-world-size 8 --compute-device cuda "
            "--out runs/plan64.json") in script


@pytest.mark.parametrize("args,message", [
    (["--config", "launch/configs/missing.toml"],
     "--config: config file launch/configs/missing.toml not found"),
    (["--config", CONFIG, "--nnodes", "0"], "--nnodes must be >= 1, got 0"),
])
def test_bad_component_arguments_fail_clearly(args: List[str], message: str,
                                              empty_torchxconfig: Path) -> None:
    result = _torchx(["run", "--dryrun", "-s", "local_cwd", "launch/components.py:train", *args],
                     _env(empty_torchxconfig))
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert message in out and "Traceback" not in out, out
