"""Running the trainer as users do (torchrun subprocesses) and reading its final line; or
several trainings in turn inside one multi-rank spawn (:func:`train_in_turn`)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

from trainer.metrics import parse_final as final_values


def run_trainer(repo_root: str, nproc: int, args: list, timeout: int = 600,
                extra_torchrun: Optional[list] = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N -m trainer ARGS`` from the repo root."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", f"--nproc_per_node={nproc}", *(extra_torchrun or []),
           "-m", "trainer", *args]
    env = {**os.environ, "PYTHONPATH": repo_root}
    return subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True,
                          timeout=timeout)


def parse_final(stdout: str) -> dict:
    """The ``final k=v ...`` line as a dict of floats."""
    final = final_values(stdout)
    assert final is not None, f"no final line in output:\n{stdout[-3000:]}"
    return {k: float(v) for k, v in final.items()}


def train_in_turn(ctx: object, repo_root: str, runs: List[Tuple[str, str, List[str]]],
                  run_root: str) -> List[Dict[str, float]]:
    """On each rank of a ``launch.spawn.run_ranks`` spawn: ``train()`` every run ``(name,
    config under launch/configs, extra overrides)`` in turn on the spawn's process group;
    returns their final metrics (rank 0's hold the values; the other ranks' Nones are dropped).

    ``train()`` is what ``python -m trainer`` runs under torchrun; it joins the group the
    spawn's worker created and, not having created it, leaves it for the next run (the worker
    destroys it at the end), so the suite pays for process start-up and the torchrec imports
    once instead of once per training.
    """
    import torch.distributed as dist

    from trainer.config import load_config
    from trainer.trainer import train

    os.chdir(repo_root)  # the configs' relative paths
    finals = []
    for name, config, extra in runs:
        cfg = load_config(f"launch/configs/{config}.toml",
                          ["--training.log_every=100", f"--training.run_dir={run_root}/{name}",
                           "--checkpoint.save_at_end=false", *extra])
        final = train(cfg)
        # The caller's group survives the run (train() destroys only a group it created).
        assert dist.is_initialized(), f"train() destroyed the caller's process group ({config})"
        finals.append({k: float(v) for k, v in final.items() if v is not None})
    return finals
