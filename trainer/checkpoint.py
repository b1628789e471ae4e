"""Sharded, atomic checkpoints with ``torch.distributed.checkpoint`` (DCP) and exact resume.

A checkpoint is a directory ``<checkpoint.dir>/step_<NNNNNNNN>/`` holding:

* the DCP files of ``{"model": dmp.state_dict(), "optim": optimizer.state_dict()}`` — sharded
  tables, dense weights, fused and dense optimizer state — written by every rank;
* ``rank_<R>.pt``: that rank's RNG states and reader position (tensors and plain data only,
  loaded with ``weights_only=True``);
* ``trainer.json``: step, world size, per-table column-shard counts, wall time;
* ``config.toml``: the resolved config of the run that wrote it;
* ``COMPLETE``: written last.

Atomicity: everything is written into ``.tmp-step_<N>``; after a barrier rank 0 writes the
marker, fsyncs and renames the directory. A crash at any point leaves either the previous
checkpoints untouched plus a stray temp directory (ignored, and removed by the next save) or
a complete new one. Only directories with the marker are ever loaded.

Resharding: DCP loads the model into any world size or plan. Fused optimizer state of a
column-wise sharded table has one row-state per column shard, so it cannot follow a change in
the number of column shards; that case fails with a message pointing at
``--checkpoint.reset_optimizer=true``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
import tomllib
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch import nn

from trainer.config import Config, to_toml

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
_STEP_RE = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:08d}")


def list_complete(root: str) -> List[Tuple[int, str]]:
    """(step, path) of every complete checkpoint under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        path = os.path.join(root, name)
        if m and os.path.exists(os.path.join(path, MARKER)):
            out.append((int(m.group(1)), path))
    return sorted(out)


def find_latest(root: str) -> Optional[str]:
    """The newest complete checkpoint under ``root`` (half-written ones are skipped)."""
    done = list_complete(root)
    return done[-1][1] if done else None


def rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": repr(random.getstate()),
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state.get("cuda"):
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    import ast

    version, internal, gauss_next = ast.literal_eval(state["python"])
    random.setstate((version, tuple(internal), gauss_next))


def column_shards(plan: Any) -> Dict[str, int]:
    """Per table, the number of column shards its fused optimizer state is tied to."""
    out: Dict[str, int] = {}
    for module_path, module_plan in plan.plan.items():
        for table, ps in module_plan.items():
            cw = ps.sharding_type in ("column_wise", "table_column_wise")
            n = len(ps.sharding_spec.shards) if cw and ps.sharding_spec is not None else 1
            out[f"{module_path}.{table}"] = n
    return out


