"""``[sharding]`` config → per-table settings → planner constraints and fused optimizers."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest
import torch

from data.schema import FeatureSpec, Schema
from sharding.constraints import (
    ShardingConfigError,
    SparseOptimizerDefaults,
    build_constraints,
    resolve_table_settings,
)
from sharding.table_optimizers import apply_table_optimizers, table_weights
from trainer.config import (
    COMPUTE_KERNELS,
    SHARDING_TYPES,
    ConfigError,
    ShardingConfig,
    help_text,
    load_config,
    to_toml,
)


def schema() -> Schema:
    return Schema(features=[
        FeatureSpec("d0", "dense"),
        FeatureSpec("user", "sparse", table="user", num_embeddings=100, embedding_dim=8),
        FeatureSpec("ad", "sparse", table="ad", num_embeddings=50, embedding_dim=8),
        FeatureSpec("ad2", "sparse", table="ad", num_embeddings=50, embedding_dim=8),
        FeatureSpec("hist", "sequence", table="item", num_embeddings=30, embedding_dim=8,
                    max_len=20),
    ])


def write(tmp_path: Any, text: str) -> str:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return str(p)


def test_per_table_toml_parses_and_round_trips(tmp_path: Any) -> None:
    path = write(tmp_path, """
[sharding]
sharding_types = ["table_wise", "row_wise"]
pooling_factor = 3.0
[sharding.tables.ad]
sharding_types = ["row_wise"]
compute_kernel = "fused"
pooling_factor = 2.0
optimizer = "sgd"
lr = 0.5
weight_decay = 0.01
""")
    # No dataset at data.path: the table names are checked against a schema only when one
    # is at hand (a `make demo` dataset at the default path must not change this test).
    cfg = load_config(path, ["--sharding.tables.user.min_partition=8",
                             f"--data.path={tmp_path / 'no_dataset'}"])
    assert cfg.sharding.tables == {
        "ad": {"sharding_types": ["row_wise"], "compute_kernel": "fused", "pooling_factor": 2.0,
               "optimizer": "sgd", "lr": 0.5, "weight_decay": 0.01},
        "user": {"min_partition": 8},
    }
    # the resolved config written to the run directory reads back the same
    again = tomllib.loads(to_toml(cfg))["sharding"]
    assert again["tables"] == cfg.sharding.tables
    assert again["sharding_types"] == ["table_wise", "row_wise"]


def test_bad_sharding_entries_are_all_reported(tmp_path: Any) -> None:
    path = write(tmp_path, """
