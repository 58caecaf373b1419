"""Scores that finish from a run's derived summaries equal the streamed pass over its routing.

Random synthetic runs (unlabelled sequences, prompt and generated phases, capacity-dropped slots) written to
a real DuckDB store: each (score, parameters) is streamed first, then the run is summarised and its routing
rows deleted, and the score must give the same frame with ``max_pass_slots=0`` (which refuses any pass over
the routing). The parameter combinations documented as streamed still refuse that way."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from test_analysis_chunked import assert_same

import moelens.analysis as A
from moelens import TraceStore
from moelens.analysis.chunked import NeedsFullPass
from moelens.analysis.summaries import summarize


def _run(store: TraceStore, seed: int, n_experts: int | None = None) -> tuple[int, list[int]]:
    """A run whose every 5th sequence is unlabelled; returns its id and a few frequent token ids."""
    rng = np.random.default_rng(seed)
    E = n_experts or int(rng.choice([6, 8]))
    data = A.synthetic(int(rng.integers(1000, 1800)), int(rng.integers(2, 4)), E, 2, seed=seed,
                       seq_len=int(rng.integers(20, 45)), n_labels=3, vocab_size=60, drop_rate=0.08, generated_fraction=0.3)
    data = replace(data, label=np.where(data.seq_id % 5 == 4, -1, data.label).astype(np.int32))
    ids, n = np.unique(data.token_id, return_counts=True)
    return A.write_run(store, data, chunk_tokens=600), ids[np.argsort(-n)][:3].tolist()


def _answered(frequent: list[int], layer: int) -> list[tuple[str, dict]]:
    return [
        ("domain_summary", {}), ("domain_summary", {"phase": "generated"}),
        ("repetition", {"permutation": False}), ("repetition", {"permutation": False, "by_label": True, "phase": "prompt"}),
        ("repetition", {}), ("repetition", {"by_label": True}), ("repetition", {"by_label": True, "phase": "generated"}),
        ("npmi", {"label": "domain1"}), ("npmi", {"tokens": frequent, "phase": "prompt"}),
        ("npmi", {"tokens": [frequent[0], 10**6], "layer": layer}), ("npmi", {"regex": "^t1", "phase": "generated"}),
        ("npmi_combined", {"targets": [(1.0, {"label": "domain0"}), (-0.5, {"tokens": frequent[:2]})], "phase": "generated"}),
        ("risk_difference", {"label_a": "domain0", "label_b": "domain2"}),
        ("risk_difference", {"label_a": "domain1", "label_b": "domain2", "phase": "generated"}),
        ("committee_share", {"committee": {layer: [0, 3]}}), ("committee_share", {"committee": {layer: [1]}, "phase": "prompt"}),
        ("cross_layer_consistency", {}), ("cross_layer_consistency", {"phase": "generated"}),
        ("standing_committee", {}), ("standing_committee", {"eci": "expected", "list_length": 3, "decimals": None, "phase": "prompt"}),
        ("committee_share", {}),
    ]  # fmt: skip


#: Parameters whose answer needs the routing (documented in each score's ``from_summaries``).
STREAMED = [
    ("repetition", {"seed": 3}), ("committee_share", {"committee": {0: [1]}, "unit": "last_prompt_token"}),
    ("standing_committee", {"unit": "token"}),
]  # fmt: skip


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_summary_finishes_equal_the_streamed_pass(tmp_path, seed: int) -> None:
    store = TraceStore(tmp_path / "traces.duckdb")
    run, frequent = _run(store, seed)
    layer = int(store.layers(run)["layer"].iloc[-1])
    cases = _answered(frequent, layer)
    A.clear_cache()
    streamed = [A.SCORES[name].function(store, run, target_slots=1500, **params) for name, params in cases]
    summarize(store, run)
    with store.connect(write=True) as con:  # from now on only the summaries can answer
        con.execute("DELETE FROM routing WHERE run_id = ?", [run])
    A.clear_cache()
    for (name, params), expected in zip(cases, streamed):
        assert_same(A.SCORES[name].function(store, run, max_pass_slots=0, **params), expected, f"{name} {params}")
    for name, params in STREAMED:
        with pytest.raises(NeedsFullPass):
            A.SCORES[name].function(store, run, max_pass_slots=0, **params)
    with store.connect(write=True) as con:  # one token id with two texts: a regex is no longer a set of ids
        con.execute("UPDATE tokens SET token = 'other' WHERE run_id = ? AND seq_id = 0 AND pos = 0", [run])
    A.clear_cache()
    with pytest.raises(NeedsFullPass):
        A.npmi(store, run, regex="^t1", max_pass_slots=0)


def test_permutation_baseline_merges_the_cells_samples(tmp_path, monkeypatch) -> None:
    """Groups far larger than the token sample: the sample of a union of (label, phase) cells is the lowest
    hashes of the cells' own samples, so every grouping and phase filter equals the streamed sample."""
    import importlib

    for module in (importlib.import_module("moelens.analysis.repetition"), importlib.import_module("moelens.analysis.summaries")):
        monkeypatch.setattr(module, "PERM_SAMPLE", 40)
    store = TraceStore(tmp_path / "traces.duckdb")
    run, _ = _run(store, 11)
    cases = [{}, {"by_label": True}, {"phase": "prompt"}, {"by_label": True, "phase": "generated"}]
    A.clear_cache()
    streamed = [A.repetition(store, run, target_slots=900, **params) for params in cases]
    tables = summarize(store, run)
    assert tables["permutation_sample"].num_rows <= 40 * (4 * 3) and tables["routed_tokens"].num_rows > 0
    with store.connect(write=True) as con:
        con.execute("DELETE FROM routing WHERE run_id = ?", [run])
    A.clear_cache()
    for params, expected in zip(cases, streamed):
        got = A.repetition(store, run, max_pass_slots=0, **params)
        assert_same(got, expected, f"repetition {params}")
        assert got["perm_overlap"].notna().all()


