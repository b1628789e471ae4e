"""Damaged checkpoints fail with a message naming the file; a failed save (disk full) leaves
the previous checkpoint intact; half-written checkpoints are never picked up."""

from __future__ import annotations

import errno
import os
import shutil
from typing import Dict

import pytest
import torch

from data.reader import ParquetReader
from data.schema import Schema
from sharding.dist import DistContext
from sharding.spawn import run_ranks
from trainer.checkpoint import CheckpointError, Checkpointer, find_latest, list_complete
from trainer.config import Config
from trainer.trainer import build_model, shard_and_optimize


def _scenarios(ctx: DistContext, data_dir: str, root: str) -> Dict[str, str]:
    cfg = Config()
    cfg.data.path = data_dir
    cfg.model.flavour = "small"
    schema = Schema.load(data_dir)
    dmp, opt = shard_and_optimize(cfg, ctx, schema, build_model(cfg, schema))
    batch = next(iter(ParquetReader(data_dir, "train", 32, prefetch=0)))
    loss, _ = dmp(batch)  # one real step, so every optimizer has state to save
    loss.backward()
    opt.step()
    ck = Checkpointer(root, ctx.rank, ctx.world_size, keep_last=2)
    first = ck.save(1, dmp, opt, {"reader": {}}, cfg, dmp.plan)
    out: Dict[str, str] = {}

    # Disk full while writing step 2: the error says so; step 1 stays and loads.
    real_save = torch.save

    def full(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    torch.save = full  # type: ignore[assignment]
    try:
        with pytest.raises(CheckpointError) as e:
            ck.save(2, dmp, opt, {"reader": {}}, cfg, dmp.plan)
        out["disk_full"] = str(e.value)
    finally:
        torch.save = real_save  # type: ignore[assignment]
    out["after_disk_full"] = f"{[s for s, _ in list_complete(root)]} " + str(
        sorted(os.listdir(root)))
    ck.load(first, dmp, opt, dmp.plan, reset_optimizer=False)

    def damaged(mutate) -> str:  # type: ignore[no-untyped-def]
        path = os.path.join(root, "damaged")
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(first, path)
        mutate(path)
        with pytest.raises(CheckpointError) as e:
            ck.load(path, dmp, opt, dmp.plan, reset_optimizer=False)
        return str(e.value)

    def truncate(path: str) -> None:
        data = [f for f in os.listdir(path) if f.endswith(".distcp")][0]
        with open(os.path.join(path, data), "r+b") as fh:
            fh.truncate(100)

    out["truncated"] = damaged(truncate)
    out["no_metadata"] = damaged(lambda p: os.remove(os.path.join(p, ".metadata")))
    out["no_marker"] = damaged(lambda p: os.remove(os.path.join(p, "COMPLETE")))
    out["bad_rank_file"] = damaged(
        lambda p: open(os.path.join(p, "rank_0.pt"), "wb").write(b"not a checkpoint"))
    out["missing"] = damaged(lambda p: shutil.rmtree(p))
    return out


def test_damaged_checkpoints_and_failed_saves(tiny_ctr: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    root = str(tmp_path / "ckpt")
    (out,) = run_ranks(_scenarios, 1, tiny_ctr, root)
    assert "No space left on device" in out["disk_full"] and "intact" in out["disk_full"]
    assert out["after_disk_full"] == "[1] ['step_00000001']"  # no temp dir left behind
    assert ".distcp" not in out["truncated"] or "damaged" in out["truncated"]
    assert "cannot load the checkpoint" in out["truncated"] and "corrupted" in out["truncated"]
    assert "/.metadata is missing" in out["no_metadata"]
    assert "no COMPLETE marker" in out["no_marker"]
    assert "rank_0.pt: unreadable" in out["bad_rank_file"]
    assert "does not exist" in out["missing"]


def test_half_written_checkpoints_are_skipped(tmp_path) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "c"
    for step, marker in ((3, True), (7, False)):
        d = root / f"step_{step:08d}"
        d.mkdir(parents=True)
        if marker:
            (d / "COMPLETE").write_text(f"{step}\n")
    (root / ".tmp-step_00000009").mkdir()
    assert find_latest(str(root)) == str(root / "step_00000003")
    assert find_latest(str(tmp_path / "nothing")) is None
