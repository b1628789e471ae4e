"""The torchx components build the right job, and reject bad arguments before submitting.

These call the component functions directly (what ``torchx run`` does after parsing); the
scheduler-level checks are in ``tests/integration/test_torchx.py``.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torchx", reason="torchx is an optional extra: pip install -e .[torchx]")

from launch.components import LaunchArgumentError, plan, train  # noqa: E402

CONFIG = "launch/configs/deepfm_synthetic.toml"


def _command(app) -> str:  # type: ignore[no-untyped-def]
    (role,) = app.roles
    assert role.entrypoint == "bash"
    return role.args[-1]


def test_train_runs_torchrun_with_the_config_and_overrides() -> None:
    app = train(CONFIG, "--training.steps=5", "--dist.backend=gloo", nnodes=2, nproc_per_node=4,
                cpu=8, memMB=4096, env={"NCCL_DEBUG": "INFO"}, rdzv_port=29777, max_retries=2)
    (role,) = app.roles
    cmd = _command(app)
    assert cmd.startswith("torchrun --rdzv_backend c10d ")
    assert ":29777 " in cmd and "--nnodes 2 --nproc_per_node 4 " in cmd
    assert cmd.endswith(f"-m trainer --config {CONFIG} --training.steps=5 --dist.backend=gloo")
    assert role.num_replicas == 2 and role.max_retries == 2
    assert (role.resource.cpu, role.resource.gpu, role.resource.memMB) == (8, 0, 4096)
    assert role.env["NCCL_DEBUG"] == "INFO"


def test_single_node_lets_torchrun_pick_the_port() -> None:
    cmd = _command(train(CONFIG, nproc_per_node=2))
    assert "--rdzv_endpoint localhost:0 " in cmd and "--nnodes 1 --nproc_per_node 2 " in cmd


@pytest.mark.parametrize("kwargs,message", [
    (dict(nnodes=0), "--nnodes must be >= 1"),
    (dict(nproc_per_node=0), "--nproc_per_node must be >= 1"),
    (dict(gpu=-1), "--gpu must be >= 0"),
    (dict(gpu=2, nproc_per_node=4), "--nproc_per_node 4 exceeds --gpu 2"),
    (dict(rdzv_port=70000), "--rdzv_port must be a TCP port"),
    (dict(memMB=16), "--memMB must be >= 256"),
])
def test_bad_train_arguments_name_the_argument(kwargs, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(LaunchArgumentError, match=message):
        train(CONFIG, **kwargs)


def test_missing_config_names_the_file_and_the_fix() -> None:
    with pytest.raises(LaunchArgumentError, match="--config: config file nope.toml not found.*"
                                                  "run from the repository root"):
        train("nope.toml")


def test_bad_override_is_caught_before_submitting() -> None:
    with pytest.raises(LaunchArgumentError, match="unknown key 'training.stepz'"):
        train(CONFIG, "--training.stepz=3")
    with pytest.raises(LaunchArgumentError, match="dist.backend"):
        train(CONFIG, "--dist.backend=mpi")


def test_plan_builds_the_planner_command() -> None:
    app = plan(CONFIG, world_size=64, local_world_size=8, compute_device="cuda", hbm_gb=80.0,
               batch_size=2048, out="runs/plan64.json")
    (role,) = app.roles
    assert role.entrypoint == "python" and role.num_replicas == 1
    assert role.args == ["-m", "sharding.plan", "--config", CONFIG, "--world-size", "64",
                         "--local-world-size", "8", "--compute-device", "cuda",
                         "--hbm-gb", "80", "--batch-size", "2048", "--out", "runs/plan64.json"]


@pytest.mark.parametrize("kwargs,message", [
    (dict(world_size=64, local_world_size=7), "--local_world_size 7 must divide --world_size 64"),
    (dict(world_size=0), "--world_size must be >= 1"),
    (dict(world_size=8, compute_device="tpu"), "--compute_device must be one of cuda, cpu"),
    (dict(world_size=8, ddr_gb=-2.0), "--ddr_gb must be >= 0"),
])
def test_bad_plan_arguments_name_the_argument(kwargs, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(LaunchArgumentError, match=message):
        plan(CONFIG, **kwargs)
