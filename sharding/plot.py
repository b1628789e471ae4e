"""Per-rank memory by table as a PNG: one stacked bar per rank, one colour per table.

Uses matplotlib when it is installed (axes, labels, legend). Without it, a dependency-free
renderer draws the same stacked bars with numpy and writes the PNG with zlib; it has no
text, so :func:`plot_rank_memory` returns the colour legend for the caller to print.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any, Dict, List, Tuple

import numpy as np

GB = 1024**3

# Tableau-like palette, cycled when there are more tables than colours.
_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
            (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150),
            (197, 176, 213), (196, 156, 148)]


def _by_table(report: Dict[str, Any]) -> Tuple[List[str], np.ndarray]:
    """Tables (largest first) and bytes ``[num_tables, num_ranks]``."""
    ranks = report["ranks"]
    totals: Dict[str, int] = {}
    for r in ranks:
        for t, b in r["by_table"].items():
            totals[t] = totals.get(t, 0) + b
    tables = sorted(totals, key=lambda t: -totals[t])
    grid = np.zeros((len(tables), len(ranks)), dtype=np.float64)
    for j, r in enumerate(ranks):
        for i, t in enumerate(tables):
            grid[i, j] = r["by_table"].get(t, 0)
    return tables, grid


def plot_rank_memory(report: Dict[str, Any], path: str, title: str = "") -> List[str]:
    """Draw per-rank memory by table to ``path``; returns legend lines ("colour table")."""
    tables, grid = _by_table(report)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _png_bars(grid, path)
        return [f"#{r:02x}{g:02x}{b:02x} {t}"
                for t, (r, g, b) in zip(tables, (_PALETTE[i % len(_PALETTE)]
                                                 for i in range(len(tables))))]
    num_ranks = grid.shape[1]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * num_ranks + 3), 4.5))
    bottom = np.zeros(num_ranks)
    for i, t in enumerate(tables):
        color = tuple(c / 255 for c in _PALETTE[i % len(_PALETTE)])
        ax.bar(np.arange(num_ranks), grid[i] / GB, bottom=bottom, color=color, label=t,
               width=0.85)
        bottom += grid[i] / GB
    ax.set_xlabel("rank")
    ax.set_ylabel("GiB (weights + optimizer state)")
    ax.set_title(title or "per-rank embedding memory by table")
    ax.legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return []


def _png_bars(grid: np.ndarray, path: str, height: int = 300) -> None:
    """Stacked bars (tables x ranks) as an RGB PNG, white background, grey baseline."""
    num_tables, num_ranks = grid.shape
    bar, gap, margin = 8, 2, 10
    width = margin * 2 + num_ranks * (bar + gap)
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    top = grid.sum(axis=0).max() or 1.0
    scale = (height - 2 * margin) / top
    for j in range(num_ranks):
        x0 = margin + j * (bar + gap)
        y = height - margin
        for i in range(num_tables):
            h = int(round(grid[i, j] * scale))
            if h:
                img[y - h:y, x0:x0 + bar] = _PALETTE[i % len(_PALETTE)]
                y -= h
    img[height - margin, margin:width - margin] = (96, 96, 96)
    write_png(path, img)


def write_png(path: str, rgb: np.ndarray) -> None:
    """Write an ``[H, W, 3]`` uint8 image as a PNG (filter 0 on every row)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    png = (b"\x89PNG\r\n\x1a\n"
           + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6))
           + chunk(b"IEND", b""))
    with open(path, "wb") as fh:
        fh.write(png)
