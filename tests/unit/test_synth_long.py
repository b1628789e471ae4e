"""The long-range revisit signal of the synthetic next-item data (``--revisit``,
``--revisit-lags``, preset ``long``) and log-uniform history lengths: off by default (the
other presets' data unchanged), planted at exactly the given lags, known to the oracle, and
the oracle of a model that sees only the last W events."""

from __future__ import annotations

import numpy as np
import pytest

from data.synth.next_item import (NEXT_ITEM_PRESETS, NextItemSynthArgs, PlantedChain,
                                  generate_histories)

LAGS = (7, 20)


def _args(**kw: object) -> NextItemSynthArgs:
    base: dict = {"num_users": 200, "num_items": 800, "num_clusters": 40, "min_len": 30,
                  "max_seq": 80, "max_len": 80, "time_signal": "none"}
    return NextItemSynthArgs(**{**base, **kw})


def _same_cluster_rate(user: np.ndarray, item: np.ndarray, clusters: np.ndarray,
                       lag: int) -> float:
    """Fraction of steps whose item shares the cluster of the user's item ``lag`` back."""
    same = (clusters[item[lag:]] == clusters[item[:-lag]]) & (user[lag:] == user[:-lag])
    return float(same.sum() / (user[lag:] == user[:-lag]).sum())


def test_revisits_planted_at_the_lags_and_known_to_the_oracle() -> None:
    plain_user, plain_item, _, plain = generate_histories(_args())
    user, item, _, oracle = generate_histories(_args(revisit=0.6, revisit_lags=LAGS,
                                                     oracle_windows=(4, 10, 30)))
    # Off by default, and the revisits draw no random numbers: same lengths as without.
    assert np.array_equal(user, plain_user)
    clusters = PlantedChain(_args(), np.random.default_rng(0)).cluster
    for lag in LAGS:
        rate = _same_cluster_rate(user, item, clusters, lag)
        assert rate > 0.2 > 0.05 > _same_cluster_rate(plain_user, plain_item, clusters, lag)
    # A lag that is not planted (nor a difference of planted ones) stays at the chain's rate.
    assert _same_cluster_rate(user, item, clusters, 11) < 0.05
    # The oracle's distribution mixes in the revisits (measured 0.49 against the chain's
    # 0.58: a revisit spreads the mass over the clusters the user has been in); no time
    # signal, so the time-blind oracle is the oracle.
    assert 0.3 < oracle["expected_hr@10"] < plain["expected_hr@10"] - 0.05
    assert oracle["time_blind_hr@10"] == oracle["hr@10"]
    # A model that sees the last W events: blind to the lags >= W (measured 0.28 / 0.42 /
    # 0.49 for W = 4 / 10 / 30), the whole oracle once W passes every lag.
    window = [oracle[f"window{w}_expected_hr@10"] for w in (4, 10, 30)]
    assert window[0] < window[1] - 0.05 < window[2] - 0.1
    assert window[2] == pytest.approx(oracle["expected_hr@10"])
    assert "window4_hr@10" not in plain


def test_log_uniform_lengths_and_bad_arguments() -> None:
    user, _, _, _ = generate_histories(_args(length_dist="log_uniform", min_len=4,
                                             max_seq=256, num_users=400, num_items=300))
    lengths = np.bincount(user)
    assert lengths.min() >= 4 and lengths.max() <= 256
    # log-uniform: about as many users in [4, 32) as in [32, 256].
    assert 0.35 < float((lengths < 32).mean()) < 0.65
    with pytest.raises(ValueError, match="length-dist"):
        generate_histories(_args(length_dist="zipf"))
    with pytest.raises(ValueError, match="revisit"):
        generate_histories(_args(revisit=1.5))
    with pytest.raises(ValueError, match="revisit-lags"):
        generate_histories(_args(revisit=0.5, revisit_lags=(0,)))
    assert NEXT_ITEM_PRESETS["long"]["max_seq"] == 8192
