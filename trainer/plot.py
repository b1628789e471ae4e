"""``python -m trainer.plot RUN_DIR [RUN_DIR ...]``: training curves as a PNG, no server.

Reads each run's ``metrics.jsonl`` (one JSON record per line: ``split`` = ``train``,
``eval``/``valid``/``test`` or ``final``, ``step``, and the metrics) and draws one panel per
quantity — the training loss first, then every metric the runs logged (``auc``, ``logloss``,
``calibration``, ``hr@10``, …) — with step on the x axis. Train curves are solid, evaluation
curves dashed with markers, the ``final`` values a star at the last step, and on synthetic
data the oracle's value (``oracle_auc``…) a dotted line; each run has its own colour, so several runs overlay for comparison. The PNG goes to
``<first RUN_DIR>/curves.png`` unless ``--out`` says otherwise.

    python -m trainer.plot runs/deepfm_synthetic
    python -m trainer.plot runs/a runs/b --out compare.png --metrics loss,auc
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

from data.cli import ArgumentParser

# Record keys that are bookkeeping, not curves.
_SKIP = {"time", "split", "step", "steps", "epoch", "elapsed_s", "examples", "eval_rows",
         "eval_users", "examples_per_s"}

Series = Dict[Tuple[str, str], List[Tuple[int, float]]]  # (split, key) -> [(step, value)]


class PlotError(ValueError):
    """A run directory or metrics file that cannot be plotted; the message says which."""


def read_metrics(run_dir: str) -> Tuple[Series, Optional[int]]:
    """``(split, key) → [(step, value)]`` of a run's ``metrics.jsonl`` and its last step
    (the ``final`` record's ``steps``)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise PlotError(f"{path} not found: RUN_DIR must be a training.run_dir of a run "
                        f"that has logged at least one step")
    series: Series = defaultdict(list)
    last_step: Optional[int] = None
    with open(path) as fh:
        lines = fh.read().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            # A run killed mid-write leaves a partial last line; anything else is damage.
            if n == len(lines):
                break
            raise PlotError(f"{path}:{n}: not a JSON record ({e})") from None
        if not isinstance(rec, dict):
            raise PlotError(f"{path}:{n}: not a JSON object")
        split = str(rec.get("split", "train"))
        step = rec.get("step", rec.get("steps"))
        if not isinstance(step, (int, float)):
            continue
        if split == "final":
            last_step = int(step)
        for key, value in rec.items():
            if key in _SKIP or key.startswith("lr/") or isinstance(value, bool) \
                    or not isinstance(value, (int, float)):
                continue
            series[(split, key)].append((int(step), float(value)))
    return series, last_step


def panel_keys(runs: Sequence[Series], only: Optional[Sequence[str]] = None) -> List[str]:
    """The quantities to draw: ``loss`` first, then the other metrics in first-seen order."""
    keys: List[str] = []
    for series in runs:
        for (_, key) in series:
            if key not in keys and not key.startswith("oracle_"):
                keys.append(key)
    keys.sort(key=lambda k: (k != "loss",))
    if only:
        missing = [k for k in only if k not in keys]
        if missing:
            raise PlotError(f"--metrics: {', '.join(missing)} not in these runs; they logged "
                            f"{', '.join(keys)}")
        keys = [k for k in keys if k in only]
    return keys


def plot_runs(run_dirs: Sequence[str], out: Optional[str] = None,
              metrics: Optional[Sequence[str]] = None) -> Dict[str, List[str]]:
    """Draw ``run_dirs`` into ``out`` (default ``<run_dirs[0]>/curves.png``); returns each
    panel's curve labels (``<run> <split>``), which is what the PNG shows."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    if not run_dirs:
        raise PlotError("give at least one RUN_DIR")
    loaded = [read_metrics(d) for d in run_dirs]
    keys = panel_keys([s for s, _ in loaded], metrics)
    if not keys:
        raise PlotError(f"no metrics to plot in {', '.join(run_dirs)}")
    out = out or os.path.join(run_dirs[0], "curves.png")
    names = _run_names(run_dirs)
    cols = min(3, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn: Dict[str, List[str]] = {k: [] for k in keys}
    for ax, key in zip(axes.flat, keys):
        for r, ((series, last_step), name) in enumerate(zip(loaded, names)):
            colour = colours[r % len(colours)]
            for (split, k), points in sorted(series.items()):
                if k != key:
                    continue
                steps, values = zip(*points)
                label = f"{name} {split}"
                if split == "train":
                    ax.plot(steps, values, "-", color=colour, label=label, linewidth=1.4)
                elif split == "final":
                    ax.plot(steps, values, "*", color=colour, label=label, markersize=11)
                else:
                    ax.plot(steps, values, "--o", color=colour, label=label, markersize=3.5)
                drawn[key].append(label)
            oracle = series.get(("final", f"oracle_{key}"))
            if oracle:  # synthetic data: the generating model's value, the ceiling to reach
                ax.axhline(oracle[-1][1], color=colour, linestyle=":", label=f"{name} oracle")
                drawn[key].append(f"{name} oracle")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return drawn


def _run_names(run_dirs: Sequence[str]) -> List[str]:
    """Short distinct labels: the directory names, or the paths when two share a name."""
    base = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    return base if len(set(base)) == len(base) else [os.path.normpath(d) for d in run_dirs]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = ArgumentParser(prog="python -m trainer.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="training.run_dir of a run")
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/curves.png of the "
                                               "first run)")
    p.add_argument("--metrics", default=None,
                   help="comma-separated quantities to draw (default: all, e.g. loss,auc)")
    args = p.parse_args(argv)
    only = [m for m in args.metrics.split(",") if m] if args.metrics else None
    try:
        drawn = plot_runs(args.run_dirs, args.out, only)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.run_dirs[0], "curves.png")
    print(f"wrote {out} ({len(drawn)} panels: {', '.join(drawn)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