[sharding]
sharding_types = ["row_wise", "diagonal"]
storage_reservation = 1.5
[sharding.tables.ad]
compute_kernel = "magic"
colour = "red"
[sharding.tables.user]
min_partition = 6
cache_load_factor = 2.0
""")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "sharding.sharding_types: 'diagonal' is not one of 'table_wise'" in msg
    assert "sharding.storage_reservation must be in [0, 1)" in msg
    assert "sharding.tables.ad.compute_kernel: 'magic' is not one of" in msg
    assert "unknown key 'sharding.tables.ad.colour'; valid keys in [sharding.tables.ad]" in msg
    assert "sharding.tables.user.min_partition must be a positive multiple of 4" in msg
    assert "sharding.tables.user.cache_load_factor must be in (0, 1]" in msg


def test_help_lists_per_table_keys() -> None:
    text = help_text()
    assert "--sharding.tables.NAME.optimizer" in text
    assert "--sharding.plan_file" in text and "--data.schema" in text


def test_unknown_table_names_the_table_and_the_valid_ones() -> None:
    sharding = ShardingConfig(tables={"usr": {"lr": 0.1}, "ad": {"lr": 0.2}})
    with pytest.raises(ShardingConfigError) as e:
        resolve_table_settings(schema(), sharding, SparseOptimizerDefaults())
    msg = str(e.value)
    assert "sharding.tables.usr: the model has no table 'usr'" in msg
    assert "its tables are: user, ad, item" in msg


def test_sequence_tables_refuse_data_parallel_and_dense_with_the_reason() -> None:
    sharding = ShardingConfig(tables={
        "item": {"sharding_types": ["data_parallel", "row_wise"], "compute_kernel": "dense"}})
    with pytest.raises(ShardingConfigError) as e:
        resolve_table_settings(schema(), sharding, SparseOptimizerDefaults())
    msg = str(e.value)
    assert "sequence table 'item' cannot use data_parallel" in msg
    assert "PoolingMode.NONE" in msg
    assert "cannot use the dense kernel" in msg
    # the same default applied to every table names the sequence table too
    with pytest.raises(ShardingConfigError, match="defaults for table 'item'.*data_parallel"):
        resolve_table_settings(schema(), ShardingConfig(sharding_types=["data_parallel"]),
                               SparseOptimizerDefaults())


def test_settings_inherit_defaults_and_make_constraints() -> None:
    sharding = ShardingConfig(
        sharding_types=["table_wise", "row_wise"], pooling_factor=3.0,
        tables={"ad": {"sharding_types": ["column_wise"], "compute_kernel": "fused_uvm_caching",
                       "cache_load_factor": 0.3, "pooling_factor": 2.0, "min_partition": 4,
                       "optimizer": "sgd", "lr": 0.5}})
    training = SparseOptimizerDefaults("rowwise_adagrad", lr=0.05)
    settings = resolve_table_settings(schema(), sharding, training)
    assert list(settings) == ["user", "ad", "item"]
    user, ad, item = settings["user"], settings["ad"], settings["item"]
    assert (user.sharding_types, user.optimizer, user.lr) == (("table_wise", "row_wise"),
                                                               "rowwise_adagrad", 0.05)
    assert (ad.optimizer, ad.lr, ad.cache_load_factor) == ("sgd", 0.5, 0.3)
    assert item.pooling_factor == 20.0  # sequences default to their max_len

    c = build_constraints(settings, "cuda")
    assert c["user"].sharding_types == ["table_wise", "row_wise"]
    assert c["user"].compute_kernels is None and c["user"].pooling_factors == [3.0]
    assert c["ad"].sharding_types == ["column_wise"]
    assert c["ad"].compute_kernels == ["fused_uvm_caching"]
    assert c["ad"].cache_params is not None and c["ad"].cache_params.load_factor == 0.3
    assert c["ad"].pooling_factors == [2.0, 2.0]  # one per feature of the shared table
    assert c["ad"].feature_names == ["ad", "ad2"] and c["ad"].min_partition == 4
    assert c["item"].pooling_factors == [20.0]


def test_gpu_only_kernels_and_optimizers_fail_for_cpu_plans() -> None:
    sharding = ShardingConfig(tables={"ad": {"compute_kernel": "fused_uvm_caching"},
                                      "user": {"optimizer": "adam"}})
    settings = resolve_table_settings(schema(), sharding, SparseOptimizerDefaults())
    build_constraints(settings, "cuda")  # fine on GPU
    with pytest.raises(ShardingConfigError) as e:
        build_constraints(settings, "cpu")
    msg = str(e.value)
    assert "table 'ad': compute_kernel 'fused_uvm_caching' needs compute_device cuda" in msg
    assert "table 'user': fused optimizer 'adam' runs only on GPU" in msg
    # a data-parallel table is updated by a plain torch optimizer, so adam is fine there
    dp = ShardingConfig(tables={"user": {"optimizer": "adam",
                                         "sharding_types": ["data_parallel"]}})
    build_constraints(resolve_table_settings(schema(), dp, SparseOptimizerDefaults()), "cpu")


def test_kernel_and_type_combinations_that_cannot_work() -> None:
    bad = ShardingConfig(tables={
        "user": {"sharding_types": ["row_wise"], "compute_kernel": "dense"},
        "ad": {"sharding_types": ["data_parallel"], "compute_kernel": "fused"}})
    with pytest.raises(ShardingConfigError) as e:
        resolve_table_settings(schema(), bad, SparseOptimizerDefaults())
    assert "the dense kernel is only used by data_parallel" in str(e.value)
    assert "data_parallel tables use the dense kernel, not 'fused'" in str(e.value)


def test_each_table_gets_its_own_fused_optimizer() -> None:
    from models.blocks import build_ebc

    sharding = ShardingConfig(tables={"ad": {"optimizer": "sgd", "lr": 0.5}})
    training = SparseOptimizerDefaults("rowwise_adagrad", lr=0.05, weight_decay=0.001)
    settings = resolve_table_settings(schema(), sharding, training)
    module = torch.nn.Module()
    module.ebc = build_ebc(schema(), "meta")
    apply_table_optimizers(module, {k: v for k, v in settings.items() if k != "item"})
    weights = table_weights(module)
    assert set(weights) == {"user", "ad"}
    assert weights["ad"]._optimizer_classes[0].__name__ == "SGD"  # type: ignore[attr-defined]
    # its own lr, the default weight decay
    assert weights["ad"]._optimizer_kwargs[0] == {"lr": 0.5, "weight_decay": 0.001}  # type: ignore
    assert weights["user"]._optimizer_classes[0].__name__ == "RowWiseAdagrad"  # type: ignore
    assert weights["user"]._optimizer_kwargs[0]["lr"] == 0.05  # type: ignore[attr-defined]
    assert weights["user"]._optimizer_kwargs[0]["weight_decay"] == 0.001  # type: ignore


def test_config_choices_match_the_sharders() -> None:
    from sharding.sharders import (
        FUSED_OPTIMIZERS,
        POOLED_SHARDING_TYPES,
        SUPPORTED_KERNELS,
        TABLE_OPTIMIZERS,
        PooledSharder,
        SequenceSharder,
    )
    from trainer.config import SPARSE_OPTIMIZERS

    assert set(SHARDING_TYPES) == set(POOLED_SHARDING_TYPES)
    assert set(COMPUTE_KERNELS) == set(SUPPORTED_KERNELS)
    assert set(SPARSE_OPTIMIZERS) == set(FUSED_OPTIMIZERS) == set(TABLE_OPTIMIZERS)
    assert {"row_wise", "table_row_wise"} <= set(PooledSharder().sharding_types("cpu"))
    # no key-value / SSD kernels in a GPU plan: we do not ship an SSD-backed fbgemm
    assert set(PooledSharder().compute_kernels("row_wise", "cuda")) <= set(SUPPORTED_KERNELS)
    assert "dense" not in SequenceSharder().compute_kernels("table_wise", "cpu")
    assert "data_parallel" not in SequenceSharder().sharding_types("cpu")


def test_topology_takes_caps_and_bandwidths_from_config() -> None:
    from sharding.planner import GB, topology_from_config

    sharding = ShardingConfig(hbm_gb=40.0, ddr_gb=100.0, intra_host_bw_gbps=300.0,
                              inter_host_bw_gbps=25.0)
    t = topology_from_config(sharding, 16, 8, "cuda")
    assert (t.world_size, t.local_world_size, t.compute_device) == (16, 8, "cuda")
    assert t.devices[0].storage.hbm == 40 * GB and t.devices[0].storage.ddr == 100 * GB
    # GB/s in the config, bytes/ms in torchrec
    assert t.intra_host_bw == pytest.approx(300 * GB / 1000)
    assert t.inter_host_bw == pytest.approx(25 * GB / 1000)
    default = topology_from_config(ShardingConfig(), 2, 2, "cpu")
    assert default.intra_host_bw > default.inter_host_bw > 0
    assert default.devices[0].storage.ddr > 0  # this host's memory / local ranks
    if not torch.cuda.is_available():  # a live cuda job without a GPU cannot guess its HBM
        with pytest.raises(ValueError, match="sharding.hbm_gb"):
            topology_from_config(ShardingConfig(), 2, 2, "cuda")


def test_config_checks_against_the_dataset_run_before_work_not_at_parse(tmp_path: Any) -> None:
    """Parsing reads no dataset (a config with an unknown table loads, next to a schema); the
    trainer's check before any work names every table problem."""
    from trainer.validation import check_against_data

    schema().save(str(tmp_path))
    path = write(tmp_path, f"""
[data]
path = "{tmp_path}"
[sharding.tables.usr]
lr = 0.1
[sharding.tables.item]
sharding_types = ["data_parallel"]
""")
    cfg = load_config(path)
    with pytest.raises(ConfigError) as e:
        check_against_data(cfg, schema(), str(tmp_path))
    msg = str(e.value)
    assert f"the config does not fit the dataset {tmp_path}: " in msg
    assert "the model has no table 'usr'; its tables are: user, ad, item" in msg
    assert "sequence table 'item' cannot use data_parallel" in msg
