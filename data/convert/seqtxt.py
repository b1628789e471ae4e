"""``user item [timestamp]`` lines → sequential dataset (one row per user).

The format many sequential-recommendation papers publish (e.g. SASRec's ``ml-1m.txt``):
one interaction per line, fields separated by ``--delimiter`` (a space by default), in time
order. Users and items may be any tokens; they are renumbered densely (items ``1..N``, users
``1..U``) in the order of their stable 64-bit hash. Without a timestamp column the line order
is the time. Output and split as in ``data.convert.sequential`` (no action sequence).
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, List, Sequence

import numpy as np
import pyarrow.compute as pc

from data.convert.common import (DEFAULT_SEQ_EMBEDDING_DIM, BadLines, ConvertError,
                                 DatasetWriter, Progress, check_inputs, hash64)
from data.convert.sequential import write_sequences
from data.convert.text import integer_column, read_delimited, report_bad_rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--delimiter", default=" ", help="field separator (default: a space)")
    p.add_argument("--timestamps", choices=("auto", "yes", "no"), default="auto",
                   help="whether lines have a third timestamp field (auto: from the first line)")
    p.add_argument("--max-len", type=int, default=200, help="max_len of item_seq (default 200)")
    p.add_argument("--embedding-dim", type=int, default=DEFAULT_SEQ_EMBEDDING_DIM,
                   help=f"embedding width of every table, a multiple of 4 (default "
                        f"{DEFAULT_SEQ_EMBEDDING_DIM})")
    p.add_argument("--min-interactions", type=int, default=2,
                   help="drop users with fewer interactions (default 2)")


def _has_timestamps(path: str, delimiter: str, mode: str) -> bool:
    if mode != "auto":
        return mode == "yes"
    with open(path, "rb") as fh:
        first = fh.readline().decode("utf-8", "replace").strip()
    fields = first.split(delimiter)
    if len(fields) not in (2, 3):
        raise ConvertError(f"{path}:1: expected 'user{delimiter}item[{delimiter}timestamp]', "
                           f"got {len(fields)} fields ({first[:80]!r}); check --delimiter")
    return len(fields) == 3


def convert(inputs: Sequence[str], out: str, args: argparse.Namespace) -> Dict[str, Any]:
    inputs = check_inputs(inputs)
    if len(args.delimiter) != 1:
        raise ConvertError(f"--delimiter must be one character, got {args.delimiter!r}")
    bad_lines = BadLines(args.skip_bad_lines)
    with_ts = _has_timestamps(inputs[0], args.delimiter, args.timestamps)
    names = ["user", "item"] + (["ts"] if with_ts else [])
    users: List[np.ndarray] = []
    items: List[np.ndarray] = []
    times: List[np.ndarray] = []
    order = 0
    progress = Progress(inputs, args.progress, desc="seqtxt")
    for path in inputs:
        for first_row, batch, line_map in read_delimited(path, names, args.delimiter, bad_lines,
                                                         progress=progress):
            user_col, item_col = batch.column(0), batch.column(1)
            bad = np.asarray(pc.or_(pc.equal(user_col, ""), pc.equal(item_col, "")), bool)
            if with_ts:
                ts, bad_ts = integer_column(batch.column(2), empty=-1)
                bad_ts |= ts < 0
            else:
                ts, bad_ts = order + np.arange(batch.num_rows, dtype=np.int64), np.zeros(
                    batch.num_rows, bool)
            order += batch.num_rows

            def problem(i: int) -> str:
                if bad_ts[i]:
                    return f"field 3 (timestamp): expected a non-negative integer, got " \
                           f"{batch.column(2)[i].as_py()!r}"
                return "expected non-empty user and item fields"

            keep = report_bad_rows(path, bad | bad_ts, first_row, line_map, batch, problem,
                                   bad_lines)
            users.append(hash64(user_col)[keep])
            items.append(hash64(item_col, salt=1)[keep])
            times.append(ts[keep])
    progress.close()
    if not users:
        raise ConvertError(f"no interactions in {list(inputs)}")
    meta: Dict[str, Any] = {
        "converter": "seqtxt",
        "inputs": list(inputs),
        "args": {k: v for k, v in vars(args).items() if k not in ("inputs", "func")},
        "timestamps": "from the file" if with_ts else "line order",
        "bad_lines_skipped": bad_lines.count,
    }
    with DatasetWriter(out, args.overwrite, args.rows_per_file, args.row_group_rows,
                       args.compression) as writer:
        schema, facts = write_sequences(writer, np.concatenate(users), np.concatenate(items),
                                        np.concatenate(times), None, args.max_len,
                                        args.embedding_dim, args.min_interactions)
        meta.update(facts)
        return writer.finish(schema, meta)