def test_risk_difference_of_two_runs_and_equalize(tmp_path) -> None:
    store = TraceStore(tmp_path / "traces.duckdb")
    (a, _), (b, _) = _run(store, 3, 8), _run(store, 4, 8)
    A.clear_cache()
    paired = A.risk_difference(store, a, label_a="domain0", run_b=b, label_b="domain0")
    equal = A.risk_difference(store, a, label_a="domain0", label_b="domain2", equalize=True)
    for run in (a, b):
        summarize(store, run)
    A.clear_cache()
    assert_same(A.risk_difference(store, a, label_a="domain0", run_b=b, label_b="domain0", max_pass_slots=0), paired, "two runs")
    with pytest.raises(NeedsFullPass):  # the larger behaviour is cut inside a sequence: streamed
        A.risk_difference(store, a, label_a="domain0", label_b="domain2", equalize=True, max_pass_slots=0)
    assert_same(A.risk_difference(store, a, label_a="domain0", label_b="domain2", equalize=True), equal, "equalize")


def test_repetition_without_permutation_is_the_full_table_less_two_columns(tmp_path) -> None:
    store = TraceStore(tmp_path / "traces.duckdb")
    run, _ = _run(store, 5)
    full = A.repetition(store, run, by_label=True)
    summarize(store, run)
    A.clear_cache()
    short = A.run_score(store, run, "repetition", by_label=True, permutation=False, max_pass_slots=0)  # a registered parameter
    assert list(short.columns) == [c for c in full.columns if c not in ("perm_first", "perm_overlap")]
    kept = full[short.columns]
    kept.attrs = {**full.attrs, "params": {**full.attrs["params"], "permutation": "not computed"}}
    assert_same(short, kept, "repetition without the permutation baselines")
    assert short["label"].isna().sum() == len(store.layers(run))  # the unlabelled group has its own row per layer


