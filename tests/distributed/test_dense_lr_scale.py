"""``[training.dense_lr_scale]``: the matched dense parameters take a scaled step, the others
the plain one, and the parameter groups survive a checkpoint round trip; patterns that match
nothing (or overlap) are config errors naming the key."""

from __future__ import annotations

from typing import Any, Dict, List

import pytest
import torch

from data.reader import ParquetReader
from data.schema import Schema
from sharding.dist import DistContext
from launch.spawn import run_ranks
from trainer.checkpoint import Checkpointer
from trainer.config import Config, ConfigError, load_config
from trainer.optim import dense_param_groups
from trainer.trainer import build_model, model_task, shard_and_optimize

LR = 1e-2
SCALE = 30.0


def _config(data_dir: str) -> Config:
    cfg = Config()
    cfg.data.path = data_dir
    cfg.model.name = "hstu"
    cfg.model.args = {"num_negatives": 8, "dropout": 0.0, "embedding_dim": 16}
    cfg.training.dense_optimizer = "adam"
    cfg.training.dense_lr = LR
    cfg.training.dense_lr_scale = {"rab_*": SCALE}
    cfg.sharding.tables = {"item": {"sharding_types": ["table_wise", "row_wise"]}}
    return cfg


def _step_and_reload(ctx: DistContext, data_dir: str, root: str) -> Dict[str, Any]:
    cfg = _config(data_dir)
    schema = Schema.load(data_dir)

    def build() -> Any:
        return shard_and_optimize(cfg, ctx, schema, build_model(cfg, schema))

    dmp, opt = build()
    named = dict(dmp.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    reader = ParquetReader(data_dir, "train", 32, prefetch=0, schema=schema,
                           transform=model_task(cfg, schema).batch_transform("train"))
    loss, _ = dmp(next(iter(reader)))
    loss.backward()
    opt.step()
    # Adam's first step moves every parameter with a gradient by ~lr (sign of the gradient).
    steps = {n: float((p.detach() - before[n]).abs().max()) for n, p in named.items()
             if p.grad is not None and p.dim() <= 2 and "embeddings" not in n}
    ck = Checkpointer(root, ctx.rank, ctx.world_size, keep_last=1)
    path = ck.save(1, dmp, opt, {"reader": {}}, cfg, dmp.plan)
    fresh, fresh_opt = build()
    ck.load(path, fresh, fresh_opt, fresh.plan, reset_optimizer=False)
    saved, loaded = opt.state_dict(), fresh_opt.state_dict()
    rab = [k for k in saved["state"] if k.rsplit(".", 1)[-1].startswith("rab_")]
    return {
        "steps": steps,
        "rab": rab,
        "state_equal": all(torch.equal(saved["state"][k]["exp_avg"], loaded["state"][k]["exp_avg"])
                           for k in rab),
        "loaded_lrs": sorted(g["lr"] for g in fresh_opt.param_groups if "lr" in g),
        "saved_lrs": sorted(g["lr"] for g in opt.param_groups if "lr" in g),
    }


def test_scaled_group_steps_and_survives_checkpoint(tiny_nextitem: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    (out,) = run_ranks(_step_and_reload, 1, tiny_nextitem, str(tmp_path / "ckpt"),
                       timeout_s=180)
    steps: Dict[str, float] = out["steps"]
    rab = {n: s for n, s in steps.items() if n.rsplit(".", 1)[-1].startswith("rab_")}
    rest = {n: s for n, s in steps.items() if n not in rab}
    assert len(rab) == 4 and len(rest) > 10, steps  # 2 layers x (rab_pos, rab_time)
    # The scaled parameters moved ~30x as far as the others on the same Adam step.
    assert min(rab.values()) > 0.5 * SCALE * LR and max(rab.values()) <= 1.01 * SCALE * LR, rab
    assert max(rest.values()) <= 1.01 * LR, rest
    assert len(out["rab"]) == 4 and out["state_equal"], out
    assert out["loaded_lrs"] == out["saved_lrs"] and SCALE * LR in out["saved_lrs"], out


def _params(*names: str) -> Dict[str, torch.Tensor]:
    return {n: torch.nn.Parameter(torch.zeros(1)) for n in names}


def test_param_groups_and_pattern_errors() -> None:
    params = _params("layers.0.rab_pos", "layers.0.rab_time", "layers.0.out.weight", "norm.bias")
    groups: List[Dict[str, Any]] = dense_param_groups(params, 0.1, {"rab_*": 3.0, "bias": 0.5})
    assert [len(g["params"]) for g in groups] == [1, 2, 1]
    assert "lr" not in groups[0] and groups[1]["lr"] == pytest.approx(0.3) \
        and groups[2]["lr"] == pytest.approx(0.05)
    assert groups[1]["params"][0] is params["layers.0.rab_pos"]
    assert dense_param_groups(params, 0.1, {}) == [{"params": list(params.values())}]
    with pytest.raises(ConfigError, match=r"training.dense_lr_scale.rab_bias: matches no dense "
                                          r"parameter.*rab_pos, rab_time"):
        dense_param_groups(params, 0.1, {"rab_bias": 2.0})
    with pytest.raises(ConfigError, match="layers.0.rab_pos matches several patterns"):
        dense_param_groups(params, 0.1, {"rab_*": 2.0, "*_pos": 2.0})
    with pytest.raises(ConfigError, match=r"training.dense_lr_scale.rab_\*: expected a positive "
                                          r"number, got -1"):
        load_config(None, ["--training.dense_lr_scale.rab_*=-1"])
    assert load_config(None, ["--training.dense_lr_scale.rab_*=30"]
                       ).training.dense_lr_scale == {"rab_*": 30}
