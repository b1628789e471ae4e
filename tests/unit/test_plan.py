"""Dry-run planning (no process group), plan files, and the cannot-fit message.

The 64-rank Criteo plan is made once per module through the command's own entry point and
shared by the tests that inspect it.
"""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any, Dict, List, Tuple

import pytest
import torch

from data.schema import FeatureSpec, Schema
from sharding.planfile import (
    PlanFileError,
    check_plan,
    load_plan,
    model_tables,
    plan_from_dict,
    plan_to_dict,
    save_plan,
)

# Config paths (and the config's schema path) are relative to the repository root, where
# pytest runs.
CRITEO = "launch/configs/deepfm_criteo.toml"
CRITEO_ROWS = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593,
               3194, 27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105,
               142572]


def run_plan(args: List[str]) -> Tuple[int, str, str]:
    from trainer.plan import run

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = run(args)
    return rc, out.getvalue(), err.getvalue()


def assert_every_table_placed(plan_json: Dict[str, Any], world: int) -> None:
    tables = plan_json["modules"]["model.ebc"]
    assert sorted(tables) == sorted(f"t_cat_{i}" for i in range(26))
    for i, rows in enumerate(CRITEO_ROWS):
        t = tables[f"t_cat_{i}"]
        assert t["ranks"] and all(0 <= r < world for r in t["ranks"]), (i, t["ranks"])
        if t["sharding_type"] == "data_parallel":
            assert t["shards"] == [] and len(t["ranks"]) == world
            continue
        # the shards tile the whole table
        assert sum(s["sizes"][0] * s["sizes"][1] for s in t["shards"]) == rows * 128, i


