"""Pruning-importance scores: REAP fixtures (CerebrasResearch/reap tests), hand-computed toys, property tests
against the slow reference, and the store path (batched SQL) against the in-memory path."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import importance_reference as ref
from moelens.analysis.importance import ImportanceSums, easy_ep, ean, esft, frequency, importance_sums, man, reap
from moelens.errors import InputError


def _frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows)


# Fixture 1: E = 2, k = 1, token 1 masked out (not stored); softmax over all E, no renormalisation.
FIXTURE_1 = [
    dict(seq_id=0, pos=0, layer=0, expert=0, weight=1.0, norm=5.0, cos=0.0, logits=[2.0, 1.0]),
    dict(seq_id=0, pos=2, layer=0, expert=0, weight=1.0, norm=13.0, cos=0.0, logits=[4.0, 0.0]),
]
# Fixture 2: E = 3, k = 2, renormalised over the selected experts.
_Z0, _Z1 = [2.0, 1.0, 0.0], [1.0, 0.0, 2.0]
FIXTURE_2 = [
    dict(seq_id=0, pos=0, layer=0, expert=0, weight=0.731059, norm=5.0, cos=0.0, logits=_Z0),
    dict(seq_id=0, pos=0, layer=0, expert=1, weight=0.268941, norm=6.0, cos=0.0, logits=_Z0),
    dict(seq_id=0, pos=1, layer=0, expert=2, weight=0.731059, norm=25.0, cos=0.0, logits=_Z1),
    dict(seq_id=0, pos=1, layer=0, expert=0, weight=0.268941, norm=17.0, cos=0.0, logits=_Z1),
]


def _layout(n_experts: int, top_k: int) -> ImportanceSums:
    return ImportanceSums(np.array([0]), np.array([n_experts]), np.array([top_k]))


def test_reap_fixture_1_softmax_gate() -> None:
    rows = _frame(FIXTURE_1)
    sums = importance_sums(rows, gate="softmax", layout=_layout(2, 1))
    np.testing.assert_allclose(sums.sums["gated_norm_sum"][0] / np.maximum(sums.sums["count"][0], 1), [8.210736, 0], atol=1e-6)
    df = reap(rows, gate="softmax")
    np.testing.assert_allclose(df["reap"], [8.210736], atol=1e-6)  # in-memory rows only know expert 0
    assert ean(rows)["ean"].tolist() == [18.0] and man(rows)["man"].tolist() == [9.0]
    assert frequency(rows)["count"].tolist() == [2]


def test_reap_fixture_2_renormalised_softmax_and_used_weights_agree() -> None:
    rows = _frame(FIXTURE_2)
    for gate in ("softmax_renorm", "used"):
        np.testing.assert_allclose(reap(rows, gate=gate)["reap"], [4.113649, 1.613649, 18.276464], atol=1e-5)
    assert frequency(rows)["count"].tolist() == [2, 1, 1]
    assert ean(rows)["ean"].tolist() == [22.0, 6.0, 25.0] and man(rows)["man"].tolist() == [11.0, 6.0, 25.0]
    # Without renormalisation g = softmax over all 3: 0.665241 / 0.244728 / 0.665241 / 0.244728.
    np.testing.assert_allclose(reap(rows, gate="softmax")["reap"],
                               [(5 * 0.665241 + 17 * 0.244728) / 2, 6 * 0.244728, 25 * 0.665241], atol=1e-5)


def test_easy_ep_toy() -> None:
    rows = _frame([
        dict(seq_id=0, pos=0, layer=0, expert=0, weight=0.6, norm=2.0, cos=0.5),  # 0.6 * 2 * 0.5 = 0.6
        dict(seq_id=0, pos=0, layer=0, expert=1, weight=0.4, norm=1.0, cos=0.5),  # 0.2
        dict(seq_id=0, pos=1, layer=0, expert=0, weight=1.0, norm=3.0, cos=-0.5),  # 3 * 1.5 = 4.5
        dict(seq_id=0, pos=2, layer=0, expert=1, weight=1.0, norm=7.0, cos=1.0),  # max(1 - 1, 0) = 0
        dict(seq_id=0, pos=3, layer=0, expert=1, weight=0.0, norm=9.0, cos=0.0),  # weight 0: not routed
    ])
    np.testing.assert_allclose(easy_ep(rows)["easy_ep"], [5.1, 0.2])


def test_esft_toy_keeps_by_cumulative_relevance() -> None:
    rows = _frame([
        dict(seq_id=0, pos=0, layer=0, expert=0, weight=0.7), dict(seq_id=0, pos=0, layer=0, expert=1, weight=0.3),
        dict(seq_id=0, pos=1, layer=0, expert=0, weight=0.6), dict(seq_id=0, pos=1, layer=0, expert=2, weight=0.4),
    ])
    layout = ImportanceSums(np.array([0]), np.array([4]), np.array([2]))
    sums = importance_sums(rows, layout=layout, norms=False)
    assert sums.n_tokens == 2 and sums.sums["count"][0].tolist() == [2, 1, 1, 0]
    by_gate = esft(rows, top_p=0.7)
    np.testing.assert_allclose(by_gate["gate_relevance"], [0.65, 0.15, 0.2])
    np.testing.assert_allclose(by_gate["token_relevance"], [2 / 2 / 2, 1 / 2 / 2, 1 / 2 / 2])  # (n_j / k) / N
    assert by_gate.loc[by_gate["keep"], "expert"].tolist() == [0, 2]  # 0 + 0.65 < 0.7, then 0.85 stops
    assert esft(rows, by="token", top_p=0.6).query("keep")["expert"].tolist() == [0, 1]  # ties by expert id
    with pytest.raises(InputError):
        esft(rows, top_p=0)


_row = st.fixed_dictionaries({
    "seq_id": st.integers(0, 3), "pos": st.integers(0, 5), "layer": st.sampled_from([0, 3]),
    "expert": st.integers(-1, 4), "weight": st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.9]),
    "norm": st.floats(0.0, 10.0), "cos": st.floats(-1.0, 1.0),
    "logits": st.lists(st.floats(-3, 3), min_size=5, max_size=5),
})


def _unique_slots(rows: list[dict]) -> list[dict]:
    seen, out = set(), []
    for r in rows:
        key = (r["seq_id"], r["pos"], r["layer"], r["expert"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_row, min_size=1, max_size=40), st.sampled_from(["used", "softmax", "softmax_renorm"]))
def test_scores_match_the_slow_reference(rows: list[dict], gate: str) -> None:
    rows = _unique_slots(rows)
    frame = _frame(rows)
    layout = ImportanceSums(np.array([0, 3]), np.array([5, 5]), np.array([2, 2]))
    sums = importance_sums(frame, gate=gate, layout=layout)
    want_reap, want_ean, want_freq, want_easy = ref.reap(rows, gate), ref.ean(rows), ref.frequency(rows), ref.easy_ep(rows)
    for li, layer in enumerate([0, 3]):
        for e in range(5):
            key = (layer, e)
            count = sums.sums["count"][li, e]
            assert count == want_freq.get(key, 0)
            got_reap = sums.sums["gated_norm_sum"][li, e] / count if count else 0.0
            assert got_reap == pytest.approx(want_reap.get(key, 0.0), rel=1e-9, abs=1e-9)
            assert sums.sums["norm_sum"][li, e] == pytest.approx(want_ean.get(key, 0.0), rel=1e-9, abs=1e-9)
            assert sums.sums["easy_ep_sum"][li, e] == pytest.approx(want_easy.get(key, 0.0), rel=1e-9, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(st.lists(_row, min_size=1, max_size=40), st.floats(0.05, 1.0), st.sampled_from(["gate", "token"]))
def test_esft_keep_matches_the_reference(rows: list[dict], top_p: float, by: str) -> None:
    frame = _frame(_unique_slots(rows))
    df = esft(frame, by=by, top_p=top_p)
    for layer, group in df.groupby("layer"):
        relevance = dict(zip(group["expert"], group["esft"]))
        assert set(group.loc[group["keep"], "expert"]) == ref.esft_keep(relevance, top_p)


@settings(max_examples=30, deadline=None)
@given(st.lists(_row, min_size=2, max_size=40), st.integers(1, 3))
def test_merging_batches_is_exact(rows: list[dict], cut: int) -> None:
    """map → merge: sums over whole-sequence batches add up to the sums over everything."""
    frame = _frame(_unique_slots(rows))
    layout = ImportanceSums(np.array([0, 3]), np.array([5, 5]), np.array([2, 2]))
    whole = importance_sums(frame, layout=layout)
    parts = [importance_sums(part, layout=layout) for part in (frame[frame.seq_id < cut], frame[frame.seq_id >= cut])]
    merged = parts[0] + parts[1]
    assert merged.n_tokens == whole.n_tokens
    for name, values in whole.sums.items():
        np.testing.assert_allclose(merged.sums[name], values, rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    from moelens import TraceStore
    from moelens.recording.record import record
    from moelens.tiny import tiny_model, tiny_tokenizer

    store = TraceStore(tmp_path_factory.mktemp("imp") / "t.duckdb")
    model, _ = tiny_model("qwen3_moe")
    texts = ["def f(x): return x * 2", "the cat sat on the mat", "1 + 2 = 3", "more words here", "x = [1, 2]"]
    labels = ["code", "prose", "math", "prose", "code"]
    full = record(model, tiny_tokenizer(), texts, labels=labels, store=store, batch_size=2, progress=False,
                  contributions=True, logits=True)
    plain = record(model, tiny_tokenizer(), texts, store=store, progress=False)
    return store, full, plain


def _stored_rows(store, run: int) -> list[dict]:
    df = store.query(
        "SELECT r.seq_id, r.pos, r.layer, r.expert, r.weight, c.norm, b.cos, z.logits FROM routing r "
        "JOIN expert_contributions c USING (run_id, seq_id, pos, layer, rank) "
        "JOIN block_residuals b USING (run_id, seq_id, pos, layer) JOIN router_logits z USING (run_id, seq_id, pos, layer) "
        "WHERE r.run_id = ?", [run])
    return [dict(row, logits=list(row["logits"])) for row in df.to_dict("records")]


@pytest.mark.parametrize("gate", ["used", "softmax_renorm"])
def test_store_path_in_batches_matches_the_reference(recorded, gate: str) -> None:
    store, run, _ = recorded
    rows = _stored_rows(store, run)
    want = ref.reap(rows, gate)
    one_batch = reap(store, run, gate=gate)
    per_seq = importance_sums(store, run, gate=gate, batch_sequences=1)
    assert len(one_batch) == 2 * 8 and one_batch.attrs["params"]["gate"] == gate
    for row in one_batch.itertuples():
        assert row.reap == pytest.approx(want.get((row.layer, row.expert), 0.0), rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(per_seq.sums["gated_norm_sum"], importance_sums(store, run, gate=gate).sums["gated_norm_sum"])
    easy = easy_ep(store, run)
    want_easy = ref.easy_ep(rows)
    for row in easy.itertuples():
        assert row.easy_ep == pytest.approx(want_easy.get((row.layer, row.expert), 0.0), rel=1e-5, abs=1e-6)


def test_frequency_reads_the_load_partial_and_equals_the_joined_rows(recorded) -> None:
    """frequency comes from expert_load's partial (summaries or a bounded stream), not from the joined rows the
    norm-based scores read: the same counts and gate mass either way, per label and phase too."""
    store, run, _ = recorded
    for params in ({}, {"label": "code"}, {"phase": "prompt"}):
        joined = importance_sums(store, run, norms=True, **params)
        for weighted, name in ((False, "count"), (True, "gate_mass")):
            got = frequency(store, run, weighted=weighted, **params)
            want = [joined.sums[name][li, e] for li in range(len(joined.layers)) for e in range(int(joined.n_experts[li]))]
            np.testing.assert_allclose(got["frequency"].to_numpy(), want, rtol=1e-9)
        assert got.attrs["params"]["n_tokens"] == joined.n_tokens
    with pytest.raises(InputError, match="has no sequences labelled 'poetry'; its labels are: code, math, prose"):
        frequency(store, run, label="poetry")


def test_store_filters_and_clear_refusals(recorded) -> None:
    store, run, plain = recorded
    code = frequency(store, run, label="code")
    n_code_tokens = int(store.query("SELECT sum(n_tokens) AS n FROM sequences WHERE run_id = ? AND label = 'code'", [run])["n"][0])
    assert code.groupby("layer")["count"].sum().tolist() == [2 * n_code_tokens] * 2  # k = 2 slots per token
    assert frequency(store, plain)["count"].sum() > 0  # routing-only scores need no contributions
    with pytest.raises(InputError, match="--contributions"):
        reap(store, plain)
    with pytest.raises(InputError, match="gate must be one of"):
        reap(store, run, gate="nope")
