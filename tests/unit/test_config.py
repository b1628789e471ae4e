"""Config: precedence CLI > file > defaults; every bad entry reported with the fix."""

from __future__ import annotations

import tomllib

import pytest

from trainer.checkpoint import model_changes
from trainer.config import Config, ConfigError, help_text, load_config, parse_value, to_toml
from trainer.validation import load_checked_config


def _write(tmp_path, text: str) -> str:  # type: ignore[no-untyped-def]
    p = tmp_path / "c.toml"
    p.write_text(text)
    return str(p)


def test_precedence_cli_over_file_over_defaults(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = _write(tmp_path, "[data]\nbatch_size = 128\n[training]\nsteps = 7\ndense_lr = 0.5\n")
    cfg = load_config(path, ["--training.steps=9", "--data.path", "x/y"])
    assert cfg.training.steps == 9          # CLI beats file
    assert cfg.data.batch_size == 128       # file beats default
    assert cfg.training.dense_lr == 0.5
    assert cfg.data.path == "x/y"           # bare strings need no quotes
    assert cfg.training.log_every == Config().training.log_every  # default


def test_unknown_key_lists_valid_keys(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = _write(tmp_path, "[training]\nstepz = 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "unknown key 'training.stepz'" in msg
    assert "valid keys in [training]:" in msg and "steps" in msg


def test_unknown_section_and_all_errors_at_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = _write(tmp_path, "[trainin]\nsteps = 3\n[data]\nbatch_size = \"big\"\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, ["--dist.backend=mpi"])
    msg = str(e.value)
    assert "unknown section [trainin]; valid sections: model, data, training" in msg
    assert "data.batch_size: expected an integer, got 'big'" in msg
    assert "dist.backend: 'mpi' is not one of 'auto', 'gloo', 'nccl'" in msg


def test_wrong_types(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="training.dense_lr: expected a number, got 'fast'"):
        load_config(None, ["--training.dense_lr=fast"])
    with pytest.raises(ConfigError, match="data.shuffle: expected true or false"):
        load_config(None, ["--data.shuffle=3"])
    with pytest.raises(ConfigError, match=r"model.args.deep_dims\[1\]: expected an integer"):
        load_checked_config(None, ["--model.args.deep_dims=[64, \"x\"]"])


def test_model_args_checked_against_model(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # The trainer's validation step checks [model] against the registry; parsing alone
    # imports no model and accepts any name and args.
    with pytest.raises(ConfigError, match="unknown key 'model.args.depth'.*deep_dims"):
        load_checked_config(None, ["--model.args.depth=3"])
    with pytest.raises(ConfigError, match="model.name: unknown model 'xgb'; known models"):
        load_checked_config(None, ["--model.name=xgb"])
    assert load_config(None, ["--model.name=xgb"]).model.name == "xgb"
    cfg = load_checked_config(None, ["--model.args.deep_dims=[32, 16]",
                                     "--model.args.field_scale=2"])
    assert cfg.model.args == {"deep_dims": [32, 16], "field_scale": 2.0}
    assert isinstance(cfg.model.args["field_scale"], float)  # coerced to the args' type


def test_parse_and_model_problems_in_one_error() -> None:
    with pytest.raises(ConfigError) as e:
        load_checked_config(None, ["--data.batch_size=0", "--model.args.depth=3"])
    msg = str(e.value)
    assert msg.startswith("invalid config:")
    assert "data.batch_size must be > 0" in msg and "unknown key 'model.args.depth'" in msg


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match="--section.key=value"):
        load_config(None, ["steps=3"])


def test_resolved_config_round_trips(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # data.path names no dataset, so the made-up table below is not checked against a schema
    # (a `make demo` dataset at the default path must not change this test).
    cfg = load_config(None, ["--training.steps=5", "--model.args.deep_dims=[8]",
                             "--training.dense_lr_scale.rab_*=30",
                             f"--data.path={tmp_path / 'no_dataset'}"])
    cfg.sharding.tables = {"user.id": {"sharding_types": ["row_wise"]}}
    text = to_toml(cfg)
    assert '"rab_*" = 30' in text and '[sharding.tables."user.id"]' in text
    tomllib.loads(text)
    again = load_config(_write(tmp_path, text))
    assert again == cfg


def test_parse_value_and_help() -> None:
    assert parse_value("3") == 3 and parse_value("1e-3") == 1e-3
    assert parse_value("true") is True and parse_value("[1, 2]") == [1, 2]
    assert parse_value("runs/x") == "runs/x"
    text = help_text()
    for key in ("--data.batch_size", "--training.sparse_optimizer", "--dist.backend",
                "--model.name", "--sharding.storage_reservation"):
        assert key in text


def test_model_changes_against_a_checkpoint_config(tmp_path) -> None:  # type: ignore[no-untyped-def]
    saved = load_config(None, ["--model.name=hstu", "--model.args.num_heads=1",
                               "--model.args.dropout=0.1"])
    (tmp_path / "config.toml").write_text(to_toml(saved))
    assert model_changes(str(tmp_path), saved) == []
    now = load_config(None, ["--model.name=hstu", "--model.args.num_heads=2",
                             "--model.args.temperature=0.1"])
    assert model_changes(str(tmp_path), now) == [
        "model.args.dropout: 0.1 -> 'unset'",
        "model.args.num_heads: 1 -> 2",
        "model.args.temperature: 'unset' -> 0.1",
    ]
    assert model_changes(str(tmp_path / "missing"), now) == []  # older checkpoints: no config
