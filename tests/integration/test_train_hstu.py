"""End to end under torchrun (2 gloo ranks) with the shipped synthetic configs, run in full
(16 epochs, 352 steps each): HSTU and SASRec train on the CI-sized next-item set
(``data.synth seq --preset ci``: a cluster Markov chain in sessions, where the first step
after a break returns to the previous cluster; oracle HR@10 0.669, time-blind oracle 0.541),
end with the sequential ``final`` line, and:

* HSTU reaches the oracle HR@10 within 10% (relative) — the issue's bar — and its NDCG@10
  the oracle's NDCG@10 within 12%;
* HSTU beats the best model blind to time (its time-gap bias sees the breaks), and SASRec,
  which has no timestamps, stays at or below that time-blind ceiling;
* so HSTU beats SASRec by a wide margin;
* HSTU's sharded checkpoint, exported as an inference package, gives the top-K that
  brute force over the checkpoint's item table gives (history and padding excluded).

Measured on a quiet 2-core CPU (2026-11-22): HSTU 0.644 HR@10 (0.96 of the oracle; 0.632-
0.638 on training seeds 1-2), NDCG@10 0.395 (0.92 of the oracle's 0.427; 0.91-0.93), SASRec
0.506-0.509, HSTU without its time bias 0.507; ~55 s and ~40 s wall time. docs/hstu.md has
the table. HSTU's attention is the CPU default, ``auto`` = ``compiled_jagged`` (its training
loop 1.75x ``pytorch_jagged``'s speed on this data, 2026-12-02, docs/hstu-long.md).

Where time says nothing (``data.synth seq --preset ci_notime``: the same chain without the
session returns, timestamps with session-like but uninformative gaps; oracle HR@10 0.656,
popularity 0.170), HSTU's default flavour (``hstu_synthetic.toml``: its time bias on) must
at least match SASRec (``sasrec_synthetic.toml``) trained the same way. Four epochs (88
steps) keep it cheap; measured on training seeds 0-3 (2026-12-02, loaded 2-core machine):
HSTU HR@10 0.560-0.576 / NDCG@10 0.344-0.354, SASRec 0.509-0.544 / 0.308-0.331 (HSTU
converges faster; at the shipped 16 epochs they tie within one standard error,
docs/hstu-long.md).
"""

from __future__ import annotations

import os
from typing import Dict

import pytest

from data.synth.next_item import NEXT_ITEM_PRESETS, NextItemSynthArgs, generate_next_item
from tests.integration.runner import parse_final, run_trainer

pytestmark = pytest.mark.slow

# HSTU / oracle (measured 0.93-0.96 over training seeds), HSTU over the time-blind oracle
# (measured +0.09-0.10), SASRec at most the time-blind oracle plus noise (measured -0.03;
# the standard error of a HR@10 on 5,632 users is ~0.007), HSTU − SASRec (measured 0.12-0.14).
HR_BOUND = 0.90
NDCG_BOUND = 0.88  # NDCG / oracle NDCG measured 0.91-0.93
OVER_BLIND = 0.04
BLIND_SLACK = 0.02
MARGIN = 0.08
# No time signal, 4 epochs: HSTU − SASRec measured +0.028 … +0.067 HR@10 and +0.014 …
# +0.041 NDCG@10 (seeds 0-3), so HSTU may trail by at most 0.01 (1.5 standard errors of one
# HR@10 on 6,000 users, ~0.0064); both must reach 0.65 × the oracle's HR@10 (0.43; measured
# 0.78-0.88 × oracle), which is 2.5 × the popularity baseline's 0.170.
NOTIME_EPOCHS, NOTIME_STEPS = 4, 88
NOTIME_SLACK = 0.01
NOTIME_FLOOR = 0.65


@pytest.fixture(scope="module")
def ci_notime(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("data") / "ci_notime")
    args = NextItemSynthArgs(**NEXT_ITEM_PRESETS["ci_notime"])  # type: ignore[arg-type]
    generate_next_item(out, args, progress=False)
    return out


