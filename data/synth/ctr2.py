"""Synthetic two-task data: clicks, and conversions that only happen after a click.

``python -m data.synth ctr2 --out DIR [--preset tiny|ci|demo] [--seed S] ...`` writes the
features of :mod:`data.synth` ``ctr`` (dense ``d*``, sparse ``s*``) with three labels:

* ``click`` ~ Bernoulli(pCTR), pCTR from the planted click model of ``data.synth``;
* ``conversion`` = ``click`` · ``would_convert``: a conversion is only observed after a
  click, so its probability on an impression is pCTCVR = pCTR · pCVR (ESMM's setting);
* ``would_convert`` ~ Bernoulli(pCVR), drawn for every impression: the counterfactual
  "would convert if clicked". Real logs never observe it; it is an ``eval_only`` label that
  measures a CVR model over the whole impression space (the space ESMM is built for).

The planted conversion model shares signal with the click model (``cvr_click_correlation``
ρ times the click model's first-order term, ``cvr_click_interaction`` ρ₂ times its pairwise
latent-vector term) and adds its own per-id weights on every field and its own dense
effect::

    cvr_logit = cvr_bias + Σ_f Σ_{id ∈ row_f} u_f[id] + ρ · click_first_order
              + ρ₂ · click_pairwise + dense · β_c

The default (ρ = 0.5, ρ₂ = 0, own weights 0.7) gives conversion much signal of its own;
``--preset esmm_ci`` (:data:`CTR2_PRESETS`) is ESMM's data-sparsity setting: rare clicks,
heavy-tailed ids, conversion driven mostly by the click model's structure.

``meta.json`` holds the oracle per task (``oracle.auc_click``, ``oracle.auc_conversion``
— pCTCVR against ``conversion`` —, ``oracle.auc_would_convert`` — pCVR against
``would_convert`` —, and the log-losses), plus ``oracle.auc`` = the click oracle.

Shapes: one row per impression; ``Batch.labels`` is ``[B, 3]`` in the order above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import pyarrow as pa

from data.schema import LabelSpec, Schema
from data.synth.common import segment_sum, write_planted_dataset
from data.synth.ctr import PRESETS, CTRSynthArgs, PlantedCTR, ctr_schema, part_table

LABELS = ("click", "conversion", "would_convert")


@dataclass
class MultiTaskSynthArgs(CTRSynthArgs):
    """:class:`data.synth.CTRSynthArgs` plus the planted conversion model."""

    cvr_bias: float = -0.3
    #: scale of the conversion model's own per-id weights.
    cvr_first_order_scale: float = 0.7
    #: ρ: weight of the click model's first-order term in the conversion logit.
    cvr_click_correlation: float = 0.5
    #: ρ₂: weight of the click model's pairwise (latent-vector) term in the conversion logit.
    cvr_click_interaction: float = 0.0
    cvr_dense_scale: float = 0.4


#: Two-task settings beyond the sizes of :data:`data.synth.PRESETS` (``--preset`` takes
#: either). ``esmm_ci`` is the setting ESMM (Ma et al. 2018) is built for — data sparsity:
#: clicks are rare (CTR ≈ 0.28 against 0.43 for ``ci``), the tables are larger and
#: heavy-tailed, so many ids have few clicked rows, and conversion is driven mostly by the
#: same per-id structure as click (ρ = ρ₂ = 1.5 on the click model's first-order and
#: pairwise terms, own per-id weights only 0.1). A CVR model trained on clicked rows alone
#: learns the shared structure from a fraction of the rows; ESMM learns it from every
#: impression through pCTR.
CTR2_PRESETS: Dict[str, Dict[str, object]] = {
    "esmm_ci": dict(train_rows=100_000, eval_rows=30_000,
                    num_embeddings=[2000, 5000, 1000, 10000, 200, 3000],
                    multi_hot=[0, 0, 0, 0, 3, 0], zipf=1.1, bias=-2.0, cvr_bias=0.0,
                    cvr_click_correlation=1.5, cvr_click_interaction=1.5,
                    cvr_first_order_scale=0.1, cvr_dense_scale=0.2, rows_per_file=50_000,
                    row_group_rows=4096),
}


def ctr2_preset(name: str) -> Dict[str, object]:
    """The keyword arguments of :class:`MultiTaskSynthArgs` for a named preset (a size of
    :data:`data.synth.ctr.PRESETS` or a two-task setting of :data:`CTR2_PRESETS`)."""
    presets = {**PRESETS, **CTR2_PRESETS}
    if name not in presets:
        raise ValueError(f"unknown ctr2 preset {name!r}; choose one of {sorted(presets)}")
    return dict(presets[name])


def ctr2_schema(args: MultiTaskSynthArgs) -> Schema:
    base = ctr_schema(args)
    return Schema(features=base.features,
                  labels=[LabelSpec("click", "binary"), LabelSpec("conversion", "binary"),
                          LabelSpec("would_convert", "binary", eval_only=True)])


@dataclass
class PlantedCTCVR:
    """The planted click model plus the planted conversion model."""

    click: PlantedCTR
    u: List[np.ndarray]  # per feature: [n] conversion first-order weights
    beta: np.ndarray  # [num_dense]

    @classmethod
    def draw(cls, args: MultiTaskSynthArgs) -> "PlantedCTCVR":
        click = PlantedCTR.draw(args)
        # A separate stream, so the click model (and hence the click labels for a seed)
        # is the same as ``data.synth ctr`` draws.
        rng = np.random.default_rng([args.seed, 77])
        u = [rng.normal(0.0, args.cvr_first_order_scale, size=n) for n in args.num_embeddings]
        beta = rng.normal(0.0, args.cvr_dense_scale, size=args.num_dense)
        return cls(click, u, beta)

    def sample(self, rows: int, rng: np.random.Generator
               ) -> Tuple[np.ndarray, List[Tuple[np.ndarray, np.ndarray]], np.ndarray,
                          np.ndarray]:
        """dense [rows, Dd], per-feature (offsets, ids), probabilities [rows, 3] (pCTR,
        pCTCVR, pCVR) and labels [rows, 3] (click, conversion, would_convert)."""
        a: MultiTaskSynthArgs = self.click.args  # type: ignore[assignment]
        dense, sparse, pctr, click = self.click.sample(rows, rng)
        click_first = np.zeros(rows)
        cvr_logit = np.full(rows, a.cvr_bias)
        pooled_v: List[np.ndarray] = []
        for i, (offsets, ids) in enumerate(sparse):
            click_first += segment_sum(self.click.w[i][ids], offsets)
            cvr_logit += segment_sum(self.u[i][ids], offsets)
            if a.cvr_click_interaction and self.click.v[i] is not None:
                pooled_v.append(segment_sum(self.click.v[i][ids], offsets))
        cvr_logit += a.cvr_click_correlation * click_first
        for x in range(len(pooled_v)):
            for y in range(x + 1, len(pooled_v)):
                cvr_logit += a.cvr_click_interaction * np.einsum("bk,bk->b", pooled_v[x],
                                                                 pooled_v[y])
        if a.num_dense:
            cvr_logit += dense.astype(np.float64) @ self.beta
        pcvr = 1.0 / (1.0 + np.exp(-cvr_logit))
        would = (rng.random(rows) < pcvr).astype(np.float32)
        conversion = click * would
        probs = np.stack([pctr, pctr * pcvr, pcvr], axis=1)
        labels = np.stack([click, conversion, would], axis=1)
        return dense, sparse, probs, labels


def generate_ctr2(out: str, args: MultiTaskSynthArgs, overwrite: bool = False,
                  progress: bool = True) -> Dict[str, object]:
    """Write the two-task dataset to ``out`` (atomically); returns its meta."""
    if len(args.multi_hot) > len(args.num_embeddings):
        raise ValueError("--multi-hot has more entries than --num-embeddings")
    schema = ctr2_schema(args)
    planted = PlantedCTCVR.draw(args)

    def sample(n: int, rng: np.random.Generator) -> Tuple[pa.Table, np.ndarray, np.ndarray]:
        dense, sparse, probs, labels = planted.sample(n, rng)
        table = part_table(schema, dense, sparse, labels[:, 0])
        for k, name in enumerate(LABELS[1:], start=1):
            table = table.append_column(name, pa.array(labels[:, k]))
        return table, probs, labels

    return write_planted_dataset(out, "data.synth ctr2", args, schema, sample, overwrite,
                                 progress, task_names=LABELS)
