"""Per-rank memory by table as a PNG: one stacked bar per rank, one colour per table.

Uses matplotlib when it is installed. Without it, a dependency-free renderer draws the same
stacked bars with numpy (title, GiB axis, rank numbers and a legend in a 3x5 pixel font) and
writes the PNG with zlib; :func:`plot_rank_memory` then also returns the colour legend as
text for the caller to print.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any, Dict, List, Tuple

import numpy as np

GB = 1024**3

# Tableau-like palette; more tables get generated hues (:func:`_color`).
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


def _color(i: int) -> Tuple[int, int, int]:
    """The palette, then golden-ratio hues so that every table keeps its own colour."""
    if i < len(_PALETTE):
        return _PALETTE[i]
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.55, 0.85)
    return int(r * 255), int(g * 255), int(b * 255)


def plot_rank_memory(report: Dict[str, Any], path: str, title: str = "") -> str:
    """Draw per-rank memory by table to ``path``; returns which renderer drew it."""
    tables, grid = _by_table(report)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _png_bars(grid, tables, path, title or "per-rank embedding memory by table")
        return "built-in renderer; matplotlib is not installed"
    num_ranks = grid.shape[1]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * num_ranks + 3), 4.5))
    bottom = np.zeros(num_ranks)
    for i, t in enumerate(tables):
        color = tuple(c / 255 for c in _color(i))
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
    return "matplotlib"


# A 3x5 pixel font (lower case, digits, a little punctuation) for the matplotlib-free
# renderer: enough for a title, axis numbers and the table names of the legend.
_GLYPHS: Dict[str, List[str]] = {
"0": ["###","#.#","#.#","#.#","###"], "1": [".#.","##.",".#.",".#.","###"],
"2": ["###","..#","###","#..","###"], "3": ["###","..#",".##","..#","###"],
"4": ["#.#","#.#","###","..#","..#"], "5": ["###","#..","###","..#","###"],
"6": ["###","#..","###","#.#","###"], "7": ["###","..#","..#",".#.",".#."],
"8": ["###","#.#","###","#.#","###"], "9": ["###","#.#","###","..#","###"],
"a": [".#.","#.#","###","#.#","#.#"], "b": ["##.","#.#","##.","#.#","##."],
"c": [".##","#..","#..","#..",".##"], "d": ["##.","#.#","#.#","#.#","##."],
"e": ["###","#..","##.","#..","###"], "f": ["###","#..","##.","#..","#.."],
"g": [".##","#..","#.#","#.#",".##"], "h": ["#.#","#.#","###","#.#","#.#"],
"i": ["###",".#.",".#.",".#.","###"], "j": ["..#","..#","..#","#.#",".#."],
"k": ["#.#","#.#","##.","#.#","#.#"], "l": ["#..","#..","#..","#..","###"],
"m": ["#.#","###","###","#.#","#.#"], "n": ["##.","#.#","#.#","#.#","#.#"],
"o": [".#.","#.#","#.#","#.#",".#."], "p": ["##.","#.#","##.","#..","#.."],
"q": [".#.","#.#","#.#","##.",".##"], "r": ["##.","#.#","##.","#.#","#.#"],
"s": [".##","#..",".#.","..#","##."], "t": ["###",".#.",".#.",".#.",".#."],
"u": ["#.#","#.#","#.#","#.#","###"], "v": ["#.#","#.#","#.#","#.#",".#."],
"w": ["#.#","#.#","###","###","#.#"], "x": ["#.#","#.#",".#.","#.#","#.#"],
"y": ["#.#","#.#",".#.",".#.",".#."], "z": ["###","..#",".#.","#..","###"],
".": ["...","...","...","...",".#."], ":": ["...",".#.","...",".#.","..."],
"/": ["..#","..#",".#.","#..","#.."], "%": ["#.#","..#",".#.","#..","#.#"],
"-": ["...","...","###","...","..."], "_": ["...","...","...","...","###"],
"(": [".#.","#..","#..","#..",".#."], ")": [".#.","..#","..#","..#",".#."],
",": ["...","...","...",".#.","#.."], " ": ["...","...","...","...","..."],
"=": ["...","###","...","###","..."],
}

_SCALE = 2                      # font pixel → 2x2 image pixels
_CHAR_W, _CHAR_H = 4 * _SCALE, 6 * _SCALE   # glyph + one pixel of spacing
_INK = (40, 40, 40)


def _text(img: np.ndarray, x: int, y: int, text: str) -> None:
    """Draw ``text`` with its top-left corner at (x, y); unknown characters draw as blanks."""
    for ch in text.lower():
        glyph = _GLYPHS.get(ch, _GLYPHS[" "])
        for gy, row in enumerate(glyph):
            for gx, on in enumerate(row):
                if on == "#":
                    y0, x0 = y + gy * _SCALE, x + gx * _SCALE
                    img[y0:y0 + _SCALE, x0:x0 + _SCALE] = _INK
        x += _CHAR_W


def _png_bars(grid: np.ndarray, tables: List[str], path: str, title: str) -> None:
    """Stacked bars (tables x ranks) with a title, a GiB axis, rank numbers and a legend."""
    num_tables, num_ranks = grid.shape
    bar = max(3, min(32, 640 // max(num_ranks, 1)))
    gap = max(1, bar // 4)
    left, top, bottom = 8 * _CHAR_W, 3 * _CHAR_H, 3 * _CHAR_H
    plot_w = num_ranks * (bar + gap)
    legend_x = left + plot_w + 3 * _CHAR_W
    name_w = max((len(t) for t in tables), default=1) + 3
    width = max(legend_x + name_w * _CHAR_W + _CHAR_W, len(title) * _CHAR_W + 2 * _CHAR_W)
    height = max(320, top + bottom + (num_tables + 1) * (_CHAR_H + 2))
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    _text(img, _CHAR_W, _CHAR_H // 2, title)
    peak = grid.sum(axis=0).max()
    scale = (height - top - bottom) / (peak or 1.0)
    base = height - bottom
    for j in range(num_ranks):
        x0 = left + j * (bar + gap)
        y = base
        for i in range(num_tables):
            h = int(round(grid[i, j] * scale))
            if h:
                img[y - h:y, x0:x0 + bar] = _color(i)
                y -= h
    img[top:base + 1, left - 3] = _INK                # y axis
    img[base, left - 3:left + plot_w] = _INK          # x axis
    _text(img, _CHAR_W // 2, top, f"{peak / GB:.2f}")
    _text(img, _CHAR_W // 2, top + _CHAR_H + 2, "gib")
    _text(img, _CHAR_W // 2, base - _CHAR_H, "0")
    step = 1
    while step * (bar + gap) < 3 * _CHAR_W:           # rank labels must not overlap
        step *= 2
    for j in range(0, num_ranks, step):
        _text(img, left + j * (bar + gap), base + 4, str(j))
    _text(img, left, base + _CHAR_H + 8, "rank")
    for i, t in enumerate(tables):
        y = top + i * (_CHAR_H + 2)
        img[y:y + _CHAR_H - 2, legend_x:legend_x + 2 * _CHAR_W] = _color(i)
        _text(img, legend_x + 3 * _CHAR_W, y, t)
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