def _train(repo_root: str, config: str, data: str, run_dir: str, epochs: float = 16.0,
           steps: int = 352) -> Dict[str, float]:
    proc = run_trainer(repo_root, 2, ["--config", f"launch/configs/{config}.toml",
                                      f"--data.path={data}", f"--training.run_dir={run_dir}",
                                      f"--training.epochs={epochs}"],
                       timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    final = parse_final(proc.stdout)
    assert set(final) >= {"hr@10", "ndcg@10", "mrr", "examples_per_s", "oracle_hr@10",
                          "oracle_ndcg@10", "time_blind_oracle_hr@10", "sampled_hr@10",
                          "sampled_ndcg@10"}, final
    assert 0.0 < final["sampled_ndcg@10"] <= final["sampled_hr@10"] <= 1.0, final
    assert final["steps"] == steps, final  # 352: the shipped 16 epochs
    return final


def _package_topk_is_brute_force_on_checkpoint(run_dir: str, data: str, out: str,
                                               rows: int = 128, k: int = 10) -> None:
    """Export the 2-rank run's sharded DCP checkpoint as a package and check its top-K
    (``predict --top-k``, exact) against brute force over the checkpoint's own tables: the
    full item table and encoder weights read back by DCP resharding into an unsharded model
    (not the export's reader), users through that eager model, history and padding out."""
    import os

    import pyarrow.parquet as pq
    import torch
    import torch.nn.functional as F

    from data.reader import ParquetReader, split_files
    from data.schema import Schema
    from models import get_model_spec
    from trainer.config import load_config
    from trainer.export import main as export_main
    from trainer.package import load_package
    from trainer.predict import main as predict_main
    from trainer.safe_load import read_metadata, safe_dcp_load
    from trainer.selection import resolve_checkpoint
    from trainer.tasks.sequential import SequentialBatches

    ckpt = resolve_checkpoint(run_dir)
    pkg_dir = os.path.join(out, "pkg")
    assert export_main(["--checkpoint", ckpt, "--out", pkg_dir, "--compile", "none"]) == 0
    cfg = load_config(os.path.join(ckpt, "config.toml"))
    schema = Schema.load(data)
    spec = get_model_spec(cfg.model.name)
    model = spec.build(schema, spec.make_args(cfg.model.flavour, cfg.model.args), "cpu").eval()
    template = {"model": {f"model.{n}": torch.empty_like(v)
                          for n, v in model.state_dict().items()}}
    key = f"model.model.ec.embeddings.{model.item_table}.weight"
    chunks = read_metadata(os.path.join(ckpt, ".metadata")).state_dict_metadata[key].chunks
    assert len(chunks) == 2, chunks  # the item table is split over the 2 ranks (row-wise)
    safe_dcp_load(template, ckpt)  # DCP reshards the 2 ranks' shards into full tensors
    model.load_state_dict({n[len("model."):]: v for n, v in template["model"].items()})
    items = F.normalize(model.ec.embeddings[model.item_table].weight.detach(), dim=-1)
    assert bool((items.norm(dim=1) > 0.5).all())  # trained rows, not an empty template
    split = "test" if os.path.isdir(os.path.join(data, "test")) else "eval"
    inp = os.path.join(out, "rows.parquet")
    pq.write_table(pq.read_table(split_files(data, split)[0]).slice(0, rows), inp)
    tr = SequentialBatches(model.item_feature, model.num_items, 4, 0, holdout=False)
    batch = tr(next(iter(ParquetReader(data, split, rows, schema=schema))))
    with torch.no_grad():
        enc = model(batch)
    users = F.normalize(enc.user[enc.offsets[1:] - 1], dim=-1)
    hist = batch.sequence[model.item_feature]
    full = users @ items.T
    full[:, 0] = -torch.inf
    full[torch.repeat_interleave(torch.arange(rows), hist.lengths().long()),
         hist.values()] = -torch.inf
    preds = os.path.join(out, "top.parquet")
    assert predict_main(["--package", pkg_dir, "--input", inp, "--out", preds,
                         "--top-k", str(k), "--search", "exact"]) == 0
    got = pq.read_table(preds)
    ids = torch.tensor(got.column("items").to_pylist())
    want = full.topk(k, dim=1)
    # The package's K items score what brute force's K best score (a near-tie may swap two).
    torch.testing.assert_close(full.gather(1, ids), want.values, atol=1e-5, rtol=0)
    assert (ids == want.indices).float().mean() >= 0.99
    torch.testing.assert_close(torch.tensor(got.column("scores").to_pylist()), want.values,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(load_package(pkg_dir).items, items, atol=1e-6, rtol=0)


def test_hstu_approaches_oracle_and_beats_sasrec(repo_root: str, ci_nextitem: str,
                                                 tmp_path) -> None:  # type: ignore[no-untyped-def]
    hstu = _train(repo_root, "hstu_synthetic", ci_nextitem, str(tmp_path / "hstu"))
    sasrec = _train(repo_root, "sasrec_synthetic", ci_nextitem, str(tmp_path / "sasrec"))
    # HSTU's sharded checkpoint, exported: package top-K = brute force on it. (The item
    # table's DCP resharding and the export are the same for SASRec, whose package user
    # vectors tests/unit/test_package.py checks against its eager model.)
    os.makedirs(tmp_path / "hstu_export")
    _package_topk_is_brute_force_on_checkpoint(str(tmp_path / "hstu"), ci_nextitem,
                                               str(tmp_path / "hstu_export"))
    blind = hstu["time_blind_oracle_hr@10"]
    assert hstu["hr@10"] >= HR_BOUND * hstu["oracle_hr@10"], hstu
    assert hstu["ndcg@10"] >= NDCG_BOUND * hstu["oracle_ndcg@10"], hstu
    assert 0.0 < hstu["ndcg@10"] <= hstu["hr@10"] and 0.0 < hstu["mrr"] < 1.0, hstu
    assert hstu["hr@10"] >= blind + OVER_BLIND, hstu
    assert sasrec["hr@10"] <= blind + BLIND_SLACK, sasrec
    assert hstu["hr@10"] - sasrec["hr@10"] >= MARGIN, (hstu, sasrec)


def test_hstu_matches_sasrec_without_time_signal(repo_root: str, ci_notime: str,
                                                 tmp_path) -> None:  # type: ignore[no-untyped-def]
    hstu = _train(repo_root, "hstu_synthetic", ci_notime, str(tmp_path / "hstu"),
                  NOTIME_EPOCHS, NOTIME_STEPS)
    sasrec = _train(repo_root, "sasrec_synthetic", ci_notime, str(tmp_path / "sasrec"),
                    NOTIME_EPOCHS, NOTIME_STEPS)
    # No time signal: the time-blind oracle is the oracle.
    assert hstu["time_blind_oracle_hr@10"] == hstu["oracle_hr@10"], hstu
    for final in (hstu, sasrec):
        assert final["hr@10"] >= NOTIME_FLOOR * final["oracle_hr@10"], final
    assert hstu["hr@10"] >= sasrec["hr@10"] - NOTIME_SLACK, (hstu, sasrec)
    assert hstu["ndcg@10"] >= sasrec["ndcg@10"] - NOTIME_SLACK, (hstu, sasrec)
