"""Damaged checkpoints fail with a message naming the file; a failed save (disk full) leaves
the previous checkpoint intact; half-written checkpoints are never picked up. Verified
checkpoints: every file is in the checksum manifest, a flipped byte is found before loading
and auto-resume falls back past it; a crafted ``.metadata`` is refused without running its
payload; a checkpoint without a manifest loads with a warning; rotation never lets a
checkpoint that failed verification push a good one out."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import shutil
from typing import Dict, List

import pytest
import torch

from data.reader import ParquetReader
from data.schema import Schema
from sharding.dist import DistContext
from launch.spawn import run_ranks
from trainer.checkpoint import (
    MANIFEST,
    CheckpointError,
    Checkpointer,
    checksum_entries,
    find_latest,
    list_complete,
    write_manifest,
)
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
    out["bad_rank_file"] = damaged(  # no manifest (an old checkpoint): found at load time
        lambda p: (open(os.path.join(p, "rank_0.pt"), "wb").write(b"not a checkpoint"),
                   os.remove(os.path.join(p, MANIFEST))))
    out["bad_rank_file_manifest"] = damaged(
        lambda p: open(os.path.join(p, "rank_0.pt"), "wb").write(b"not a checkpoint"))
    out["missing"] = damaged(lambda p: shutil.rmtree(p))

    # The manifest covers every file of the checkpoint.
    with open(os.path.join(first, MANIFEST)) as fh:
        out["manifest"] = " ".join(sorted(json.load(fh)["files"]))
    out["files"] = " ".join(sorted(n for n in os.listdir(first) if n not in (MANIFEST,
                                                                             "COMPLETE")))

    # Three more checkpoints; then 16 bytes flipped inside a tensor of the newest one and a
    # crafted .metadata (manifest rewritten to match, as an attacker would) in the one before.
    ck.keep_last = 3
    paths = [ck.save(s, dmp, opt, {"reader": {}}, cfg, dmp.plan) for s in (2, 3, 4)]
    shard = os.path.join(paths[2], "__0_0.distcp")
    with open(shard, "r+b") as fh:
        fh.seek(os.path.getsize(shard) // 2)
        chunk = fh.read(16)
        fh.seek(-16, os.SEEK_CUR)
        fh.write(bytes(b ^ 0xFF for b in chunk))
    sentinel = os.path.join(root, "payload_ran")

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, (f"touch {sentinel}",))

    with open(os.path.join(paths[1], ".metadata"), "wb") as fh:
        pickle.dump({"state": Payload()}, fh)
    write_manifest(paths[1], checksum_entries(paths[1], sorted(
        n for n in os.listdir(paths[1]) if n not in (MANIFEST, "COMPLETE"))))
    records: List[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[method-assign]
    logging.getLogger("trainer.checkpoint").addHandler(handler)
    fresh = Checkpointer(root, ctx.rank, ctx.world_size, keep_last=3)
    out["fallback"] = str(fresh.latest_verified())
    out["skipped"] = "\n".join(records)
    with pytest.raises(CheckpointError) as e:
        fresh.load(paths[1], dmp, opt, dmp.plan, reset_optimizer=False)
    out["unsafe"] = str(e.value)
    out["payload_ran"] = str(os.path.exists(sentinel))
    # Rotation after the next save keeps 3 good ones and leaves the two bad ones alone.
    fresh.load(paths[0], dmp, opt, dmp.plan, reset_optimizer=False)
    fresh.save(5, dmp, opt, {"reader": {}}, cfg, dmp.plan)
    out["after_rotation"] = str([s for s, _ in list_complete(root)])

    # A checkpoint written before manifests existed loads, with a warning.
    os.remove(os.path.join(paths[0], MANIFEST))
    records.clear()
    legacy = Checkpointer(root, ctx.rank, ctx.world_size, keep_last=3)
    legacy.load(paths[0], dmp, opt, dmp.plan, reset_optimizer=False)
    out["legacy"] = "\n".join(records)
    logging.getLogger("trainer.checkpoint").removeHandler(handler)
    return out


def test_damaged_checkpoints_and_failed_saves(tiny_ctr: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    root = str(tmp_path / "ckpt")
    (out,) = run_ranks(_scenarios, 1, tiny_ctr, root)
    assert "No space left on device" in out["disk_full"] and "intact" in out["disk_full"]
    assert out["after_disk_full"] == "[1] ['step_00000001']"  # no temp dir left behind
    assert "damaged/__0_0.distcp: checksum mismatch (100 bytes" in out["truncated"]
    assert "/.metadata is missing" in out["no_metadata"]
    assert "no COMPLETE marker" in out["no_marker"]
    assert "rank_0.pt: unreadable" in out["bad_rank_file"]
    assert "rank_0.pt: checksum mismatch (16 bytes" in out["bad_rank_file_manifest"]
    assert "does not exist" in out["missing"]
    assert out["manifest"] == out["files"] and "__0_0.distcp" in out["manifest"]
    assert out["fallback"].endswith("step_00000002")
    assert "skipping checkpoint" in out["skipped"]
    assert "step_00000004/__0_0.distcp: checksum mismatch" in out["skipped"]
    assert "refused to load type posix.system" in out["skipped"]
    assert "step_00000003/.metadata: refused to load type posix.system" in out["unsafe"]
    assert out["payload_ran"] == "False"
    # keep_last=3 and 4 complete ones, but 3 and 4 failed verification: they count for
    # nothing, so the save of 5 deletes no good checkpoint (step 1 went at the save of 4).
    assert out["after_rotation"] == "[2, 3, 4, 5]"
    assert "has no manifest.json" in out["legacy"] and "unverified" in out["legacy"]


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
