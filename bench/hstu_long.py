"""The long-history sections of :mod:`bench.hstu_attention` on their own: semi-local against
full jagged attention at ``L`` up to 16,384, and the cross-rank step-time spread of plain vs
length-balanced batches.

``python -m bench.hstu_long [--quick] [--repeats N] [--full IMPL,...] [--threads N]
[--json PATH]``

Same workloads, contenders and measurements as the full benchmark's ``long-16384`` and
length-balanced tables (see that module's docstring): one HSTU layer (D = 256, 4 heads,
``n`` = 16,384, time bias on) on a batch of lengths 16,384 / 4,096 / 1,024 / 256, forward +
backward, each contender in a fresh interpreter so its peak memory is its own; then the
balanced-batches simulation (4 ranks, 8 rows a batch, log-normal lengths capped at 4,096).
For a machine where the whole benchmark (the padded long-tail run, the profiles) takes too
long; ``--repeats 1`` times one step after the warm-up.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional, Sequence

from bench.common import format_table, write_results
from bench.hstu_attention import (DIM, HEADS, LONG, LONG_QUICK, QUICK, print_long_sections,
                                  run_contender, worker)
from data.cli import ArgumentParser


FULL = ("pytorch_jagged", "compiled_jagged")


def long_rows(quick: bool, repeats: int, full: Sequence[str] = FULL,
              threads: int = 0) -> List[Dict[str, Any]]:
    """Time and peak memory of full (``full``: ``pytorch_jagged``, ``compiled_jagged``) and
    semi-local attention on the long workload; ``threads`` intra-op threads (0: torch's)."""
    long = LONG_QUICK if quick else LONG
    dim, heads = (QUICK["dim"], QUICK["heads"]) if quick else (DIM, HEADS)
    name = f"long-{long['max_len']}"
    rows = []
    for impl in (*full, "semi_local"):
        spec = {"workload": name, "impl": impl, "lengths": long["lengths"], "dim": dim,
                "heads": heads, "max_len": long["max_len"], "warmup": 1,
                "repeats": 1 if quick else repeats, "window": long["window"],
                "global_tokens": long["global"], "profile": False, "threads": threads}
        res = worker(spec) if quick else run_contender(spec)
        rows.append({"workload": name, "impl": impl, **res,
                     "peak_MB": res["peak_bytes"] / 2**20})
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = ArgumentParser(prog="python -m bench.hstu_long", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed steps per contender after one warm-up (median; default 3)")
    p.add_argument("--full", default=",".join(FULL),
                   help="the full-attention contenders, comma-separated (default "
                        f"{','.join(FULL)}; pytorch_jagged takes minutes a step at L = 16,384 "
                        "on a loaded machine)")
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op threads of each contender (default: torch's)")
    p.add_argument("--json", help="also write the results here")
    ns = p.parse_args(argv)
    full = [f for f in ns.full.split(",") if f]
    if ns.repeats < 1:
        p.error(f"--repeats {ns.repeats} must be >= 1")
    if not full or any(f not in FULL for f in full):
        p.error(f"--full {ns.full!r}: a comma-separated subset of {','.join(FULL)}")
    if ns.threads < 0:
        p.error(f"--threads {ns.threads} must be >= 0")
    long = LONG_QUICK if ns.quick else LONG
    rows = long_rows(ns.quick, ns.repeats, full, ns.threads)
    print(format_table(rows, ["workload", "impl", "layer_s", "attention_s", "layer_cpu_s",
                              "attention_cpu_s", "peak_MB"]))
    semi, spread = print_long_sections(rows, rows[0]["workload"], long, ns.quick)
    write_results("hstu_long_quick" if ns.quick else "hstu_long",
                  {"quick": ns.quick, "results": rows, "semi_local": semi,
                   "balance_spread": spread}, ns.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
