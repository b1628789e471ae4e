"""``python -m data.synth KIND --out DIR [--preset NAME] [--seed S] [--flag value ...]``: one
subcommand per generator of :mod:`data.synth`; every field of a generator's argument
dataclass is a ``--flag``. Prints the dataset directory and its oracle metrics as JSON."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Type

from data.cli import ArgumentParser
from data.synth.ctr import PRESETS, CTRSynthArgs, generate_ctr
from data.synth.ctr2 import CTR2_PRESETS, MultiTaskSynthArgs, generate_ctr2
from data.synth.ctr_seq import SEQ_PRESETS, SeqCTRSynthArgs, generate_ctr_seq
from data.synth.next_item import NEXT_ITEM_PRESETS, NextItemSynthArgs, generate_next_item
from data.synth.retrieval import RETRIEVAL_PRESETS, RetrievalSynthArgs, generate_retrieval


def _int_list(s: str) -> List[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}")


@dataclass(frozen=True)
class _Generator:
    """One ``python -m data.synth KIND`` subcommand: its argument dataclass (every field
    becomes a ``--flag``), named presets, writer, and the oracle keys it prints."""

    help: str
    args_cls: Type[Any]
    presets: Dict[str, Dict[str, object]]
    generate: Callable[..., Dict[str, object]]
    printed: Callable[[Dict[str, Any]], Dict[str, Any]]


def _generators() -> Dict[str, _Generator]:
    def auc(oracle: Dict[str, Any]) -> Dict[str, Any]:
        return {"oracle_auc": oracle["auc"]}

    return {
        "ctr": _Generator("CTR dataset from a planted FM-like click model", CTRSynthArgs,
                          PRESETS, generate_ctr, auc),
        "ctr2": _Generator("two-task dataset: click, and conversion only after a click "
                           "(CTCVR = CTR x CVR; data.synth.ctr2); presets: the ctr sizes "
                           "and the ESMM setting esmm_ci", MultiTaskSynthArgs,
                           {**PRESETS, **CTR2_PRESETS}, generate_ctr2,
                           lambda o: {k: v for k, v in o.items() if k.startswith("auc_")}),
        "ctr_seq": _Generator("CTR dataset whose main signal is in a behaviour sequence "
                              "(data.synth.ctr_seq)", SeqCTRSynthArgs, SEQ_PRESETS,
                              generate_ctr_seq, auc),
        "seq": _Generator("next-item sessions from a planted cluster Markov chain with an "
                          "oracle HR@10 (data.synth.next_item)", NextItemSynthArgs,
                          NEXT_ITEM_PRESETS, generate_next_item,
                          lambda o: {"oracle_hr@10": o["hr@10"],
                                     "oracle_ndcg@10": o["ndcg@10"],
                                     "time_blind_oracle_hr@10": o["time_blind_hr@10"]}),
        "retrieval": _Generator("user/item retrieval rows from planted user (multi-interest) "
                                "and item vectors with an oracle recall@K "
                                "(data.synth.retrieval)", RetrievalSynthArgs,
                                RETRIEVAL_PRESETS, generate_retrieval,
                                lambda o: {"oracle_recall@50": o["recall@50"],
                                           "oracle_ndcg@10": o["ndcg@10"]}),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = ArgumentParser(prog="python -m data.synth",
                            description="Generate synthetic datasets with an oracle.")
    sub = parser.add_subparsers(dest="kind", required=True)
    generators = _generators()
    for kind, gen in generators.items():
        p = sub.add_parser(kind, help=gen.help)
        p.add_argument("--out", required=True, help="dataset directory to create")
        p.add_argument("--preset", choices=sorted(gen.presets), help="start from a named size")
        p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
        defaults = gen.args_cls()
        for f in dataclasses.fields(gen.args_cls):
            default = getattr(defaults, f.name)
            flag = "--" + f.name.replace("_", "-")
            if isinstance(default, (list, tuple)):
                p.add_argument(flag, type=_int_list, default=None,
                               help=f"comma-separated ints (default {default})")
            else:
                p.add_argument(flag, type=type(default), default=None, help=f"default {default}")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    gen = generators[ns.kind]
    kwargs: Dict[str, object] = dict(gen.presets[ns.preset]) if ns.preset else {}
    kwargs.update({f.name: getattr(ns, f.name) for f in dataclasses.fields(gen.args_cls)
                   if getattr(ns, f.name) is not None})
    try:
        meta = gen.generate(ns.out, gen.args_cls(**kwargs), overwrite=ns.overwrite)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": ns.out, **gen.printed(meta["oracle"])}))  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
