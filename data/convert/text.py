"""Streaming reader of delimited text files (TSV/CSV, optionally gzip/bz2) in bounded memory.

:func:`read_delimited` yields Arrow record batches of string columns, a block
(``block_size`` bytes, 4 MiB by default) at a time, through pyarrow's streaming CSV reader.
pyarrow reads some blocks ahead, so memory is a few dozen blocks whatever the file size (a
1M-row Criteo file converts in ~0.35 GB RSS, the same as a 200k-row one in steady state;
16 MiB blocks needed ~0.55 GB).
Lines with the wrong number of fields are counted against ``BadLines`` (``--skip-bad-lines``)
with their line number; :class:`LineMap` turns a batch row back into its line number so a
converter's value checks can report lines too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from data.convert.common import BadLines, ConvertError, Progress

_COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".lz4": "lz4"}


@dataclass
class LineMap:
    """Maps 0-based indices of the rows kept so far in a file to 1-based line numbers."""

    first_line: int  # line number of the first data row (2 when there is a header)
    skipped: List[int] = field(default_factory=list)  # line numbers of dropped lines, sorted

    def lines(self, rows: np.ndarray) -> np.ndarray:
        base = np.asarray(rows, dtype=np.int64) + self.first_line
        if not self.skipped:
            return base
        skipped = np.asarray(self.skipped, dtype=np.int64)
        lines = base
        # Each dropped line at or before a row's line pushes it one further; iterate to the
        # fixpoint (at most len(skipped) rounds, usually one or two).
        for _ in range(len(skipped) + 1):
            new = base + np.searchsorted(skipped, lines, side="right")
            if np.array_equal(new, lines):
                break
            lines = new
        return lines


def read_delimited(path: str, column_names: Sequence[str], delimiter: str,
                   bad_lines: BadLines, header: bool = False,
                   block_size: int = 4 << 20, progress: Optional[Progress] = None,
                   quoted: bool = False) -> Iterator[Tuple[int, pa.RecordBatch, LineMap]]:
    """Yields ``(first kept row index, batch of string columns, line map)`` for ``path``.

    Every column is read as a non-null string (empty fields are ``""``) so converters decide
    what "missing" means and can report unparsable values with their line number.
    ``quoted`` parses RFC-4180 quoting (``"a,b"`` is one field ``a,b``, ``""`` inside quotes
    is one ``"``, quoted fields may span lines — line numbers then count records); without
    it quotes are ordinary characters (Criteo and ``user item ts`` files have none). Read and
    decompression errors (a truncated ``.gz``) raise :class:`ConvertError` naming
    ``path:line``.
    """
    if os.path.getsize(path) == 0:
        raise ConvertError(f"{path}: empty file (0 bytes); remove it from the inputs")
    line_map = LineMap(first_line=2 if header else 1)
    ncols = len(column_names)

    failure: List[ConvertError] = []

    def on_invalid(row: "pacsv.InvalidRow") -> str:
        line = row.number if row.number is not None else None
        try:
            bad_lines.add(path, line,
                          f"expected {row.expected_columns} fields separated by "
                          f"{delimiter!r}, found {row.actual_columns}", row.text)
        except ConvertError as e:
            # pyarrow swallows exceptions raised in the handler: keep ours, raise it below.
            failure.append(e)
            return "error"
        if line is not None:
            line_map.skipped.append(line)
            line_map.skipped.sort()
        return "skip"

    raw = pa.OSFile(path, "rb")
    ext = os.path.splitext(path)[1].lower()
    stream = pa.CompressedInputStream(raw, _COMPRESSION[ext]) if ext in _COMPRESSION else raw
    try:
        reader = pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(column_names=list(column_names),
                                           skip_rows=1 if header else 0,
                                           block_size=block_size, use_threads=False),
            parse_options=pacsv.ParseOptions(delimiter=delimiter,
                                             quote_char='"' if quoted else False,
                                             double_quote=quoted, newlines_in_values=quoted,
                                             invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in column_names},
                strings_can_be_null=False, quoted_strings_can_be_null=False),
        )
    except (pa.ArrowInvalid, OSError) as e:
        raw.close()
        if failure:
            raise failure[0] from None
        raise ConvertError(f"{path}:{line_map.first_line}: cannot read as {ncols} fields "
                           f"separated by {delimiter!r} ({e}){_hint(ext)}") from None
    row = 0
    last_pos = 0
    try:
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except (pa.ArrowInvalid, OSError) as e:
                if failure:
                    raise failure[0] from None
                line = int(line_map.lines(np.array([row]))[0])
                raise ConvertError(f"{path}:{line}: cannot read on from this line ({row} rows "
                                   f"read; {e}){_hint(ext)}") from None
            if progress is not None:
                pos = raw.tell()
                progress.update(pos - last_pos)
                last_pos = pos
            yield row, batch, line_map
            row += batch.num_rows
    finally:
        if progress is not None:
            progress.update(os.path.getsize(path) - last_pos)
        raw.close()


def _hint(ext: str) -> str:
    return f" — a truncated or corrupt {ext} file?" if ext in _COMPRESSION else ""


def integer_column(col: pa.Array, empty: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """(int64 values [N], bad mask [N]) of a string column; empty strings become ``empty``.
    At most 18 significant digits, so every accepted value fits int64 (a 20-digit value is a
    bad row naming its line, not an overflow inside the cast)."""
    is_empty = pc.equal(col, "")
    ok = pc.or_(is_empty, pc.match_substring_regex(col, r"^\s*[-+]?0*[0-9]{1,18}\s*$"))
    bad = ~np.asarray(ok, dtype=bool)
    cleaned = pc.if_else(pc.or_(is_empty, pa.array(bad)), str(empty), pc.utf8_trim_whitespace(col))
    return np.asarray(pc.cast(cleaned, pa.int64()), dtype=np.int64), bad


def float_column(col: pa.Array, empty: float = 0.0) -> Tuple[np.ndarray, np.ndarray]:
    """(float64 values [N], bad mask [N]) of a string column; empty strings become ``empty``;
    unparsable text, NaN and inf are bad."""
    is_empty = pc.equal(col, "")
    ok = pc.or_(is_empty, pc.match_substring_regex(
        col, r"^\s*[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?\s*$"))
    bad = ~np.asarray(ok, dtype=bool)
    cleaned = pc.if_else(pc.or_(is_empty, pa.array(bad)), str(empty), pc.utf8_trim_whitespace(col))
    values = np.asarray(pc.cast(cleaned, pa.float64()), dtype=np.float64)
    bad |= ~np.isfinite(values)
    return np.where(bad, empty, values), bad


def report_bad_rows(path: str, bad: np.ndarray, first_row: int, line_map: LineMap,
                    batch: pa.RecordBatch, problem: Callable[[int], str],
                    bad_lines: BadLines) -> np.ndarray:
    """Count the rows flagged in ``bad`` as malformed lines (raising once the budget is
    spent, naming the line); returns the mask of rows to keep. Bad rows are rare, so the
    per-bad-row loop is off the hot path."""
    idx = np.flatnonzero(bad)
    if idx.size == 0:
        return np.ones(bad.size, dtype=bool)
    lines = line_map.lines(first_row + idx)
    for i, line in zip(idx.tolist(), lines.tolist()):
        text = "\t".join(str(batch.column(c)[i].as_py()) for c in range(batch.num_columns))
        bad_lines.add(path, int(line), problem(i), text)
    return ~bad
