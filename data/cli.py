"""The command-line parser every shardrec tool uses: ``--world-size`` and ``--world_size`` alike.

The trainer's config keys are spelled with underscores (``--data.batch_size``), torchx
components take their Python parameter names (``--world_size``), and argparse tools
traditionally use hyphens (``--world-size``). So that no user has to remember which tool wants
which, :class:`ArgumentParser` accepts either spelling of each of its options: before
parsing, an ``--a_b`` (or ``--a_b=value``) that names no option of this parser but whose
hyphen spelling ``--a-b`` does is rewritten to it (and the other way round). Help shows the
hyphen spelling only. Arguments the parser does not know (a tool's ``--section.key=value``
config overrides) and everything after ``--`` are left alone.

It lives in ``data`` because that is the lowest layer: the converters and generators, the
planner, the trainer's export/predict and the benchmarks all import it.

Example:

>>> p = ArgumentParser(prog="tool")
>>> _ = p.add_argument("--world-size", type=int)
>>> p.parse_args(["--world_size", "4"]).world_size
4
>>> p.parse_args(["--world-size=4"]).world_size
4
>>> p.parse_known_args(["--world_size=2", "--data.batch_size=8"])
(Namespace(world_size=2), ['--data.batch_size=8'])
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, List, Optional, Sequence, Tuple


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` accepting ``--a-b`` and ``--a_b`` for every long option
    (sub-parsers made by ``add_subparsers`` are of this class too)."""

    def _respell(self, args: Sequence[str]) -> List[str]:
        known = self._option_string_actions
        out: List[str] = []
        for i, arg in enumerate(args):
            if arg == "--":  # positional arguments follow, untouched
                out.extend(args[i:])
                break
            if arg.startswith("--") and len(arg) > 2:
                name, eq, value = arg.partition("=")
                if name not in known:
                    for other in ("--" + name[2:].replace("_", "-"),
                                  "--" + name[2:].replace("-", "_")):
                        if other in known:
                            arg = other + eq + value
                            break
            out.append(arg)
        return out

    def parse_known_args(self, args: Optional[Sequence[str]] = None,  # type: ignore[override]
                         namespace: Optional[argparse.Namespace] = None
                         ) -> Tuple[argparse.Namespace, List[str]]:
        if args is None:
            args = sys.argv[1:]
        return super().parse_known_args(self._respell(list(args)), namespace)

    def add_subparsers(self, **kwargs: Any) -> Any:
        kwargs.setdefault("parser_class", ArgumentParser)
        return super().add_subparsers(**kwargs)
