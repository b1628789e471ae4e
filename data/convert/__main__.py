"""``python -m data.convert <format> <inputs...> --out DIR [options]``.

Formats: ``criteo`` (Kaggle/Terabyte TSV), ``movielens`` (ML-100K/1M/10M/20M ratings),
``seqtxt`` (``user item [timestamp]`` lines), ``csv`` (any CSV/TSV/parquet with a spec).
Output: ``DIR/<split>/part-*.parquet`` + ``schema.json`` + ``meta.json`` (converter and
arguments recorded), written to a temporary directory and renamed at the end. Prints one
JSON line with the output directory and row counts.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from typing import Optional, Sequence

from data.convert import FORMATS
from data.convert.common import ConvertError
from data.schema import SchemaError

HELP = {
    "criteo": "Criteo Kaggle/Terabyte TSV (label, 13 integers, 26 hex categoricals)",
    "movielens": "MovieLens ratings (u.data, ratings.dat, ratings.csv) → sequential or ctr",
    "seqtxt": "'user item [timestamp]' lines in time order → sequential",
    "csv": "CSV/TSV/parquet with a JSON spec of label, dense and categorical columns",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data.convert",
                                     description="Convert raw data to a shardrec dataset.")
    sub = parser.add_subparsers(dest="format", required=True)
    for name in FORMATS:
        p = sub.add_parser(name, help=HELP[name], description=HELP[name])
        p.add_argument("inputs", nargs="+", help="input file(s)")
        p.add_argument("--out", required=True, help="dataset directory to create")
        p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
        p.add_argument("--rows-per-file", type=int, default=1_000_000,
                       help="rows per parquet shard (default 1000000)")
        p.add_argument("--row-group-rows", type=int, default=None,
                       help="rows per row group, the unit dealt to ranks (default: from each "
                            "split's row count, so up to 8 ranks get even shares; at most "
                            "65536)")
        p.add_argument("--compression", default="lz4",
                       choices=("lz4", "snappy", "zstd", "gzip", "none"),
                       help="parquet compression (default lz4: the fastest to decode)")
        p.add_argument("--skip-bad-lines", type=int, default=0,
                       help="drop up to N malformed lines instead of failing (default 0)")
        p.add_argument("--no-progress", dest="progress", action="store_false",
                       help="no progress bar / progress log lines")
        importlib.import_module(f"data.convert.{name}").add_arguments(p)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    module = importlib.import_module(f"data.convert.{ns.format}")
    try:
        meta = module.convert(ns.inputs, ns.out, ns)
    except (ConvertError, SchemaError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": ns.out, "rows": meta["rows"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
