"""torchx components: the trainer and the sharding planner as scheduler-agnostic jobs.

``train`` wraps :func:`torchx.components.dist.ddp`, so every scheduler runs the command a
user would type on one box — ``torchrun ... -m trainer --config C [overrides]`` — with
torchrun's c10d rendezvous joining the nodes. ``plan`` runs ``python -m sharding.plan`` as a
single process. Both check their arguments, the config file and the overrides here, on the
submitting machine, so a typo fails in a second instead of after a cluster queue wait.

Run from the repository root (paths are relative to it, locally and inside the image)::

    torchx run -s local_cwd launch/components.py:train --nnodes 1 --nproc_per_node 2 \\
        --config launch/configs/deepfm_synthetic.toml -- --training.steps=100
    torchx run -s kubernetes launch/components.py:train --nnodes 2 --nproc_per_node 8 \\
        --gpu 8 --image REGISTRY/shardrec:latest --config launch/configs/deepfm_synthetic.toml
    torchx run -s local_cwd launch/components.py:plan \\
        --config launch/configs/deepfm_synthetic.toml --world_size 64 --local_world_size 8

torchx reads the signature and docstring of each component for its ``--help`` and argument
parsing, so annotations must stay plain ``int`` / ``str`` / ``float`` / ``Optional`` /
``List`` / ``Dict`` and this module must not use postponed (string) annotations.
"""

import logging
import os
import sys
from typing import Dict, List, Optional, Sequence

import torchx.specs as specs
from torchx.components.dist import ddp
from torchx.specs.finder import ComponentValidationException

# torchx exec()s this file's source inside its own module (``__file__`` is torchx's, not
# ours), from the directory it was started in. That directory is what the job runs: local_cwd
# starts the ranks there and cluster schedulers ship it as the workspace. So the config checks
# below import the trainer from there, not from whatever copy happens to be installed.
# (The exec also puts this file's top-level names into torchx's finder module: don't define
# one that shadows a finder name, such as ``validate``.)
_JOB_ROOT = os.getcwd()
if _JOB_ROOT not in sys.path:
    sys.path.insert(0, _JOB_ROOT)

DEFAULT_IMAGE = "shardrec:latest"
"""Container image for cluster schedulers (ignored by ``local_cwd``, which runs in the cwd)."""

COMPUTE_DEVICES = ("cuda", "cpu")


class LaunchArgumentError(ComponentValidationException, ValueError):
    """A component argument is wrong; the message names it and the fix.

    Subclassing torchx's ``ComponentValidationException`` makes ``torchx run`` print the
    message and exit 1 instead of dumping a traceback.
    """


def _check_positive(name: str, value: float, minimum: float = 1) -> None:
    if value < minimum:
        raise LaunchArgumentError(f"--{name} must be >= {minimum:g}, got {value:g}")


def _check_config(config: str, overrides: Sequence[str]) -> None:
    """Load the config with its overrides exactly as the trainer will, or raise."""
    builtin = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
    if not os.path.isfile(config) and not (
            "/" not in config
            and os.path.isfile(os.path.join(builtin, config.removesuffix(".toml") + ".toml"))):
        raise LaunchArgumentError(
            f"--config: config file {config} not found (paths are relative to the directory "
            f"torchx runs in, {os.getcwd()}; run from the repository root, e.g. "
            f"--config launch/configs/deepfm_synthetic.toml, or name a built-in config, "
            f"e.g. --config deepfm_synthetic)")
    # Checking model arguments imports torchrec and fbgemm, which announce every library they
    # load at INFO on the root logger that the torchx CLI has configured: keep that noise out.
    root = logging.getLogger()
    previous_level = root.level
    root.setLevel(max(previous_level, logging.WARNING))
    try:
        from trainer.config import ConfigError
        from trainer.validation import load_checked_config

        load_checked_config(config, list(overrides))
    except ConfigError as e:
        raise LaunchArgumentError(
            f"--config {config} with overrides {list(overrides)} is invalid: {e}\n"
            f"(overrides go after `--`, as --section.key=value; "
            f"`python -m trainer --help` lists every key)") from None
    finally:
        root.setLevel(previous_level)


