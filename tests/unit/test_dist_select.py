"""Device / backend auto-selection, the CPU threads-per-rank rule and the per-restart store
keys of ``sharding.dist``."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from sharding import dist as sdist


def test_auto_device_and_backend_follow_the_machine() -> None:
    dev = sdist.resolve_device("auto", local_rank=1)
    if torch.cuda.is_available():
        assert dev == torch.device("cuda:1")
        assert sdist.resolve_backend("auto", dev) == "nccl"
    else:
        assert dev == torch.device("cpu")
        assert sdist.resolve_backend("auto", dev) == "gloo"


def test_explicit_overrides_win() -> None:
    assert sdist.resolve_device("cpu", local_rank=3) == torch.device("cpu")
    assert sdist.resolve_backend("gloo", torch.device("cpu")) == "gloo"


def test_impossible_combinations_name_the_fix() -> None:
    with pytest.raises(ValueError, match="nccl.*gloo"):
        sdist.resolve_backend("nccl", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            sdist.resolve_device("cuda", local_rank=0)


@pytest.mark.parametrize("cores,local_ranks,expected", [(16, 4, 4), (16, 3, 5), (2, 4, 1), (8, 1, 8)])
def test_cpu_threads_split_cores_between_local_ranks(monkeypatch: pytest.MonkeyPatch, cores: int,
                                                      local_ranks: int, expected: int) -> None:
    monkeypatch.setattr(sdist, "available_cpus", lambda: cores)
    assert sdist.cpu_threads_per_rank(local_ranks) == expected
    assert sdist.cpu_threads_per_rank(local_ranks, requested=3) == 3


def test_cpu_quota_caps_the_usable_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sdist.os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(sdist, "_cgroup_cpu_limit", lambda: 4.0)
    assert sdist.available_cpus() == 4
    monkeypatch.setattr(sdist, "_cgroup_cpu_limit", lambda: None)
    assert sdist.available_cpus() == 64
    monkeypatch.setattr(sdist, "_cgroup_cpu_limit", lambda: 0.5)  # half a core: still one thread
    assert sdist.available_cpus() == 1


def test_cgroup_v2_quota_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    files = {"/sys/fs/cgroup/cpu.max": "250000 100000\n"}
    real_open = open

    def fake_open(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if path in files:
            target = tmp_path / "cpu.max"
            target.write_text(files[path])
            return real_open(target, *args, **kwargs)
        if str(path).startswith("/sys/fs/cgroup"):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    assert sdist._cgroup_cpu_limit() == 2.5
    files["/sys/fs/cgroup/cpu.max"] = "max 100000\n"
    assert sdist._cgroup_cpu_limit() is None


def test_restart_attempts_never_share_process_group_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun every restart attempt gets the agent's same TCPStore: attempt 1 must not
    find (and connect to) the addresses attempt 0's gloo ranks published there."""
    agent_store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=30))
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                        "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(agent_store.port),
                        "TORCHELASTIC_USE_AGENT_STORE": "True",
                        "TORCHELASTIC_MAX_RESTARTS": "1"}.items():
        monkeypatch.setenv(name, value)
    keys_by_attempt = []
    for attempt in (0, 1):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(attempt))
        before = set(agent_store.list_keys())
        sdist.init_distributed("gloo", "cpu", cpu_threads=1, timeout_s=30)
        try:
            t = torch.ones(1)
            dist.all_reduce(t)
        finally:
            sdist.destroy_distributed()
        keys_by_attempt.append(set(agent_store.list_keys()) - before)
    first, second = keys_by_attempt
    assert first and second, "init_distributed wrote nothing to the launcher's store"
    assert all(k.startswith("shardrec/restart_0/") for k in first), first
    assert all(k.startswith("shardrec/restart_1/") for k in second), second
