"""Sequence bootstrap intervals and minimum-count filters (moelens.analysis.bootstrap): by hand on tiny data,
against an independent rebuild of every draw from plain arrays, seeded, and its errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moelens.analysis import RoutingData, repetition, srp
from moelens.analysis.bootstrap import bootstrap, min_count, resample_sequences
from moelens.errors import InputError


def _data(seqs: list[list[int]], n_experts: int = 4) -> RoutingData:
    """One layer, top-1, one list of first choices per sequence."""
    experts = np.concatenate([np.array(s)[:, None] for s in seqs])
    seq_id = np.repeat(np.arange(len(seqs)), [len(s) for s in seqs])
    return RoutingData.from_arrays(experts, n_experts=n_experts, seq_id=seq_id)


def test_resample_draws_whole_sequences_and_renumbers_them() -> None:
    data = _data([[0, 0, 1], [2, 3], [1, 1, 1, 1]])
    draw = resample_sequences(data, np.random.default_rng(3))
    picks = np.random.default_rng(3).integers(0, 3, 3)
    expected = np.concatenate([[[0, 0, 1], [2, 3], [1, 1, 1, 1]][i] for i in picks])
    assert draw.experts[0, :, 0].tolist() == expected.tolist()
    assert draw.seq_id.tolist() == np.repeat(np.arange(3), [[3, 2, 4][i] for i in picks]).tolist()
    assert draw.pos.tolist() == np.concatenate([np.arange([3, 2, 4][i]) for i in picks]).tolist()


def test_identical_sequences_give_a_zero_width_interval() -> None:
    # every sequence repeats its first choice 2 of 3 times: every draw has the same rate 2/3
    data = _data([[0, 0, 1, 1]] * 5)
    out = bootstrap("repetition", data, n_boot=20, seed=1)
    assert out["first_choice"].iloc[0] == pytest.approx(2 / 3)
    assert out["first_choice_lo"].iloc[0] == pytest.approx(2 / 3) == out["first_choice_hi"].iloc[0]
    assert out.attrs["params"]["n_boot"] == 20 and "5 sequences" in out.attrs["params"]["bootstrap_ci"]


def test_identical_sequences_give_zero_width_sch_and_risk_intervals(tmp_path) -> None:
    from moelens import TraceStore
    from moelens.analysis import write_run

    # SCH: four copies of one top-2 sequence whose m=1 curve is 3/16, 6/16, 12/16, 1 (worked by hand in
    # test_analysis_fixtures): every draw has that curve, in memory and streamed from a store alike
    fixture = [[0, 1], [0, 2], [1, 2], [3, 0], [3, 1], [0, 1], [2, 3], [0, 1]]
    cache = RoutingData.from_arrays(np.array(fixture * 4), n_experts=4, seq_id=np.repeat(np.arange(4), 8))
    # risk: label a sequences route 0, 0, 1 (expert 0 at 2/3), label b 1, 1, 1, 0 (1/4): RD = 5/12 in every draw
    risk = RoutingData.from_arrays(np.array([0, 0, 1] * 3 + [1, 1, 1, 0] * 3)[:, None], n_experts=2,
                                   seq_id=np.repeat(np.arange(6), [3, 3, 3, 4, 4, 4]), labels=["a"] * 9 + ["b"] * 12)
    store = TraceStore(tmp_path / "traces.duckdb")
    cases = [("sch", cache, {"lookahead": (1,), "lru": False, "sample_every": 1}, "cache_size", "hit_rate", [3 / 16, 6 / 16, 12 / 16, 1.0]),
             ("risk_difference", risk, {"label_a": "a", "label_b": "b"}, "expert", "risk_diff", [2 / 3 - 1 / 4, 1 / 3 - 3 / 4])]
    for name, data, params, key, value, expected in cases:
        for source, run in ((data, None), (store, write_run(store, data))):
            out = bootstrap(name, source, run, n_boot=20, seed=3, **params).sort_values(key)
            assert out[value].tolist() == pytest.approx(expected)
            assert out[f"{value}_lo"].tolist() == pytest.approx(expected) and out[f"{value}_hi"].tolist() == pytest.approx(expected)


def test_bootstrap_matches_an_independent_rebuild_of_every_draw() -> None:
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 6, rng.integers(5, 30)).tolist() for _ in range(12)]
    data = _data(seqs, n_experts=6)
    out = bootstrap(srp, data, n_boot=30, seed=7, segment_lengths=(4, 8))
    # slow path: rebuild each draw from plain arrays with the same generator, score it, take the quantiles
    gen = np.random.default_rng(7)
    per_draw = []
    for _ in range(30):
        picks = gen.integers(0, len(seqs), len(seqs))
        per_draw.append(srp(_data([seqs[i] for i in picks], n_experts=6), segment_lengths=(4, 8)).set_index("m")["srp"])
    table = pd.concat(per_draw, axis=1)
    for m in (4, 8):
        row = out[out["m"] == m].iloc[0]
        assert row["srp"] == pytest.approx(srp(data, segment_lengths=(4, 8)).set_index("m").loc[m, "srp"])
        assert row["srp_lo"] == pytest.approx(table.loc[m].quantile(0.025))
        assert row["srp_hi"] == pytest.approx(table.loc[m].quantile(0.975))
        assert row["srp_lo"] <= row["srp"] <= row["srp_hi"]


def test_bootstrap_is_seeded_and_checks_its_parameters() -> None:
    rng = np.random.default_rng(1)
    data = _data([rng.integers(0, 4, 20).tolist() for _ in range(8)])
    a = bootstrap(repetition, data, n_boot=15, seed=2)
    assert a.equals(bootstrap(repetition, data, n_boot=15, seed=2))
    assert not a.equals(bootstrap(repetition, data, n_boot=15, seed=3))
    with pytest.raises(InputError, match="ci must be"):
        bootstrap(repetition, data, ci=1.5)
    with pytest.raises(InputError, match="n_boot"):
        bootstrap(repetition, data, n_boot=1)
    with pytest.raises(InputError, match="values="):
        bootstrap("layer_balance", data)


def test_min_count_keeps_rows_with_enough_events() -> None:
    df = pd.DataFrame({"layer": [0, 0, 1], "expert": [1, 2, 3], "n_xe": [2, 5, 9], "npmi": [0.9, 0.4, 0.1]})
    kept = min_count(df, "npmi", 5)
    assert kept["expert"].tolist() == [2, 3] and kept.attrs["params"]["dropped_below_min_count"] == 1
    rd = pd.DataFrame({"a1": [1, 3], "a2": [1, 4], "risk_diff": [0.5, 0.1]})
    assert min_count(rd, "risk_difference", 5)["risk_diff"].tolist() == [0.1]
    assert min_count(df, "npmi", 0) is df and min_count(df, "srp", 10) is df
