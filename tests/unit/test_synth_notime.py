"""The no-time presets of the synthetic next-item data: no planted time effect (the items
are the plain chain's, the time-blind oracle is the oracle), uninformative or line-order
timestamps."""

from __future__ import annotations

import numpy as np
import pytest

from data.synth.next_item import NEXT_ITEM_PRESETS, NextItemSynthArgs, generate_histories


def _args(**kw: object) -> NextItemSynthArgs:
    return NextItemSynthArgs(**{**NEXT_ITEM_PRESETS["tiny"], "num_users": 2000,  # type: ignore[arg-type]
                                **kw})


def test_no_time_presets_plant_no_time_effect() -> None:
    _, plain_items, _, plain = generate_histories(_args(session_break=0.0))
    user, items, ts, oracle = generate_histories(_args(time_signal="none"))
    # The items follow the chain alone: exactly the items of a run without session returns.
    assert np.array_equal(items, plain_items)
    for key in ("hr@10", "ndcg@10", "expected_hr@10"):
        assert oracle[key] == oracle[f"time_blind_{key}"] == pytest.approx(plain[key])
    # ... while the timestamps still have session-like gaps (seconds to weeks).
    gaps = np.diff(ts)[np.diff(user) == 0]
    assert gaps.min() >= 30 and gaps.max() > 4 * 3600
    _, _, _, sessions = generate_histories(_args())
    assert sessions["hr@10"] > sessions["time_blind_hr@10"]  # the default does plant one

    user, items2, ts, oracle2 = generate_histories(_args(time_signal="line_order"))
    assert np.array_equal(items2, plain_items) and oracle2 == oracle
    starts = np.flatnonzero(np.diff(np.concatenate(([-1], user))))
    assert (ts[starts] == 0).all() and (np.diff(ts)[np.diff(user) == 0] == 1).all()
    with pytest.raises(ValueError, match="time-signal"):
        generate_histories(_args(time_signal="clock"))
