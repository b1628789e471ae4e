"""Model zoo throughput and memory: every registered CTR model, 1 and 2 ranks, one run.

``python -m bench.models [--quick] [--models deepfm,dcn_v2,...,din,dien] [--ranks 1,2] [--steps 160] [--batch-size 512] [--data DIR] [--out FILE]``

All models train through the real trainer (``python -m trainer`` for 1 rank, ``torchrun``
for more) on the same sequence-signal synthetic dataset (``data.synth ctr_seq``), so they
share tables and inputs: the pooled models read ``user``/``item``/``item_cat`` and the dense
features, InterFormer, DIN and DIEN also the behaviour sequences. Reported per (model, ranks):

* ``examples_per_s``: the trainer's own training throughput over the whole run (the
  ``final`` line; training time only, all ranks together) — includes warm-up;
* ``steady_examples_per_s``: the rate of the last logging window (the last quarter of the
  steps), after warm-up;
* ``peak_rss_mb``: the largest peak resident set of any process of the run (one rank, or
  the launcher) — on CPU the memory a rank needs; GPU memory is not measured here.

Results go to ``bench/results/models.json`` (or ``--out``) and a table on stdout.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence

from data.cli import ArgumentParser
from bench.common import format_table, run_trainer, trainer_command, write_results
from data.synth.ctr_seq import SEQ_PRESETS, SeqCTRSynthArgs, generate_ctr_seq

MODELS = ("deepfm", "dcn_v2", "autoint", "interformer", "wide_deep", "dcn", "xdeepfm",
          "masknet", "din", "dien")
CONFIGS = {m: f"launch/configs/{m}_synthetic.toml" for m in MODELS}

def train_command(model: str, ranks: int, data: str, steps: int, batch_size: int,
                  run_dir: str) -> List[str]:
    """The trainer command line of one measurement."""
    return trainer_command(CONFIGS[model], ranks, _overrides(data, steps, batch_size, run_dir))


def _overrides(data: str, steps: int, batch_size: int, run_dir: str) -> List[str]:
    return [f"--data.path={data}", f"--data.batch_size={batch_size}",
            f"--training.steps={steps}", "--training.eval_batches=1",
            f"--training.log_every={max(steps // 4, 1)}", f"--training.run_dir={run_dir}",
            "--checkpoint.save_at_end=false"]


def measure(model: str, ranks: int, data: str, steps: int, batch_size: int,
            work: str) -> Dict[str, Any]:
    """Train ``model`` for ``steps`` on ``ranks`` processes; throughput and peak RSS."""
    run = run_trainer(CONFIGS[model], ranks,
                      _overrides(data, steps, batch_size, os.path.join(work, f"{model}_r{ranks}")),
                      model)
    windows = run.window_examples_per_s
    return {"model": model, "ranks": ranks, "batch_size": batch_size, "steps": steps,
            "examples_per_s": float(run.final["examples_per_s"]),
            "steady_examples_per_s": windows[-1] if windows else float("nan"),
            "peak_rss_mb": run.peak_rss_kb / 1024 if run.peak_rss_kb else float("nan")}


def run(models: Sequence[str], ranks: Sequence[int], steps: int, batch_size: int,
        data: Optional[str], preset: str) -> List[Dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="bench_models_") as work:
        if data is None:
            data = os.path.join(work, "data")
            generate_ctr_seq(data, SeqCTRSynthArgs(**SEQ_PRESETS[preset]),  # type: ignore[arg-type]
                             progress=False)
        # Interleave models within each rank count so machine load drifts hit all alike.
        return [measure(m, r, data, steps, batch_size, work) for r in ranks for m in models]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = ArgumentParser(prog="python -m bench.models", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny data, few steps (smoke run)")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--ranks", default="1,2", help="comma-separated rank counts")
    parser.add_argument("--steps", type=int, default=160, help="training steps per run")
    parser.add_argument("--batch-size", type=int, default=512, help="examples per rank per step")
    parser.add_argument("--data", help="existing ctr_seq dataset (default: generate one)")
    parser.add_argument("--out", help="result JSON (default bench/results/models.json)")
    ns = parser.parse_args(argv)
    models = [m for m in ns.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    ranks = [int(r) for r in ns.ranks.split(",") if r]
    steps, preset = (5, "tiny") if ns.quick else (ns.steps, "ci")
    batch_size = min(ns.batch_size, 128) if ns.quick else ns.batch_size
    results = run(models, ranks, steps, batch_size, ns.data, preset)
    path = write_results("models", {"results": results, "quick": ns.quick}, ns.out)
    print(format_table(results, ["model", "ranks", "batch_size", "steps", "examples_per_s",
                                 "steady_examples_per_s", "peak_rss_mb"]))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