def train(
    config: str,
    *overrides: str,
    nnodes: int = 1,
    nproc_per_node: int = 1,
    gpu: int = 0,
    cpu: int = 4,
    memMB: int = 16384,
    h: Optional[str] = None,
    image: str = DEFAULT_IMAGE,
    name: str = "shardrec",
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Train a model with the shardrec trainer on nnodes x nproc_per_node ranks.

    Runs ``torchrun --nnodes N --nproc_per_node P -m trainer --config CONFIG [overrides]`` on
    every node, the same job as a plain ``torchrun`` on one box. Device and backend are chosen
    per rank (CUDA: nccl on cuda:LOCAL_RANK; else gloo on CPU, cores split across local
    ranks). Put trainer overrides after ``--``.

    Args:
        config: run config TOML, relative to the repository root (the job's working
            directory locally and in the image), e.g. launch/configs/deepfm_synthetic.toml
        overrides: trainer config overrides, --section.key=value (after ``--``), e.g.
            -- --training.steps=1000 --data.path=/data/ctr
        nnodes: number of nodes (hosts); torchrun's c10d rendezvous on the first node's
            rdzv_port joins them
        nproc_per_node: ranks per node; on GPU nodes at most --gpu (one rank per GPU)
        gpu: GPUs requested per node (0: CPU training with gloo)
        cpu: CPU cores requested per node; on CPU the ranks of a node share them
        memMB: host memory requested per node, in MiB
        h: a registered torchx named resource (e.g. aws_p4d.24xlarge); replaces gpu, cpu
            and memMB
        image: container image with the shardrec stack (cluster schedulers; local_cwd runs
            in the current directory and ignores it)
        name: job name
        env: extra environment variables for every rank, e.g. NCCL_DEBUG=INFO,FOO=bar
        max_retries: times the scheduler restarts the whole job after a failure
        rdzv_port: port of the c10d rendezvous store on the first node (multi-node only;
            a single-node job picks a free port)
        mounts: volumes to mount in the workers, e.g. type=bind,src=/data,dst=/data
            (scheduler specific; see the torchx scheduler docs)
    """
    _check_positive("nnodes", nnodes)
    _check_positive("nproc_per_node", nproc_per_node)
    _check_positive("gpu", gpu, minimum=0)
    _check_positive("cpu", cpu)
    _check_positive("memMB", memMB, minimum=256)
    if not 1 <= rdzv_port <= 65535:
        raise LaunchArgumentError(f"--rdzv_port must be a TCP port (1..65535), got {rdzv_port}")
    if gpu > 0 and nproc_per_node > gpu:
        raise LaunchArgumentError(
            f"--nproc_per_node {nproc_per_node} exceeds --gpu {gpu}: the trainer runs one rank "
            f"per GPU (cuda:LOCAL_RANK); set --nproc_per_node {gpu} or ask for more GPUs")
    overrides = tuple(overrides)
    _check_config(config, overrides)
    return ddp(
        "--config", config, *overrides,
        m="trainer",
        image=image,
        name=name,
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=f"{nnodes}x{nproc_per_node}",
        env=dict(env or {}),
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        rdzv_backend="c10d",
        mounts=mounts,
    )


def plan(
    config: str,
    world_size: int,
    local_world_size: int = 8,
    compute_device: str = "cuda",
    hbm_gb: float = 0.0,
    ddr_gb: float = 0.0,
    batch_size: int = 0,
    out: str = "plan.json",
    cpu: int = 2,
    memMB: int = 8192,
    image: str = DEFAULT_IMAGE,
    name: str = "shardrec-plan",
    env: Optional[Dict[str, str]] = None,
) -> specs.AppDef:
    """Plan the embedding sharding of a config for a hypothetical cluster, in one process.

    Runs ``python -m sharding.plan --config CONFIG --world-size W --local-world-size L
    --compute-device D [...] --out OUT``; no GPU or cluster of that size is needed.

    Args:
        config: run config TOML, relative to the repository root, e.g.
            launch/configs/deepfm_synthetic.toml
        world_size: total ranks of the cluster to plan for (e.g. 64)
        local_world_size: ranks per host of that cluster; must divide world_size
        compute_device: device the ranks will train on: cuda or cpu
        hbm_gb: per-rank GPU memory cap in GiB (0: the planner's default)
        ddr_gb: per-rank host memory cap in GiB (0: the planner's default)
        batch_size: per-rank batch size to plan for (0: the config's data.batch_size)
        out: where the plan JSON is written, relative to the job's working directory (on a
            cluster, a path on shared storage)
        cpu: CPU cores requested for the planning process
        memMB: host memory requested for the planning process, in MiB
        image: container image with the shardrec stack (ignored by local_cwd)
        name: job name
        env: extra environment variables, e.g. FOO=bar
    """
    _check_positive("world_size", world_size)
    _check_positive("local_world_size", local_world_size)
    if world_size % local_world_size:
        raise LaunchArgumentError(
            f"--local_world_size {local_world_size} must divide --world_size {world_size} "
            f"(every host runs the same number of ranks)")
    if compute_device not in COMPUTE_DEVICES:
        raise LaunchArgumentError(f"--compute_device must be one of {', '.join(COMPUTE_DEVICES)}, "
                                  f"got {compute_device!r}")
    # Plain int/float with 0 for "not set": torchx 0.7 hands Optional[float] values to the
    # component as unparsed strings, while plain types are parsed and checked by its argparse.
    _check_positive("hbm_gb", hbm_gb, minimum=0)
    _check_positive("ddr_gb", ddr_gb, minimum=0)
    _check_positive("batch_size", batch_size, minimum=0)
    if not out:
        raise LaunchArgumentError("--out must name the plan file, e.g. --out plan.json")
    _check_positive("cpu", cpu)
    _check_positive("memMB", memMB, minimum=256)
    _check_config(config, ())

    args = ["-m", "sharding.plan", "--config", config, "--world-size", str(world_size),
            "--local-world-size", str(local_world_size), "--compute-device", compute_device]
    if hbm_gb > 0:
        args += ["--hbm-gb", f"{hbm_gb:g}"]
    if ddr_gb > 0:
        args += ["--ddr-gb", f"{ddr_gb:g}"]
    if batch_size > 0:
        args += ["--batch-size", str(batch_size)]
    args += ["--out", out]
    return specs.AppDef(
        name=name,
        roles=[
            specs.Role(
                name="plan",
                image=image,
                entrypoint="python",
                args=args,
                env=dict(env or {}),
                num_replicas=1,
                resource=specs.resource(cpu=cpu, gpu=0, memMB=memMB),
            )
        ],
    )
