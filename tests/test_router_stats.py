"""Router internals (moelens.analysis.router_stats): hand values, an independent per-token loop on random
logits, map/merge over two batches equal to one pass, and a real tiny-model recording with logits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moelens.analysis import RoutingData, router_stats, router_token_stats
from moelens.analysis.router_stats import router_finish, router_map, router_merge, token_router_values
from moelens.errors import InputError


def _data(logits: np.ndarray, seq_id=None) -> RoutingData:
    top = np.argsort(-logits, axis=1)[:, :2]
    return RoutingData.from_arrays(top, n_experts=logits.shape[1], layer_ids=[3], seq_id=seq_id,
                                   router_logits={3: logits})


def test_hand_values() -> None:
    v = token_router_values(np.array([[0.0, 0.0], [math.log(3), 0.0], [np.nan, 0.0]]))
    assert v["entropy"][0] == pytest.approx(math.log(2)) and v["norm_entropy"][0] == pytest.approx(1.0)
    assert v["margin"][0] == 0 and v["logit_margin"][0] == 0
    # p = (3/4, 1/4)
    assert v["margin"][1] == pytest.approx(0.5) and v["logit_margin"][1] == pytest.approx(math.log(3))
    assert v["entropy"][1] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert np.isnan(v["entropy"][2]) and np.isnan(v["margin"][2])
    df = router_stats(_data(np.array([[0.0, 0.0, -50.0], [5.0, 0.0, 0.0]])))
    row = df.iloc[0]
    assert row["layer"] == 3 and row["n_tokens"] == 2 and row["near_tie_share"] == pytest.approx(0.5)


def test_against_a_per_token_loop_and_map_merge() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 8)) * rng.uniform(0.1, 4, size=(200, 1))
    seq = np.repeat(np.arange(10), 20)
    data = _data(logits, seq_id=seq)
    per = router_token_stats(data, layer=3, near_tie=0.05)
    for i in (0, 17, 199):
        p = [math.exp(z) for z in logits[i]]
        s = sum(p)
        p = sorted((x / s for x in p), reverse=True)
        h = -sum(x * math.log(x) for x in p)
        assert per["entropy"].iloc[i] == pytest.approx(h)
        assert per["norm_entropy"].iloc[i] == pytest.approx(h / math.log(8))
        assert per["margin"].iloc[i] == pytest.approx(p[0] - p[1])
        assert per["near_tie"].iloc[i] == (p[0] - p[1] < 0.05)
    whole = router_stats(data, near_tie=0.05).iloc[0]
    assert whole["entropy"] == pytest.approx(per["entropy"].mean())
    assert whole["near_tie_share"] == pytest.approx(per["near_tie"].mean())
    halves = [data.select(seq < 4), data.select(seq >= 4)]
    merged = router_finish(router_merge(router_map(halves[0], near_tie=0.05), router_map(halves[1], near_tie=0.05)))
    for col in ("n_tokens", "entropy", "margin", "logit_margin", "near_tie_share", "median_margin"):
        assert merged[col].iloc[0] == pytest.approx(whole[col])
    one = router_token_stats(data, layer=3, seq_id=4)
    assert len(one) == 20 and set(one["seq_id"]) == {4}


def test_no_logits_is_a_clear_error() -> None:
    data = RoutingData.from_arrays(np.zeros((4, 1), int), n_experts=2)
    with pytest.raises(InputError, match="--logits"):
        router_stats(data)
    with pytest.raises(InputError, match="near_tie"):
        router_stats(_data(np.zeros((2, 2))), near_tie=2)


def test_on_a_recording_with_logits(tmp_path) -> None:
    import moelens as ml
    from moelens.tiny import tiny_model, tiny_tokenizer

    model, _ = tiny_model("olmoe")
    store = ml.TraceStore(tmp_path / "l.duckdb")
    run = ml.record(model, tiny_tokenizer(), ["hello routing world", "the router picks experts"], store=store,
                    logits=True, progress=False)
    df = router_stats(store, run)
    assert len(df) >= 1 and (df["n_tokens"] > 0).all()
    assert df["norm_entropy"].between(0, 1).all() and df["margin"].between(0, 1).all()
