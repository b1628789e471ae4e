"""Running the trainer as users do (torchrun subprocesses) and reading its final line."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional

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