@pytest.fixture(scope="module")
def criteo64(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    d = tmp_path_factory.mktemp("plan64")
    out, png = str(d / "plan.json"), str(d / "plan.png")
    rc, stdout, stderr = run_plan(["--config", CRITEO, "--world-size", "64",
                                   "--local-world-size", "8", "--compute-device", "cuda",
                                   "--out", out, "--plot", png])
    assert rc == 0, stderr
    with open(out) as fh:
        return {"json": json.load(fh), "stdout": stdout, "path": out, "png": png}


def test_dry_run_64_cuda_ranks_places_every_table(criteo64: Dict[str, Any]) -> None:
    plan = criteo64["json"]
    assert plan["world_size"] == 64 and plan["local_world_size"] == 8
    assert plan["compute_device"] == "cuda"
    assert_every_table_placed(plan, 64)
    tables = plan["modules"]["model.ebc"]
    # the config restricts the three largest tables to (table-)row-wise
    for t in ("t_cat_2", "t_cat_11", "t_cat_20"):
        assert tables[t]["sharding_type"] in ("table_row_wise", "row_wise")
    # placements name the GPU of each rank on its host
    shard = tables["t_cat_2"]["shards"][0]
    r = tables["t_cat_2"]["ranks"][0]
    assert shard["placement"] == f"rank:{r}/cuda:{r % 8}"
    out = criteo64["stdout"]
    assert "t_cat_2" in out and "10,131,227 x 128" in out
    assert "rank  63:" in out and "/   80.00 GiB" in out  # per-rank memory vs capacity
    assert "planner estimate" in out and "imbalance" in out
    ranks = plan["report"]["ranks"]
    assert len(ranks) == 64 and sum(r["hbm"] for r in ranks) > 17 * 1024**3  # >= the weights
    with open(criteo64["png"], "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_dry_run_8_cpu_ranks_places_every_table(tmp_path: Any) -> None:
    out = str(tmp_path / "plan8.json")
    rc, stdout, stderr = run_plan(["--config", CRITEO, "--world-size", "8",
                                   "--local-world-size", "8", "--compute-device", "cpu",
                                   "--ddr-gb", "64", "--out", out])
    assert rc == 0, stderr
    with open(out) as fh:
        plan = json.load(fh)
    assert_every_table_placed(plan, 8)
    kernels = {t["compute_kernel"] for t in plan["modules"]["model.ebc"].values()}
    assert kernels <= {"fused", "dense"}  # no GPU-only kernel in a CPU plan
    for t in plan["modules"]["model.ebc"].values():
        for s in t["shards"]:
            assert s["placement"].endswith("/cpu")
    assert "rank   7:" in stdout and "/   64.00 GiB" in stdout


def test_saved_plan_loads_with_identical_placement(criteo64: Dict[str, Any]) -> None:
    plan, header = load_plan(criteo64["path"])
    assert header == {"world_size": 64, "local_world_size": 8, "compute_device": "cuda",
                      "batch_size": 2048}
    again = plan_to_dict(plan, 64, 8, "cuda", 2048)
    assert again["modules"] == criteo64["json"]["modules"]
    ps = plan.plan["model.ebc"]["t_cat_2"]  # type: ignore[index]
    assert ps.sharding_spec is not None
    shards = ps.sharding_spec.shards  # type: ignore[union-attr]
    assert [s.placement.rank() for s in shards] == ps.ranks
    assert str(shards[0].placement.device()) == f"cuda:{ps.ranks[0] % 8}"


# -- tiny models: fast plans of every type, plan files against models, cannot-fit ------------

def tiny_model(rows: List[int], dim: int = 16) -> Tuple[torch.nn.Module, Schema]:
    from models import get_model_spec
    from trainer.tasks.ctr import CTRTrain

    feats = [FeatureSpec("d0", "dense")]
    feats += [FeatureSpec(f"f{i}", "sparse", table=f"t{i}", num_embeddings=r, embedding_dim=dim)
              for i, r in enumerate(rows)]
    schema = Schema(features=feats)
    spec = get_model_spec("deepfm")
    return CTRTrain(spec.build(schema, spec.make_args("small"), "meta")), schema


def plan_tiny(model: torch.nn.Module, schema: Schema, world: int, device: str,
              types: Dict[str, str], **sharding_kw: Any) -> Any:
    from sharding.constraints import (
        SparseOptimizerDefaults,
        build_constraints,
        resolve_table_settings,
    )
    from sharding.table_optimizers import apply_table_optimizers
    from sharding.planner import build_planner, plan_model, topology_from_config
    from sharding.sharders import build_sharders
    from trainer.config import ShardingConfig

    tables: Dict[str, Dict[str, Any]] = {t: {"sharding_types": [st]} for t, st in types.items()}
    for t, extra in sharding_kw.pop("tables", {}).items():
        tables.setdefault(t, {}).update(extra)
    sharding = ShardingConfig(tables=tables, min_partition=8, **sharding_kw)
    training = SparseOptimizerDefaults("rowwise_adagrad")
    settings = resolve_table_settings(schema, sharding, training)
    apply_table_optimizers(model, settings)
    topology = topology_from_config(sharding, world, min(world, 2), device, dry_run=True)
    planner = build_planner(topology, 32, build_constraints(settings, device),
                            sharding.storage_reservation)
    return plan_model(model, build_sharders(), planner, topology, sharding.storage_reservation)


def test_plan_file_round_trip_for_every_sharding_type(tmp_path: Any) -> None:
    model, schema = tiny_model([64, 48, 40, 32, 24])
    types = {"t0": "table_wise", "t1": "row_wise", "t2": "column_wise",
             "t3": "table_row_wise", "t4": "data_parallel"}
    plan = plan_tiny(model, schema, 4, "cpu", types)
    path = save_plan(str(tmp_path / "p.json"), plan, 4, 2, "cpu", 32)
    loaded, header = load_plan(path)
    assert header["world_size"] == 4
    for table, st in types.items():
        a = plan.plan["model.ebc"][table]  # type: ignore[index]
        b = loaded.plan["model.ebc"][table]  # type: ignore[index]
        assert a.sharding_type == b.sharding_type == st
        assert (a.compute_kernel, a.ranks) == (b.compute_kernel, b.ranks)
        if a.sharding_spec is None:
            assert b.sharding_spec is None
            continue
        for sa, sb in zip(a.sharding_spec.shards, b.sharding_spec.shards):  # type: ignore
            assert (sa.shard_offsets, sa.shard_sizes) == (sb.shard_offsets, sb.shard_sizes)
            assert str(sa.placement) == str(sb.placement)
        assert len(a.sharding_spec.shards) == len(b.sharding_spec.shards)  # type: ignore
    check_plan(loaded, header, model, 4, "cpu")  # matches the model it was made for


def test_uvm_caching_and_its_load_factor_survive_the_plan_file(tmp_path: Any) -> None:
    model, schema = tiny_model([64, 48])
    plan = plan_tiny(model, schema, 2, "cuda", {"t0": "row_wise"}, hbm_gb=1.0, ddr_gb=4.0,
                     tables={"t0": {"compute_kernel": "fused_uvm_caching",
                                    "cache_load_factor": 0.3}})
    ps = plan.plan["model.ebc"]["t0"]  # type: ignore[index]
    assert ps.compute_kernel == "fused_uvm_caching" and ps.cache_params.load_factor == 0.3
    loaded, _ = load_plan(save_plan(str(tmp_path / "p.json"), plan, 2, 2, "cuda", 32))
    again = loaded.plan["model.ebc"]["t0"]  # type: ignore[index]
    assert again.compute_kernel == "fused_uvm_caching"
    assert again.cache_params is not None and again.cache_params.load_factor == 0.3


def test_plan_file_mismatches_name_the_table(tmp_path: Any) -> None:
    model, schema = tiny_model([64, 48])
    plan = plan_tiny(model, schema, 2, "cpu", {})
    d = plan_to_dict(plan, 2, 2, "cpu", 32)
    loaded, header = plan_from_dict(d)
    with pytest.raises(PlanFileError, match="the plan is for 2 ranks, this job has 4"):
        check_plan(loaded, header, model, 4, "cpu")
    with pytest.raises(PlanFileError, match="the plan is for cpu and this job runs on cuda"):
        check_plan(loaded, header, model, 2, "cuda")
    gpu, gpu_header = plan_from_dict({**d, "compute_device": "cuda"})
    with pytest.raises(PlanFileError, match="the plan is for 2 GPUs per host, this job has 1"):
        check_plan(gpu, gpu_header, model, 2, "cuda", local_world_size=1)
    other, _ = tiny_model([64, 48, 40])  # a third table the plan does not know
    with pytest.raises(PlanFileError, match="table 't2' of 'model.ebc' has no placement"):
        check_plan(loaded, header, other, 2, "cpu")
    renamed = json.loads(json.dumps(d))
    renamed["modules"]["model.ebc"]["t9"] = renamed["modules"]["model.ebc"].pop("t1")
    with pytest.raises(PlanFileError, match="places table 't9'.*its tables are: t0, t1"):
        check_plan(*plan_from_dict(renamed), model, 2, "cpu")
    bigger, _ = tiny_model([64, 4800])  # same names, other sizes
    with pytest.raises(PlanFileError, match="table 'model.ebc.t1'"):
        check_plan(loaded, header, bigger, 2, "cpu")
    with pytest.raises(PlanFileError, match="not a shardrec plan"):
        plan_from_dict({"version": 99})


def test_plan_that_cannot_fit_lists_largest_tables_capacity_and_knobs() -> None:
    from sharding.planner import PlanDoesNotFit

    # 3 x 50M x 128 fp32 rows = 71.5 GiB of weights for 2 ranks of 8 GiB.
    model, schema = tiny_model([50_000_000, 40_000_000, 30_000_000, 1000], dim=128)
    with pytest.raises(PlanDoesNotFit) as e:
        plan_tiny(model, schema, 2, "cuda", {}, hbm_gb=8.0, ddr_gb=8.0)
    msg = str(e.value)
    assert "do not fit on 2 cuda ranks" in msg
    assert "each rank has 8.00 GiB HBM" in msg and "6.80 GiB is usable" in msg
    lines = msg.splitlines()
    i = lines.index("largest tables:")
    assert lines[i + 1].split()[0] == "t0" and "50,000,000 x 128" in lines[i + 1]
    assert lines[i + 2].split()[0] == "t1" and lines[i + 3].split()[0] == "t2"
    assert "24.03 GiB" in lines[i + 1]  # 50M x 128 x 4 B + 50M x 4 B of row-wise state
    assert "more ranks (now 2)" in msg
    assert "fused_uvm_caching" in msg and "[sharding.tables.t0]" in msg
    assert "smaller embedding_dim" in msg


def test_plan_command_reports_cannot_fit(tmp_path: Any) -> None:
    rc, _, err = run_plan(["--config", CRITEO, "--world-size", "2", "--compute-device", "cpu",
                           "--ddr-gb", "2"])
    assert rc == 1
    assert "do not fit on 2 cpu ranks" in err and "t_cat_2" in err
    assert "fused_uvm_caching" not in err  # no GPU knob for a CPU plan


def test_plan_command_rejects_bad_table_settings() -> None:
    rc, _, err = run_plan(["--config", CRITEO, "--world-size", "8", "--compute-device", "cpu",
                           "--sharding.tables.t_cat_99.lr=0.1"])
    assert rc == 2
    assert "t_cat_99" in err and "t_cat_0, t_cat_1" in err


def test_trainer_path_uses_plan_file(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``sharding.plan_file`` replaces planning: the DMP gets the file's placement."""
    from sharding.constraints import SparseOptimizerDefaults, resolve_table_settings
    from sharding.table_optimizers import apply_table_optimizers
    from sharding.dist import destroy_distributed, free_port, init_distributed
    from sharding.parallel import shard_model_from_config
    from trainer.config import ShardingConfig

    model, schema = tiny_model([64, 48])
    plan = plan_tiny(model, schema, 1, "cpu", {"t0": "column_wise"})
    path = save_plan(str(tmp_path / "p.json"), plan, 1, 1, "cpu", 32)
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)
    ctx = init_distributed("gloo", "cpu", cpu_threads=1)
    try:
        fresh, _ = tiny_model([64, 48])
        assert model_tables(fresh)["model.ebc"] == {"t0": (64, 16), "t1": (48, 16)}
        sharding = ShardingConfig(plan_file=path)
        settings = resolve_table_settings(schema, sharding, SparseOptimizerDefaults())
        apply_table_optimizers(fresh, settings)
        dmp, used = shard_model_from_config(fresh, ctx, sharding, settings, 32)
        assert used.plan["model.ebc"]["t0"].sharding_type == "column_wise"  # type: ignore
        assert len(used.plan["model.ebc"]["t0"].sharding_spec.shards) == 2  # type: ignore
        sd = dmp.state_dict()
        shards = sd["model.ebc.embedding_bags.t0.weight"].local_shards()
        assert [tuple(s.metadata.shard_sizes) for s in shards] == [(64, 8), (64, 8)]
    finally:
        destroy_distributed()


def test_builtin_png_renderer_draws_stacked_bars(tmp_path: Any) -> None:
    import struct
    import zlib

    from sharding.plot import _by_table, _color, _png_bars

    report = {"ranks": [{"by_table": {"big": 3 * 1024**3, "small": 1024**3}},
                        {"by_table": {"small": 1024**3}}]}
    tables, grid = _by_table(report)
    assert tables == ["big", "small"] and grid.tolist() == [[3 * 1024**3, 0], [1024**3] * 2]
    path = str(tmp_path / "m.png")
    _png_bars(grid, tables, path, "memory")
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    idat = data.index(b"IDAT")
    (n,) = struct.unpack(">I", data[idat - 4:idat])
    raw = zlib.decompress(data[idat + 4:idat + 4 + n])
    assert len(raw) == h * (1 + 3 * w)
    stride = 1 + 3 * w  # each row: filter byte, then RGB pixels
    pixels = {raw[y * stride + 1 + 3 * x:y * stride + 4 + 3 * x] for y in range(h)
              for x in range(w)}
    assert bytes(_color(0)) in pixels and bytes(_color(1)) in pixels