def test_expert_top_tokens_from_summaries_and_bounded_reads(tmp_path) -> None:
    store = TraceStore(tmp_path / "traces.duckdb")
    run, _ = _run(store, 6)
    layer = int(store.layers(run)["layer"].iloc[1])
    cases = [{"layer": layer, "expert": 3, "n": 6, "n_contexts": 3}, {"layer": layer, "expert": 0, "n": 4, "n_contexts": 2, "window": 2}]
    A.clear_cache()
    streamed = [A.expert_top_tokens(store, run, target_slots=1500, **params) for params in cases]
    by_phase = A.expert_top_tokens(store, run, phase="prompt", **cases[0])
    summarize(store, run)
    A.clear_cache()
    for params, expected in zip(cases, streamed):  # contexts: the first occurrences, read from routing in growing windows
        assert_same(A.expert_top_tokens(store, run, max_pass_slots=0, **params), expected, f"top tokens {params}")
    for bad in ({"phase": "prompt"}, {"target": "next"}):
        with pytest.raises(NeedsFullPass):
            A.expert_top_tokens(store, run, max_pass_slots=0, **cases[0], **bad)
    assert_same(A.expert_top_tokens(store, run, phase="prompt", **cases[0]), by_phase, "streamed with a phase")
    with store.connect(write=True) as con:
        con.execute("DELETE FROM routing WHERE run_id = ?", [run])
    A.clear_cache()
    no_contexts = {**cases[0], "n_contexts": 0}
    expected = streamed[0].assign(contexts=[[] for _ in range(len(streamed[0]))])
    expected.attrs = {**streamed[0].attrs, "params": {**streamed[0].attrs["params"], "n_contexts": 0}}
    assert_same(A.expert_top_tokens(store, run, max_pass_slots=0, **no_contexts), expected, "no contexts, no routing")


def test_router_stats_and_experts_per_token_stream_the_run(tmp_path) -> None:
    """Streamed over a store in small batches (one pass per logits layer) = the whole run loaded at once."""
    import moelens as ml
    from moelens.analysis._common import resolve
    from moelens.tiny import tiny_model, tiny_tokenizer

    model, _ = tiny_model("olmoe")
    store = ml.TraceStore(tmp_path / "l.duckdb")
    prompts = [f"prompt {i} about routing and the experts it picks" for i in range(12)]
    run = ml.record(model, tiny_tokenizer(), prompts, store=store, logits=True, generate=3, progress=False)
    whole = resolve(store, run)
    A.clear_cache()
    for phase in (None, "generated"):
        streamed = A.router_stats(store, run, near_tie=0.1, phase=phase, target_slots=64)
        assert len(streamed) == len(store.layers(run)) and (streamed["n_tokens"] > 0).all()
        assert_same(streamed, A.router_stats(whole if phase is None else resolve(store, run, phase=phase), near_tie=0.1), f"router_stats {phase}")
        for by in ("layer", "label", "position"):
            assert_same(A.experts_per_token(store, run, by=by, phase=phase, target_slots=64),
                        A.experts_per_token(whole, by=by, phase=phase, batches=3), f"experts_per_token {by} {phase}")
    with pytest.raises(NeedsFullPass):
        A.router_stats(store, run, max_pass_slots=0)


@pytest.mark.parametrize(("name", "params"), [
    ("srp", {"segment_lengths": (2, 5), "by_label": True}), ("repetition", {"by_label": True, "phase": "prompt"}),
    ("npmi", {"label": "domain1", "phase": "generated"}), ("npmi", {"regex": "^t1"}),
])  # fmt: skip
def test_streamed_bootstrap_equals_the_in_memory_draws(tmp_path, monkeypatch, name: str, params: dict) -> None:
    """The same seeded draws scored from sequence partials streamed from the store (a small draw budget:
    one pass per draw) as by recomputing the score on every materialised draw of the loaded run."""
    from moelens.analysis import bootstrap as B
    from moelens.analysis._common import resolve

    store = TraceStore(tmp_path / "traces.duckdb")
    run, _ = _run(store, 7)
    phase = params.get("phase")
    in_memory = B.bootstrap(name, resolve(store, run, phase=phase), n_boot=12, seed=4, **params)
    monkeypatch.setattr(B, "DRAW_BUDGET_BYTES", 1)  # one draw per pass: every pass adds its own
    streamed = B.bootstrap(name, store, run, n_boot=12, seed=4, target_slots=1500, **params)
    assert_same(streamed, in_memory, f"bootstrap {name} {params}")
    assert streamed[[c for c in streamed.columns if c.endswith("_lo")]].notna().any().all()


