"""Consistent command lines: both flag spellings in every tool, ``python -m trainer`` alone,
``--config NAME``, the console scripts and ``make help``."""

from __future__ import annotations

import configparser
import importlib
import inspect
import os
import re
import subprocess

import pytest

from data.cli import ArgumentParser

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_both_spellings_of_every_option() -> None:
    p = ArgumentParser(prog="tool")
    p.add_argument("--world-size", type=int)
    p.add_argument("--local_world_size", type=int)
    p.add_argument("--out")
    for argv in (["--world-size", "4"], ["--world_size", "4"], ["--world_size=4"]):
        assert p.parse_args(argv).world_size == 4
    for argv in (["--local-world-size", "2"], ["--local_world_size=2"]):
        assert p.parse_args(argv).local_world_size == 2
    # Unknown options (a tool's --section.key=value overrides) and positionals after `--`
    # pass through untouched.
    ns, rest = p.parse_known_args(["--world_size", "3", "--data.batch_size=8",
                                   "--sharding.tables.t_1.lr", "0.1"])
    assert ns.world_size == 3 and rest == ["--data.batch_size=8", "--sharding.tables.t_1.lr",
                                           "0.1"]
    q = ArgumentParser(prog="tool")
    q.add_argument("--out-dir")
    q.add_argument("files", nargs="*")
    assert q.parse_args(["--", "--out_dir"]).files == ["--out_dir"]
    with pytest.raises(SystemExit):
        q.parse_args(["--nope_x", "1"])


def test_module_example() -> None:
    import doctest

    import data.cli

    result = doctest.testmod(data.cli)
    assert result.attempted > 0 and result.failed == 0


def test_subcommands_take_both_spellings() -> None:
    from data.convert.__main__ import build_parser

    for flag in ("--rows-per-file", "--rows_per_file"):
        ns = build_parser().parse_args(["seqtxt", "in.txt", "--out", "o", flag, "7",
                                        "--max_len=5"])
        assert ns.rows_per_file == 7 and ns.max_len == 5


def test_plan_module_and_component_spellings() -> None:
    """`sharding.plan --world_size 4` used to fail with "required: --world-size"; every
    parameter of the torchx `plan` component is a flag of the module in both spellings."""
    from launch.components import plan
    from sharding.plan import build_parser, parse_args

    ns, rest = parse_args(["--config", "c.toml", "--world_size", "4", "--local-world-size",
                           "2", "--compute_device", "cpu", "--hbm_gb", "8", "--batch_size=16"])
    assert (ns.world_size, ns.local_world_size, ns.compute_device, ns.hbm_gb,
            ns.batch_size, rest) == (4, 2, "cpu", 8.0, 16, [])
    module_flags = {a.dest for a in build_parser()._actions}
    params = set(inspect.signature(plan).parameters) - {"cpu", "memMB", "image", "name", "env"}
    assert params <= module_flags, params - module_flags


def test_every_tool_uses_the_shared_parser() -> None:
    """A new tool that builds a plain argparse parser would accept only one spelling."""
    offenders = []
    for top in ("data", "models", "sharding", "trainer", "launch", "bench"):
        for root, _, files in os.walk(os.path.join(REPO, top)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(root, f)
                    with open(path) as fh:
                        if "argparse.ArgumentParser(" in fh.read():
                            offenders.append(os.path.relpath(path, REPO))
    assert not offenders, f"use data.cli.ArgumentParser in {offenders}"


def test_trainer_alone_prints_usage_and_builtin_configs(capsys: pytest.CaptureFixture) -> None:
    from trainer.__main__ import main
    from trainer.config import builtin_configs

    assert main([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m trainer --config")
    names = builtin_configs()
    assert "deepfm_synthetic" in names and "hstu_ml1m" in names
    assert all(f"  {n}\n" in out for n in names)


def test_config_by_name(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from trainer.config import ConfigError, find_config, load_config

    builtin = os.path.join(REPO, "launch", "configs", "deepfm_synthetic.toml")
    assert os.path.samefile(find_config("deepfm_synthetic"), builtin)
    assert os.path.samefile(find_config("deepfm_synthetic.toml"), builtin)
    assert load_config("sasrec_synthetic").model.name == "sasrec"
    own = tmp_path / "deepfm_synthetic.toml"  # a path that exists wins over the built-in
    own.write_text('[training]\nsteps = 3\n')
    assert load_config(str(own)).training.steps == 3
    with pytest.raises(ConfigError, match="nope not found.*built-in config: .*deepfm_synthetic"):
        find_config("nope")
    from launch.components import plan, train

    app = train("deepfm_synthetic")  # the torchx components accept a built-in name too
    assert app.roles[0].args[-1].endswith("-m trainer --config deepfm_synthetic")
    assert plan("deepfm_synthetic", world_size=4, local_world_size=2).roles[0].args[2:4] == [
        "--config", "deepfm_synthetic"]


def test_console_scripts_name_real_entry_points() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    scripts = dict(line.split("=", 1) for line in
                   cfg["options.entry_points"]["console_scripts"].strip().splitlines())
    scripts = {k.strip(): v.strip() for k, v in scripts.items()}
    for name in ("train", "convert", "synth", "plan", "export", "predict", "plot", "serve"):
        assert f"shardrec-{name}" in scripts
    for name, target in scripts.items():
        module, func = target.split(":")
        if module == "trainer.serve" and not os.path.isfile(os.path.join(REPO, "trainer",
                                                                         "serve.py")):
            continue  # trainer.serve comes with another branch (issue 18); strict once merged
        assert callable(getattr(importlib.import_module(module), func)), name
    assert "configs/*.toml" in cfg["options.package_data"]["launch"]


def test_make_help_lists_every_target() -> None:
    with open(os.path.join(REPO, "Makefile")) as fh:
        text = fh.read()
    phony = re.search(r"^\.PHONY:(.*)$", text, re.M).group(1).split()  # type: ignore[union-attr]
    out = subprocess.run(["make", "-s", "-C", REPO, "help"], capture_output=True, text=True,
                         check=True).stdout
    listed = re.findall(r"^make (\S+)", out, re.M)
    assert sorted(listed) == sorted(phony)
