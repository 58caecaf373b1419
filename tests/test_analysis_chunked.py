"""Chunked scores: map over batches of whole sequences → merge → finish gives the whole-run result.

Random traces split into random batch sizes (hypothesis) against one batch and against the slow
reference implementations; a real DuckDB store streamed in many small batches; derived summaries that
replace the routing rows; a partitioned Parquet dataset mapped on a local Ray cluster; the CommitteeAudit
ordering fixes."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from test_analysis_properties import to_data, traces

import analysis_reference as ref
import moelens.analysis as A
from moelens import TraceStore
from moelens.analysis import RoutingData
from moelens.analysis.sch import sampled_sequences
from moelens.analysis.stream import iter_batches
from moelens.analysis.summaries import NAMES, summarize
from moelens.analysis.synthetic import write_parquet_run
from moelens.errors import InputError

#: No shrinking: one example runs every score twice, so shrinking a failure would take many minutes.
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                    phases=(Phase.explicit, Phase.reuse, Phase.generate))

#: (score, parameters) run on in-memory traces; labels and regexes are filled in per trace.
SCORES = [
    ("expert_load", {}), ("expert_load", {"by_label": True}), ("layer_balance", {}), ("domain_specialization", {}),
    ("domain_specialization", {"top1": True}), ("domain_summary", {}), ("coactivation", {}), ("coactivation", {"variant": "adjacent"}),
    ("cross_layer_transitions", {}), ("cross_layer_transitions", {"top1": False}), ("cross_layer_consistency", {}),
    ("repetition", {}), ("repetition", {"by_label": True, "seed": 3}), ("srp", {"segment_lengths": (1, 3, 5)}),
    ("srp", {"segment_lengths": (2,), "level": "expert", "by_label": True}), ("srp", {"segment_lengths": (3,), "level": "model"}),
    ("sch", {"lookahead": (2, 5), "sample_every": 1}), ("sch", {"lookahead": (3,), "sample_every": 2, "level": "model"}),
    ("vocabulary_specialization", {"min_count": 1}), ("vocabulary_specialization", {"target": "next", "min_count": 2}),
    ("vocabulary_by_expert", {"min_count": 1}), ("vocabulary_by_expert", {"target": "predicted", "min_count": 1, "normalize": True}),
    ("npmi", {"tokens": (1, 2)}), ("npmi", {"regex": "^t[03]"}), ("npmi_combined", {"targets": [(1, {"tokens": [0]}), (-0.5, {"tokens": [3]})]}),
    ("standing_committee", {"unit": "token", "eci": "minmax"}), ("standing_committee", {"eci": "expected"}),
    ("committee_share", {"unit": "token", "eci": "frequency"}),
]  # fmt: skip


def assert_same(a: pd.DataFrame, b: pd.DataFrame, what: str) -> None:
    """Integers exactly, floats to 1e-9 relative, NaN where NaN, the same params (but the run id)."""
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), check_exact=False, rtol=1e-9, atol=1e-12, obj=what)
    params = [{k: v for k, v in df.attrs.get("params", {}).items() if k not in ("run", "run_b")} for df in (a, b)]
    assert params[0] == params[1], what


@SETTINGS
@given(traces(max_len=10), st.lists(st.integers(1, 3), min_size=1, max_size=4), st.sampled_from([None, "prompt", "generated"]))
def test_every_score_split_into_random_batches_equals_one_batch(trace: ref.Trace, sizes: list[int], phase: str | None) -> None:
    data = to_data(trace)
    for name, params in SCORES:
        fn = A.SCORES[name].function
        try:
            whole = fn(data, phase=phase, **params)
        except InputError:  # e.g. no labelled units: the batched run must refuse the same way
            with pytest.raises(InputError):
                fn(data, phase=phase, batches=sizes, **params)
            continue
        assert_same(fn(data, phase=phase, batches=sizes, **params), whole, f"{name} {params} {sizes}")
    label = next((t.label for t in trace.tokens() if t.label), None)
    if label:
        assert_same(A.npmi(data, label=label, batches=sizes), A.npmi(data, label=label), "npmi label")
    others = sorted({t.label for t in trace.tokens() if t.label})
    if len(others) >= 2:
        for eq in (False, True):
            kw = dict(label_a=others[0], label_b=others[1], equalize=eq)
            assert_same(A.risk_difference(data, batches=sizes, **kw), A.risk_difference(data, **kw), f"risk {eq}")


@SETTINGS
@given(traces(max_len=12), st.lists(st.integers(1, 2), min_size=1, max_size=3))
def test_batched_results_match_the_slow_reference(trace: ref.Trace, sizes: list[int]) -> None:
    data = to_data(trace)
    load = A.expert_load(data, batches=sizes)
    co = A.coactivation(data, batches=sizes)
    rep = A.repetition(data, batches=sizes).set_index("layer")
    sch = A.sch(data, lookahead=(3,), sample_every=1, batches=sizes)
    srp = A.srp(data, segment_lengths=(2,), batches=sizes).set_index("layer")
    for layer in trace.layers:
        counts = load[load.layer == layer].set_index("expert")["count"]
        assert counts.tolist() == [ref.load(trace, layer)["counts"][e] for e in range(trace.n_experts)]
        n_i, n_ij = ref.coactivation(trace, layer)
        got = co[co.layer == layer].set_index(["expert_i", "expert_j"])["n_ij"]
        assert all(got[(i, j)] == n_ij.get((min(i, j), max(i, j)), 0) for i, j in got.index)
        first, overlap = ref.repetition(trace, layer)
        assert _same(rep.loc[layer, "first_choice"], first) and _same(rep.loc[layer, "any_overlap"], overlap)
        value, theta, _ = ref.srp(trace, layer, 2)
        assert _same(srp.loc[layer, "srp"], value) and srp.loc[layer, "theta"] == theta
        expected = ref.sch(trace, layer, 3)
        curve = sch[(sch.layer == layer) & (sch.policy == "sch")].sort_values("cache_size")["hit_rate"]
        assert curve.tolist() == pytest.approx(expected) if expected else curve.isna().all()


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-9, abs=1e-12)


@SETTINGS
@given(traces(dropped=False), st.lists(st.integers(1, 3), min_size=1, max_size=3), st.data())
def test_run_agreement_streams_both_runs_aligned(trace: ref.Trace, sizes: list[int], draw: st.DataObject) -> None:
    data = to_data(trace)
    other = np.array(data.experts)
    flip = draw.draw(st.lists(st.booleans(), min_size=data.n_tokens, max_size=data.n_tokens))
    other[:, np.array(flip, bool)] = other[:, np.array(flip, bool)][..., ::-1]
    b = RoutingData.from_arrays(other, n_experts=data.n_experts, layer_ids=data.layer_ids, seq_id=data.seq_id, token_id=data.token_id)
    assert_same(A.run_agreement(data, None, b, batches=sizes), A.run_agreement(data, None, b), "agreement")


def test_sch_sample_is_a_seeded_hash_of_the_sequence_id() -> None:
    data = A.synthetic(4000, 2, 8, 2, seed=2, seq_len=40)
    every = A.sch(data, lookahead=(4,), sample_every=3)
    assert_same(A.sch(data, lookahead=(4,), sample_every=3, batches=[1, 7, 2]), every, "sch sample")
    chosen = int(sampled_sequences(np.unique(data.seq_id), 3).sum())
    assert 0 < chosen < 100 and every["n_sequences"].eq(chosen).all()
    assert sampled_sequences(np.arange(5), 1).all()


def _synthetic_run(store: TraceStore) -> tuple[int, RoutingData]:
    data = A.synthetic(3000, 3, 8, 2, seed=5, seq_len=37, drop_rate=0.05, generated_fraction=0.3, shared_expert=True)
    return A.write_run(store, data, chunk_tokens=700), data


STORE_SCORES = {
    "expert_load": {"by_label": True}, "layer_balance": {"phase": "prompt"}, "shared_expert_stats": {}, "domain_summary": {},
    "domain_specialization": {"phase": "generated"}, "repetition": {"by_label": True}, "vocabulary_specialization": {"target": "next"},
    "vocabulary_by_expert": {"min_count": 3}, "coactivation": {}, "cross_layer_transitions": {"top1": False},
    "cross_layer_consistency": {}, "srp": {"segment_lengths": (4, 16), "level": "expert"}, "sch": {"lookahead": (4,)},
    "standing_committee": {}, "committee_share": {}, "npmi": {"regex": "^t1"}, "risk_difference": {"label_a": "domain0", "label_b": "domain2", "equalize": True},
    "expert_top_tokens": {"layer": 1, "expert": 3, "n": 5, "n_contexts": 2},
}  # fmt: skip


def test_store_streamed_in_small_batches_equals_arrays(store: TraceStore) -> None:
    run, data = _synthetic_run(store)
    A.clear_cache()
    for name, params in STORE_SCORES.items():
        streamed = A.run_score(store, run, name, target_slots=2000, **params)  # ~330 tokens = ~9 sequences per batch
        assert_same(streamed, A.SCORES[name].function(data, **params), name)
    batches = list(iter_batches(store, run, phase="prompt", target_slots=2000))
    assert len(batches) > 5 and all(b.label_names == data.label_names for b in batches)
    assert sum(b.n_tokens for b in batches) == int((data.phase == 0).sum())
    assert len({int(s) for b in batches for s in np.unique(b.seq_id)}) == sum(len(np.unique(b.seq_id)) for b in batches)  # whole sequences


#: Scores of `STORE_SCORES` that compare labels (a label filter leaves one: refused).
COMPARE_LABELS = ("domain_summary", "domain_specialization", "standing_committee", "committee_share", "risk_difference")


def test_label_filter_streams_that_labels_sequences_alone(store: TraceStore) -> None:
    """``only_label`` = the score of the run restricted to one label's tokens (`RoutingData.select`), streamed,
    with the summaries present but not used (they hold the whole run) and no other sequence read."""
    run, data = _synthetic_run(store)
    summarize(store, run)
    code = data.label_names.index("domain1")
    sub = data.select(data.label == code)
    assert 0 < sub.n_tokens < data.n_tokens / 2
    A.clear_cache()
    for name, params in STORE_SCORES.items():
        if name in COMPARE_LABELS:
            with pytest.raises(InputError, match="compares sequence labels"):
                A.run_score(store, run, name, only_label="domain1", **params)
            continue
        want = A.SCORES[name].function(sub, **params)
        assert_same(A.run_score(store, run, name, target_slots=2000, only_label="domain1", **params), want, name)
        assert_same(A.SCORES[name].function(data, only_label="domain1", **params), want, f"{name} in memory")
    for name, params in (("layer_balance", {}), ("expert_load", {"by_label": True}), ("expert_load", {"phase": "prompt"})):
        A.clear_cache()  # the label-keyed summaries answer a label filter of these: no pass at all
        assert_same(A.run_score(store, run, name, only_label="domain1", max_pass_slots=0, **params),
                    A.SCORES[name].function(sub, **params), f"{name} from summaries")
    A.clear_cache()
    with pytest.raises(A.NeedsFullPass) as needed:  # the pass it would start reads that label's tokens only
        A.coactivation(store, run, only_label="domain1", max_pass_slots=0)
    assert needed.value.n_tokens == sub.n_tokens
    assert len(A.coactivation(store, run, max_pass_slots=0))  # the whole run answers from its summaries
    with pytest.raises(InputError, match="has no label 'nope'; its labels are"):
        A.layer_balance(store, run, only_label="nope")


def test_summaries_replace_the_routing_rows(store: TraceStore) -> None:
    run, data = _synthetic_run(store)
    tables = summarize(store, run)
    assert set(tables) == set(NAMES) == store.summary_names(run)
    assert store.read_summary(run, "expert_counts").column_names == ["layer", "expert", "label", "phase", "count", "top1", "gate_mass"]
    assert store.read_summary(run, "coactivation").num_rows > 0 and store.read_summary(run + 1, "tokens") is None
    with store.connect(write=True) as con:  # the summaries are all these scores need from now on
        con.execute("DELETE FROM routing WHERE run_id = ?", [run])
    A.clear_cache()
    served = {
        "expert_load": [{}, {"by_label": True, "phase": "prompt"}], "layer_balance": [{"phase": "generated"}],
        "domain_specialization": [{"top1": True}], "coactivation": [{}, {"phase": "prompt"}],
        "cross_layer_transitions": [{"top1": False}], "cross_layer_consistency": [{}],
        "vocabulary_specialization": [{"min_count": 2}, {"min_count": 1, "normalize": True, "phase": "prompt"}],
        "vocabulary_by_expert": [{"phase": "generated", "min_count": 1}, {"min_count": 2}],
    }  # fmt: skip
    for name, variants in served.items():
        for params in variants:
            assert_same(A.run_score(store, run, name, **params), A.SCORES[name].function(data, **params), f"{name} {params}")
    big = store.read_summary(run, "token_experts").num_rows  # a summary larger than the pass budget is a pass too
    with pytest.raises(A.NeedsFullPass, match=f"{big:,}-row summary token_experts"):
        A.run_score(store, run, "vocabulary_by_expert", min_count=3, max_pass_slots=big - 1)
    assert len(A.run_score(store, run, "expert_load", phase="generated", max_pass_slots=big - 1))
    rep = store.read_summary(run, "repetition").to_pandas()
    ref_rep = A.repetition(data, by_label=True)
    for (layer, label), g in rep.groupby(["layer", "label"]):
        row = ref_rep[(ref_rep.layer == layer) & (ref_rep.label == label)].iloc[0]
        assert g["n_pairs"].sum() == row["n_pairs"] and g["same_first"].sum() / g["n_pairs"].sum() == pytest.approx(row["first_choice"])
    store.delete_run(run)
    assert store.summary_names(run) == set()


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_engine_over_parquet_shards_equals_in_process(tmp_path, ray_cluster) -> None:
    data = A.synthetic(2400, 3, 8, 2, seed=7, seq_len=60, generated_fraction=0.25)
    folder = write_parquet_run(tmp_path / "dataset", data, run_id=4, n_shards=3)
    store = TraceStore(folder)
    assert store.shard_ids(4) == [0, 1, 2]
    shard_tokens = [sum(b.n_tokens for b in iter_batches(store, 4, shard=s)) for s in (0, 1, 2)]
    assert sum(shard_tokens) == data.n_tokens and min(shard_tokens) > 0
    scores = {**STORE_SCORES, "npmi": {"tokens": [5]}}
    del scores["shared_expert_stats"]  # this trace has no shared experts: refused, as on a file
    for name, params in scores.items():
        A.clear_cache()
        local = A.run_score(store, 4, name, **params)
        A.clear_cache()
        assert_same(A.run_score(store, 4, name, engine="ray", **params), local, name)
        assert_same(local, A.SCORES[name].function(data, **params), name)
    single = TraceStore(tmp_path / "file.duckdb")
    with pytest.raises(InputError, match="Parquet"):
        A.expert_load(single, A.write_run(single, data), engine="ray")


def test_ray_engine_label_filter_equals_in_process(tmp_path, ray_cluster) -> None:
    data = A.synthetic(1800, 2, 8, 2, seed=9, seq_len=40, n_labels=3)
    store = TraceStore(write_parquet_run(tmp_path / "dataset", data, run_id=2, n_shards=3))
    sub = data.select(data.label == data.label_names.index("domain2"))
    for name, params in {"coactivation": {}, "sch": {"lookahead": (4,)}, "srp": {"segment_lengths": (4,)}}.items():
        A.clear_cache()
        ray = A.run_score(store, 2, name, engine="ray", only_label="domain2", **params)
        assert_same(ray, A.SCORES[name].function(sub, **params), name)


def test_committee_orders_by_unrounded_eci() -> None:
    # one unit per label: the 'expected' ECI is the gate weight; 0.12344 and 0.12341 round to the same 0.1234,
    # and the higher id has the larger unrounded ECI: rounding first (the old order) put expert 0 first
    exp = np.array([[1, 0], [1, 0]])
    w = np.array([[0.12344, 0.12341], [0.12344, 0.12341]])
    data = RoutingData.from_arrays(exp, w, n_experts=4, seq_id=[0, 1], labels=["a", "b"])
    lists = A.committee_lists(data, eci="expected", unit="token", list_length=1)
    assert lists["expert"].tolist() == [1, 1] and lists["value"].tolist() == [0.1234, 0.1234]
    assert A.standing_committee(data, eci="expected", unit="token", list_length=1)["committee"].iloc[0] == [1]


def test_committee_long_format_full_ties_go_to_the_lower_expert() -> None:
    # expert 5 appears before expert 2 with the same mean weight and rank: the reference's sorted groupby
    # keys and stable sort keep 2 first (the old first-appearance order kept 5)
    rows = pd.DataFrame(
        [("A", 5, 0.5, 1), ("A", 2, 0.5, 1), ("A", 9, 0.7, 0)], columns=["domain", "expert_idx", "expert_weight", "topk_rank"]
    ).assign(layer=0)
    assert A.committee_lists_from_long(rows, list_length=2)["expert"].tolist() == [9, 2]


def test_cli_summarize_and_ray_engine(tmp_path, ray_cluster) -> None:
    from test_cli import moelens

    db = tmp_path / "t.duckdb"
    data = A.synthetic(600, 2, 8, 2, seed=1, seq_len=50)
    run = A.write_run(TraceStore(db), data)
    out = moelens("summarize", str(run), "--db", str(db))
    assert "expert_counts" in out.stdout and TraceStore(db).summary_names(run) == set(NAMES)
    folder = write_parquet_run(tmp_path / "ds", data, run_id=2, n_shards=2)
    got = moelens("analyze", "layer_balance", "--run", "2", "--db", str(folder), "--engine", "ray", "--format", "csv")
    assert pd.read_csv(io.StringIO(got.stdout))["entropy"].tolist() == pytest.approx(A.layer_balance(data)["entropy"].tolist())
    assert moelens("analyze", "expert_load", "--run", str(run), "--db", str(db), "--engine", "ray", check=False).returncode == 1


def test_progress_and_pass_budget(store: TraceStore) -> None:
    """``progress`` is called once per streamed batch; ``max_pass_slots`` refuses a larger pass with
    `NeedsFullPass` (saying its size) but never a result the summaries can give."""
    from moelens.analysis import NeedsFullPass

    data = A.synthetic(600, 3, 8, 2, seed=3, seq_len=50)
    run = A.write_run(store, data)
    seen: list[tuple[int, int]] = []
    streamed = A.run_score(store, run, "expert_load", target_slots=900, progress=lambda d, t: seen.append((d, t)))
    assert [d for d, _ in seen] == list(range(1, len(seen) + 1)) and len(seen) > 1 and {t for _, t in seen} == {len(seen)}
    A.clear_cache()
    with pytest.raises(NeedsFullPass, match="600 tokens") as err:
        A.run_score(store, run, "expert_load", max_pass_slots=100)
    assert err.value.n_slots == 600 * 3 * 2
    assert A.run_score(store, run, "expert_load", max_pass_slots=10**6).equals(streamed)
    A.clear_cache()
    summarize(store, run)
    assert A.run_score(store, run, "expert_load", max_pass_slots=0).equals(streamed)