def _materialised(data: A.RoutingData, n_boot: int, seed: int, keep: np.ndarray) -> list[A.RoutingData]:
    """The seeded draws rebuilt from plain arrays: ``n_boot`` times as many sequences as ``data`` has, drawn with
    ``np.random.default_rng(seed)`` one draw after the other, each copy holding only its tokens where ``keep``."""
    gen = np.random.default_rng(seed)
    starts = np.r_[0, np.flatnonzero(np.diff(data.seq_id)) + 1]
    spans = [np.arange(a, b) for a, b in zip(starts, np.r_[starts[1:], data.n_tokens])]
    names = np.array([*data.label_names, None], object)
    out = []
    for _ in range(n_boot):
        parts = [spans[i][keep[spans[i]]] for i in gen.integers(0, len(spans), len(spans))]
        idx = np.concatenate(parts)
        out.append(A.RoutingData.from_arrays(
            data.experts[:, idx], data.weights[:, idx], n_experts=data.n_experts, layer_ids=data.layer_ids, top_k=data.top_k,
            seq_id=np.repeat(np.arange(len(parts)), [len(p) for p in parts]), pos=data.pos[idx], labels=names[data.label[idx]]))
    return out


def _percentiles(frames: list, keys: list[str], value: str) -> tuple:
    table = np.array([f.sort_values(keys)[value].to_numpy(float) for f in frames])
    return np.nanquantile(table, 0.025, axis=0), np.nanquantile(table, 0.975, axis=0)


@pytest.mark.parametrize(("sample_every", "level", "phase"), [(1, "layer", None), (3, "model", None), (3, "layer", "generated")])
def test_streamed_sch_bootstrap_equals_sampled_copies_of_every_draw(tmp_path, monkeypatch, sample_every: int, level: str, phase) -> None:
    """SCH intervals streamed from the store (one pass per draw) = for each seeded draw of ALL the run's
    sequences, plain SCH (every sequence) on the drawn copies of the sampled sequences (by original seq_id)."""
    from moelens.analysis import bootstrap as B
    from moelens.analysis._common import resolve
    from moelens.analysis.sch import sampled_sequences

    store = TraceStore(tmp_path / "traces.duckdb")
    run, _ = _run(store, 9)
    params = {"lookahead": (2, 8), "level": level, "sample_every": sample_every, "phase": phase}
    monkeypatch.setattr(B, "DRAW_BUDGET_BYTES", 1)
    streamed = B.bootstrap("sch", store, run, n_boot=12, seed=5, target_slots=1500, **params)
    data = resolve(store, run, phase=phase)
    draws = _materialised(data, 12, 5, sampled_sequences(data.seq_id, sample_every))
    keys = [k for k in ("layer", "policy", "m", "cache_size") if k in streamed.columns]
    lo, hi = _percentiles([A.sch(d, lookahead=(2, 8), level=level, sample_every=1) for d in draws], keys, "hit_rate")
    got = streamed.sort_values(keys)
    np.testing.assert_allclose(got["hit_rate_lo"], lo, rtol=1e-9)
    np.testing.assert_allclose(got["hit_rate_hi"], hi, rtol=1e-9)
    assert (got["hit_rate_lo"] < got["hit_rate_hi"]).any()
    assert_same(B.bootstrap("sch", data, n_boot=12, seed=5, **params), streamed, "in memory = on the store")