def _root_cause(error: BaseException) -> str:
    """The innermost OS-level message of a (possibly DCP-wrapped) failure."""
    text = str(error)
    for line in reversed(text.splitlines()):
        if "Error" in line or "No space" in line:
            return line.strip()
    return text.splitlines()[0] if text else type(error).__name__


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _all_ok(ok: bool) -> bool:
    """True on every rank iff ``ok`` on every rank (so all ranks fail a save together)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
    dist.all_reduce(flag)
    return int(flag) == 0


class Checkpointer:
    """Saves and restores the training state of one run (see the module docstring).

    Args:
        root: the checkpoint directory.
        rank, world_size: this process's.
        keep_last: complete checkpoints kept (older ones are deleted after a save).
    """

    def __init__(self, root: str, rank: int, world_size: int, keep_last: int) -> None:
        self.root = root
        self.rank = rank
        self.world_size = world_size
        self.keep_last = keep_last

    # -- save ---------------------------------------------------------------------------------
    def save(self, step: int, dmp: nn.Module, optimizer: Any, rank_state: Dict[str, Any],
             cfg: Config, plan: Any, before_commit: Optional[Callable[[], None]] = None) -> str:
        """Write the checkpoint of ``step`` (every rank calls this); returns its path.

        ``before_commit`` runs once the files are written, before the marker (fault
        injection uses it to die in the middle of a save)."""
        final = step_dir(self.root, step)
        tmp = os.path.join(self.root, f".tmp-step_{step:08d}")
        if self.rank == 0:
            os.makedirs(self.root, exist_ok=True)
            for name in os.listdir(self.root):  # leftovers of an interrupted save
                if name.startswith(".tmp-step_"):
                    shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
            os.makedirs(tmp)
        _barrier()
        error: Optional[BaseException] = None
        try:
            dcp.save({"model": dmp.state_dict(), "optim": optimizer.state_dict()},
                     checkpoint_id=tmp)
            torch.save({"step": step, "rng": rng_state(), **rank_state},
                       os.path.join(tmp, f"rank_{self.rank}.pt"))
            if self.rank == 0:
                info = {"step": step, "world_size": self.world_size,
                        "column_shards": column_shards(plan), "time": time.time()}
                with open(os.path.join(tmp, "trainer.json"), "w") as fh:
                    json.dump(info, fh, indent=2)
                with open(os.path.join(tmp, "config.toml"), "w") as fh:
                    fh.write(to_toml(cfg))
        except (Exception, CheckpointException) as e:  # disk full, permissions: keep old ones
            # (DCP wraps per-rank failures in CheckpointException, a BaseException.)
            error = e
        if not _all_ok(error is None):
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(
                f"saving checkpoint step {step} to {tmp} failed "
                f"({_root_cause(error) if error else 'on another rank'}); the previous "
                f"checkpoints in {self.root} are intact") from error
        if before_commit is not None:
            before_commit()
        _barrier()
        if self.rank == 0:
            with open(os.path.join(tmp, MARKER), "w") as fh:
                fh.write(f"{step}\n")
                fh.flush()
                os.fsync(fh.fileno())
            _fsync_dir(tmp)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            for _, old in list_complete(self.root)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final

    # -- load ---------------------------------------------------------------------------------
    def load(self, path: str, dmp: nn.Module, optimizer: Any, plan: Any,
             reset_optimizer: bool) -> Dict[str, Any]:
        """Restore model (and optimizer) state from ``path``; returns this rank's saved
        extra state (``step``, ``rng``, ``reader``...) or ``{"step": N}`` when the world size
        changed and per-rank state does not apply."""
        info = self._check(path)
        if not reset_optimizer:
            saved = info.get("column_shards", {})
            now = column_shards(plan)
            moved = sorted(t for t in now if t in saved and saved[t] != now[t])
            if moved:
                raise CheckpointError(
                    f"{path}: the fused optimizer state of table(s) {moved} was saved with "
                    f"{[saved[t] for t in moved]} column shard(s) but this plan has "
                    f"{[now[t] for t in moved]}; torchrec ties that state to the column-wise "
                    f"shard count, so it cannot be resharded. Resume with "
                    f"--checkpoint.reset_optimizer=true (weights load, optimizer restarts), or "
                    f"keep the previous world size / plan (--sharding.plan_file)")
        state: Dict[str, Any] = {"model": dmp.state_dict()}
        if not reset_optimizer:
            optimizer.init_state()  # lazy optimizer state must exist to load in place
            state["optim"] = optimizer.state_dict()
        try:
            dcp.load(state, checkpoint_id=path)
        except (Exception, CheckpointException) as e:  # several types for unreadable files
            raise CheckpointError(
                f"{path}: cannot load the checkpoint ({_root_cause(e)}); it may be corrupted "
                f"or written by a different model. Remove it to fall back to an older checkpoint, or "
                f"pass --checkpoint.resume_from=<another step_* directory>") from None
        dmp.load_state_dict(state["model"])
        if not reset_optimizer:
            optimizer.load_state_dict(state["optim"])
        if info["world_size"] != self.world_size:
            logger.warning("%s was written by %d ranks, resuming on %d: model%s resharded; "
                           "the data position restarts at the saved epoch", path,
                           info["world_size"], self.world_size,
                           "" if reset_optimizer else " and optimizer")
            return {"step": info["step"], "resharded": True}
        rank_file = os.path.join(path, f"rank_{self.rank}.pt")
        try:
            extra = torch.load(rank_file, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{rank_file}: unreadable ({type(e).__name__}: {e}); the "
                                  f"checkpoint is damaged — remove {path} to fall back to an "
                                  f"older one") from None
        return extra

    def _check(self, path: str) -> Dict[str, Any]:
        if not os.path.isdir(path):
            raise CheckpointError(f"checkpoint {path} does not exist")
        if not os.path.exists(os.path.join(path, MARKER)):
            raise CheckpointError(f"{path} has no {MARKER} marker: it was not completely "
                                  f"written and cannot be used")
        for name in (".metadata", "trainer.json"):
            if not os.path.exists(os.path.join(path, name)):
                raise CheckpointError(f"{os.path.join(path, name)} is missing: the "
                                      f"checkpoint is damaged; remove {path} to fall back to "
                                      f"an older one")
        try:
            with open(os.path.join(path, "trainer.json")) as fh:
                return json.load(fh)
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{os.path.join(path, 'trainer.json')}: unreadable ({e})") from None


def model_changes(path: str, cfg: Config) -> List[str]:
    """The ``[model]`` settings (name, flavour, ``model.args.*``) in which ``cfg`` differs from
    the config saved with checkpoint ``path``, as ``key: saved -> now`` (``unset`` for a key
    one side leaves at its default); empty when they agree or no config was saved.

    Why: a run dir resumes on its own, and a model change that keeps every parameter's
    shape (``num_heads``, ``dropout``, a loss setting) loads without an error, so the run
    would silently continue another model's training."""
    try:
        with open(os.path.join(path, "config.toml"), "rb") as fh:
            saved = tomllib.load(fh).get("model", {})
    except (OSError, tomllib.TOMLDecodeError):
        return []

    def flat(model: Dict[str, Any]) -> Dict[str, Any]:
        out = {f"model.{k}": v for k, v in model.items() if k != "args"}
        out.update({f"model.args.{k}": v for k, v in model.get("args", {}).items()})
        return out

    before, now = flat(saved), flat(cfg.to_dict()["model"])
    return [f"{k}: {before.get(k, 'unset')!r} -> {now.get(k, 'unset')!r}"
            for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
