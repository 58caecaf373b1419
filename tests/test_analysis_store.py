"""Through a real DuckDB file: write runs with `TraceStore`, load with `RoutingData.from_store`, and get the
same numbers as from the in-memory arrays."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import moelens.analysis as A
from moelens import TraceStore
from moelens.analysis import RoutingData
from moelens.errors import InputError, RunNotFoundError, StoreCorruptError

TOY = [[0, 1], [0, 2], [2, 0], [3, 1], [3, 1], [1, 2]]


def _toy_run(store: TraceStore) -> int:
    """The 6-token toy written row by row, with a dropped token (expert -1) and a weight-0 slot added at pos 6-7."""
    run = store.create_run("toy", n_experts=4, top_k=2)
    experts = TOY + [[-1, -1], [2, 3]]
    weights = [[0.6, 0.4]] * 6 + [[0.0, 0.0], [1.0, 0.0]]
    store.append(
        run,
        {
            "layers": {"layer": [5], "n_experts": [4], "top_k": [2]},
            "sequences": {"seq_id": [7], "label": ["A"], "prompt_len": [6], "n_tokens": [8]},
            "tokens": {
                "seq_id": [7] * 8, "pos": range(8), "token_id": [5, 7, 5, 9, 9, 5, 1, 2],
                "token": ["a", "b", "a", "c", "c", "a", "x", "y"], "phase": ["prompt"] * 6 + ["generated"] * 2,
            },
            "routing": {
                "seq_id": [7] * 16, "pos": np.repeat(np.arange(8), 2), "layer": [5] * 16, "rank": [0, 1] * 8,
                "expert": np.ravel(experts), "weight": np.ravel(weights),
            },
        },
    )  # fmt: skip
    store.finish_run(run)
    return run


def test_toy_through_duckdb(store: TraceStore) -> None:
    run = _toy_run(store)
    data = RoutingData.from_store(store, run)
    assert data.layer_ids.tolist() == [5] and data.n_tokens == 8
    assert data.experts[0, 6].tolist() == [-1, -1] and data.experts[0, 7].tolist() == [2, -1]  # dropped, weight 0
    prompt = A.layer_balance(store, run, phase="prompt").iloc[0]
    assert prompt["entropy"] == pytest.approx(1.357978, abs=1e-6) and prompt["cv"] == pytest.approx(0.235702, abs=1e-6)
    assert A.expert_load(store, run)["count"].tolist() == [3, 4, 4, 2]
    assert A.srp(store, run, phase="prompt", segment_lengths=(2,))["srp"].iloc[0] == pytest.approx(0.833333, abs=1e-6)
    gen = RoutingData.from_store(store, run, phase="generated")
    assert gen.n_tokens == 2 and gen.pos.tolist() == [6, 7] and gen.token_text().tolist() == ["x", "y"]
    top = A.expert_top_tokens(store, run, 5, 1, n=2, n_contexts=1, window=1)
    assert top["token"].tolist() == ["a", "c"] and top["contexts"].iloc[0] == ["⟦a⟧b"]


def test_synthetic_round_trip_equals_arrays(store: TraceStore) -> None:
    data = A.synthetic(3000, 3, 8, 2, seed=3, seq_len=100, drop_rate=0.05, generated_fraction=0.3, shared_expert=True)
    run = A.write_run(store, data, chunk_tokens=1000)
    loaded = RoutingData.from_store(store, run)
    for name in ("experts", "weights", "seq_id", "pos", "token_id", "predicted_id", "phase", "label", "layer_ids", "n_experts", "top_k", "shared_gate"):
        assert np.array_equal(getattr(loaded, name), getattr(data, name), equal_nan=name in ("weights", "shared_gate")), name
    assert loaded.label_names == data.label_names
    scores = {
        "expert_load": {"by_label": True}, "layer_balance": {}, "domain_summary": {}, "repetition": {},
        "vocabulary_specialization": {"target": "next"}, "coactivation": {}, "cross_layer_consistency": {},
        "srp": {"segment_lengths": (4, 16)}, "sch": {"lookahead": (4,)}, "standing_committee": {},
        "shared_expert_stats": {}, "npmi": {"label": "domain1"},
    }  # fmt: skip
    for name, params in scores.items():
        from_store = A.run_score(store, run, name, **params)
        from_arrays = A.SCORES[name].function(data, **params)
        pd.testing.assert_frame_equal(from_store, from_arrays, check_dtype=False, obj=name)
    phase = A.repetition(store, run, phase="generated")
    pd.testing.assert_frame_equal(phase, A.repetition(data, phase="generated"), check_dtype=False)


def test_cache_is_keyed_by_run_completion_not_file(store: TraceStore) -> None:
    A.clear_cache()
    run = _toy_run(store)
    first = RoutingData.from_store(store, run)
    load = A.expert_load(store, run)
    assert RoutingData.from_store(TraceStore(store.path, read_only=True), run) is first
    _toy_run(store)  # another run changes the file: the completed run stays cached
    assert RoutingData.from_store(store, run) is first
    store.delete_run(2)
    store.delete_run(run)
    again = _toy_run(store)  # same run id, a new completion time: nothing stale is served
    assert again == run and RoutingData.from_store(store, run) is not first
    pd.testing.assert_frame_equal(A.expert_load(store, run), load)
    recording = store.create_run("live", n_experts=4, top_k=2)
    store.append(recording, {"layers": {"layer": [0], "n_experts": [4], "top_k": [2]},
                             "tokens": {"seq_id": [0], "pos": [0], "token_id": [1]}})  # fmt: skip
    assert RoutingData.from_store(store, recording) is not RoutingData.from_store(store, recording)  # not cached while recording


def test_run_agreement_across_runs_in_one_store(store: TraceStore) -> None:
    run_a = _toy_run(store)
    run_b = _toy_run(store)
    # identical runs: the dropped token overlaps in nothing, the weight-0 slot leaves 1 of k = 2
    assert A.run_agreement(store, run_a, run_b)["topk_overlap"].iloc[0] == pytest.approx(6.5 / 8)
    assert A.run_score(store, run_a, "run_agreement", run_b=run_b)["top1_agreement"].iloc[0] == 1.0


def test_errors(store: TraceStore) -> None:
    with pytest.raises(RunNotFoundError):
        RoutingData.from_store(store, 99)
    with pytest.raises(InputError):
        A.expert_load(store)  # no run id
    run = store.create_run("bad", n_experts=4, top_k=2)
    store.append(
        run,
        {
            "layers": {"layer": [0], "n_experts": [4], "top_k": [2]},
            "tokens": {"seq_id": [0], "pos": [0], "token_id": [1]},
            "routing": {"seq_id": [0], "pos": [0], "layer": [3], "rank": [0], "expert": [1], "weight": [1.0]},
        },
    )
    with pytest.raises(StoreCorruptError):
        RoutingData.from_store(store, run)


def test_layers_inferred_without_layers_table(store: TraceStore) -> None:
    run = store.create_run("nolayers")
    store.append(
        run,
        {
            "tokens": {"seq_id": [0, 0], "pos": [0, 1], "token_id": [1, 2]},
            "routing": {"seq_id": [0, 0, 0, 0], "pos": [0, 0, 1, 1], "layer": [2] * 4, "rank": [0, 1, 0, 1], "expert": [0, 3, 3, 1], "weight": [0.5] * 4},
        },
    )
    data = RoutingData.from_store(store, run)
    assert data.n_experts.tolist() == [4] and data.top_k.tolist() == [2] and data.layer_ids.tolist() == [2]


@pytest.mark.slow
def test_maps_and_router_logits(store: TraceStore) -> None:
    """One test for both UMAP maps (umap compiles on first use, so this is the slow one)."""
    data = A.synthetic(600, 2, 8, 2, seed=1, seq_len=60, label_tilt=2.0)
    run = A.write_run(store, data)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(data.n_tokens, 8)).astype(np.float32)
    store.append(run, {"router_logits": {"seq_id": data.seq_id, "pos": data.pos, "layer": np.zeros(data.n_tokens, int), "logits": list(logits)}})
    loaded = RoutingData.from_store(store, run)
    assert np.allclose(loaded.router_logits(0), logits) and loaded.router_logits(1) is None
    tokens = A.token_map(store, run, layer=0, max_tokens=100)
    assert len(tokens) == 100 and tokens[["x", "y"]].notna().all().all()
    with pytest.raises(InputError):
        A.token_map(store, run, layer=1)
    experts = A.expert_map(data, profile="label")
    assert len(experts) == 16 and experts["dominant_label"].notna().all() and experts[["x", "y"]].notna().all().all()
    by_token = A.expert_map(data, profile="token", n_features=32)
    assert "dominant_token" in by_token and len(by_token) == 16