@pytest.mark.parametrize("params", [
    {"label_a": "domain0", "label_b": "domain2"}, {"label_a": "domain1", "label_b": "domain0", "phase": "prompt"},
    {"label_a": "domain0", "label_b": "domain2", "equalize": True}, {"label_a": "domain2", "label_b": "domain1", "equalize": True, "phase": "generated"},
])  # fmt: skip
def test_streamed_risk_difference_bootstrap_equals_the_materialised_draws(tmp_path, monkeypatch, params: dict) -> None:
    """Risk-difference intervals streamed from the store = risk_difference on every materialised draw; with
    ``equalize`` the draws resample the tokens the run's cut keeps (each label's first tokens)."""
    from moelens.analysis import bootstrap as B
    from moelens.analysis._common import resolve

    store = TraceStore(tmp_path / "traces.duckdb")
    run, _ = _run(store, 10)
    data = resolve(store, run, phase=params.get("phase"))
    keep = np.ones(data.n_tokens, bool)
    if params.get("equalize"):
        codes = [data.label_names.index(params[k]) for k in ("label_a", "label_b")]
        limit = min(int((data.label == c).sum()) for c in codes)
        for c in codes:  # each label's first `limit` tokens, in (seq_id, pos) order
            keep &= (data.label != c) | (np.cumsum(data.label == c) <= limit)
    monkeypatch.setattr(B, "DRAW_BUDGET_BYTES", 1)
    streamed = B.bootstrap("risk_difference", store, run, n_boot=12, seed=6, target_slots=1500, **params)
    labels = {k: params[k] for k in ("label_a", "label_b")}
    lo, hi = _percentiles([A.risk_difference(d, **labels) for d in _materialised(data, 12, 6, keep)], ["layer", "expert"], "risk_diff")
    got = streamed.sort_values(["layer", "expert"])
    np.testing.assert_allclose(got["risk_diff_lo"], lo, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got["risk_diff_hi"], hi, rtol=1e-9, atol=1e-12)
    point = A.risk_difference(store, run, **params)
    pd.testing.assert_frame_equal(streamed[list(point.columns)], point)
    assert "sequence partials" in streamed.attrs["params"]["bootstrap_ci"]


def test_sch_and_risk_bootstrap_stream_the_run_within_the_pass_budget(tmp_path, monkeypatch) -> None:
    """On a store the draws never load the run: they go through bounded passes that honour ``max_pass_slots``
    and report their batches over all the passes."""
    from moelens.analysis import bootstrap as B

    store = TraceStore(tmp_path / "traces.duckdb")
    run, _ = _run(store, 11)
    summarize(store, run)  # risk_difference's point estimate answers from the summaries; its draws still stream

    def loaded(*args, **kwargs):
        raise AssertionError("the bootstrap loaded the run")

    monkeypatch.setattr(A.RoutingData, "from_store", loaded)
    monkeypatch.setattr(B, "DRAW_BUDGET_BYTES", 3 * (48 * 8 * 2 + 2) * 8)  # risk: 3 draws per pass, so 3 passes
    A.clear_cache()
    for name, params in (("sch", {"sample_every": 2, "lookahead": (4,)}), ("risk_difference", {"label_a": "domain0", "label_b": "domain1"})):
        seen: list[tuple[int, int]] = []
        out = B.bootstrap(name, store, run, n_boot=8, seed=1, target_slots=1500, max_pass_slots=10**9,
                          progress=lambda done, total: seen.append((done, total)), **params)
        value = B.VALUES[name][0]
        assert out[f"{value}_lo"].notna().any() and (out[f"{value}_lo"] <= out[f"{value}_hi"]).all()
        assert seen[-1][0] == seen[-1][1] and len({t for _, t in seen}) == 1 and [d for d, _ in seen] == sorted(d for d, _ in seen)
        with pytest.raises(NeedsFullPass) as refused:  # the point estimate is kept; the draws' pass is refused
            B.bootstrap(name, store, run, n_boot=8, seed=1, max_pass_slots=0, **params)
        assert refused.value.what == "Resampled"
    with pytest.raises(AssertionError, match="loaded the run"):  # paired runs still materialise their draws
        B.bootstrap("risk_difference", store, run, n_boot=2, label_a="domain0", run_b=run, label_b="domain1")


def test_bootstrap_of_a_permutation_baseline_resamples_the_loaded_run(tmp_path) -> None:
    from moelens.analysis import bootstrap as B
    from moelens.analysis._common import resolve

    store = TraceStore(tmp_path / "traces.duckdb")
    run, _ = _run(store, 8)
    on_store = B.bootstrap("repetition", store, run, n_boot=5, seed=1, values=["perm_first", "first_choice"])
    assert_same(on_store, B.bootstrap("repetition", resolve(store, run), n_boot=5, seed=1, values=["perm_first", "first_choice"]), "perm")
    assert on_store["perm_first_lo"].notna().all()
