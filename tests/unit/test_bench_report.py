"""``bench.report`` renders ``RESULTS.md`` and every plot from the committed full results
(no benchmark is run: only the files' format and the rendering are checked)."""

from __future__ import annotations

import os

from bench.common import RESULTS_DIR
from bench.report import PLOTS, load_results, main, md_table

PNG = b"\x89PNG\r\n\x1a\n"


def test_report_from_committed_results(tmp_path) -> None:  # type: ignore[no-untyped-def]
    res = load_results(RESULTS_DIR, quick=False)
    # The suite's own results are committed with the report they produced.
    assert {"throughput", "lookups", "scaling"} <= set(res), sorted(res)
    assert main(["--out", str(tmp_path)]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    for heading in ("## Machine", "## Goals", "## Throughput", "## Lookups", "## Scaling"):
        assert heading in text, heading
    assert "Top-10 ops by self CPU time" in text  # the profiles are rendered
    for name in PLOTS:
        if name in res:
            png = tmp_path / f"{name}.png"
            assert png.read_bytes()[:8] == PNG, name
            assert os.path.getsize(png) < 200_000, name
            assert f"]({name}.png)" in text, name


def test_md_table_formats_and_escapes() -> None:
    table = md_table([{"a": 1234.5, "b": "x|y"}, {"a": 0.01234}], ["a", "b"])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1,234 | x\\|y |",
                                  "| 0.0123 |  |"]
