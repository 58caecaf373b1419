"""Property tests: every score against the simple per-token implementations in ``analysis_reference.py``
on random routings (random E, k, layers, sequence lengths, dropped and weight-0 slots, labels)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import analysis_reference as ref
import moelens.analysis as A
from moelens.analysis import RoutingData

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LABELS = ["a", "b", "c", None]


@st.composite
def traces(draw, max_layers: int = 3, max_experts: int = 8, max_k: int = 3, max_len: int = 12, dropped: bool = True) -> ref.Trace:
    n_layers = draw(st.integers(1, max_layers))
    E = draw(st.integers(2, max_experts))
    k = draw(st.integers(1, min(max_k, E)))
    layers = sorted(draw(st.sets(st.integers(0, 20), min_size=n_layers, max_size=n_layers)))
    trace = ref.Trace(E, k, layers)
    for _ in range(draw(st.integers(1, 4))):
        label = draw(st.sampled_from(LABELS))
        length = draw(st.integers(1, max_len))
        n_prompt = draw(st.integers(0, length))
        seq = []
        for i in range(length):
            slots = {}
            for layer in layers:
                ids = draw(st.permutations(range(E)))[:k]
                weights = sorted((draw(st.integers(1, 9)) / 10 for _ in range(k)), reverse=True)
                keep = [not dropped or draw(st.integers(0, 7)) > 0 for _ in range(k)]
                slots[layer] = [(e, w) if ok else None for e, w, ok in zip(ids, weights, keep)]
            seq.append(
                ref.Tok(
                    token_id=draw(st.integers(0, 5)),
                    label=label,
                    slots=slots,
                    predicted=draw(st.integers(-1, 5)),
                    phase="prompt" if i < n_prompt else "generated",
                )
            )
        trace.seqs.append(seq)
    return trace


def to_data(trace: ref.Trace) -> RoutingData:
    toks = trace.tokens()
    experts = np.array([[[-1 if s is None else s[0] for s in t.slots[layer]] for t in toks] for layer in trace.layers])
    weights = np.array([[[0.0 if s is None else s[1] for s in t.slots[layer]] for t in toks] for layer in trace.layers])
    return RoutingData.from_arrays(
        experts,
        weights,
        n_experts=trace.n_experts,
        layer_ids=trace.layers,
        seq_id=[i for i, s in enumerate(trace.seqs) for _ in s],
        token_id=[t.token_id for t in toks],
        predicted_id=[t.predicted for t in toks],
        phase=[t.phase for t in toks],
        labels=[t.label for t in toks],
    )


def same(a: float, b: float, tol: float = 1e-9) -> bool:
    """Equal within ``tol``, or both NaN (missing must stay missing)."""
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=tol, abs=tol)


@SETTINGS
@given(traces())
def test_load_and_balance(trace: ref.Trace) -> None:
    data = to_data(trace)
    load, bal = A.expert_load(data), A.layer_balance(data).set_index("layer")
    for layer in trace.layers:
        r = ref.load(trace, layer)
        part = load[load.layer == layer]
        assert part["count"].tolist() == r["counts"]
        assert part["gate_mass"].tolist() == pytest.approx(r["mass"], abs=1e-5)
        if sum(r["counts"]):
            for key in ("entropy", "norm_entropy", "max_mean", "cv"):
                assert bal.loc[layer, key] == pytest.approx(r[key], abs=1e-9)
            assert bal.loc[layer, "dead_experts"] == r["dead"]


@SETTINGS
@given(traces(), st.booleans())
def test_domain_specialization(trace: ref.Trace, top1: bool) -> None:
    df = A.domain_specialization(to_data(trace), top1=top1)
    for layer in trace.layers:
        for (d, e), value in ref.domain_spec(trace, layer, top1).items():
            got = df[(df.layer == layer) & (df.label == d) & (df.expert == e)]["spec"].iloc[0]
            assert got == pytest.approx(value)


@SETTINGS
@given(traces())
def test_domain_summary(trace: ref.Trace) -> None:
    if not any(t.label for t in trace.tokens()):
        return
    df = A.domain_summary(to_data(trace)).set_index("layer")
    for layer in trace.layers:
        r = ref.domain_summary(trace, layer)
        for key, value in r.items():
            assert same(df.loc[layer, key], value), (key, layer, df.loc[layer, key], value)


@SETTINGS
@given(traces(), st.sampled_from(["input", "next", "predicted"]), st.integers(1, 3))
def test_vocabulary(trace: ref.Trace, target: str, min_count: int) -> None:
    data = to_data(trace)
    layer_scores = A.vocabulary_specialization(data, target=target, min_count=min_count).set_index("layer")
    by_expert = A.vocabulary_by_expert(data, target=target, min_count=min_count)
    for layer in trace.layers:
        score, n_ids, per_expert = ref.vocabulary(trace, layer, target, min_count)
        assert same(layer_scores.loc[layer, "score"], score) and layer_scores.loc[layer, "n_token_ids"] == n_ids
        part = by_expert[by_expert.layer == layer].set_index("expert")
        for e, (s, n) in per_expert.items():
            assert part.loc[e, "n_token_ids"] == n and same(part.loc[e, "score"], s)


@SETTINGS
@given(traces(max_k=4), st.sampled_from(["all", "adjacent"]))
def test_coactivation(trace: ref.Trace, variant: str) -> None:
    df = A.coactivation(to_data(trace), variant=variant)
    for layer in trace.layers:
        n, nij = ref.coactivation(trace, layer, adjacent=variant == "adjacent")
        part = df[df.layer == layer]
        for row in part.itertuples():
            assert row.n_i == n[row.expert_i] and row.n_ij == nij[(row.expert_i, row.expert_j)]
            if n[row.expert_i]:
                assert row.p_j_given_i == pytest.approx(nij[(row.expert_i, row.expert_j)] / n[row.expert_i])


@SETTINGS
@given(traces(max_layers=3))
def test_cross_layer(trace: ref.Trace) -> None:
    data = to_data(trace)
    tr = A.cross_layer_transitions(data)
    cons = A.cross_layer_consistency(data).set_index("layer")
    for layer, nxt in zip(trace.layers, trace.layers[1:]):
        counts = ref.transitions(trace, layer, nxt)
        part = tr[tr.layer == layer]
        assert {(r.expert, r.next_expert): r.count for r in part.itertuples()} == dict(counts)
        if counts:
            r = ref.consistency(trace, layer, nxt)
            assert cons.loc[layer, "mi_bits"] == pytest.approx(r["mi_bits"], abs=1e-9)
            assert cons.loc[layer, "predictability"] == pytest.approx(r["predictability"])
            assert cons.loc[layer, "baseline"] == pytest.approx(r["baseline"])


@SETTINGS
@given(traces())
def test_repetition(trace: ref.Trace) -> None:
    df = A.repetition(to_data(trace)).set_index("layer")
    for layer in trace.layers:
        first, overlap = ref.repetition(trace, layer)
        assert same(df.loc[layer, "first_choice"], first) and same(df.loc[layer, "any_overlap"], overlap)


@SETTINGS
@given(traces(max_len=14), st.lists(st.integers(1, 9), min_size=1, max_size=3, unique=True))
def test_srp(trace: ref.Trace, ms: list[int]) -> None:
    df = A.srp(to_data(trace), segment_lengths=ms)
    for layer in trace.layers:
        for m in ms:
            value, theta, rho = ref.srp(trace, layer, m)
            row = df[(df.layer == layer) & (df.m == m)].iloc[0]
            assert same(row["srp"], value) and row["theta"] == theta and same(row["rho"], rho)


@SETTINGS
@given(traces(max_len=14, max_experts=7), st.lists(st.integers(1, 16), min_size=1, max_size=2, unique=True))
def test_sch_and_lru(trace: ref.Trace, ms: list[int]) -> None:
    df = A.sch(to_data(trace), lookahead=ms, sample_every=1)
    for layer in trace.layers:
        for policy, m in [("sch", m) for m in ms] + [("lru", None)]:
            expected = ref.sch(trace, layer, m)
            got = df[(df.layer == layer) & (df.policy == policy) & (df.m == (m if m else -1))].sort_values("cache_size")
            if expected:
                assert got["hit_rate"].tolist() == pytest.approx(expected)
            else:
                assert got["hit_rate"].isna().all()


@SETTINGS
@given(traces(dropped=False), st.data())
def test_run_agreement(trace: ref.Trace, data: st.DataObject) -> None:
    other = ref.Trace(trace.n_experts, trace.top_k, trace.layers)
    for seq in trace.seqs:
        new_seq = []
        for tok in seq:
            slots = {}
            for layer in trace.layers:
                if data.draw(st.booleans()):
                    ids = data.draw(st.permutations(range(trace.n_experts)))[: trace.top_k]
                    slots[layer] = [(e, 1.0) for e in ids]
                else:
                    slots[layer] = tok.slots[layer]
            new_seq.append(ref.Tok(tok.token_id, tok.label, slots, tok.predicted, tok.phase))
        other.seqs.append(new_seq)
    df = A.run_agreement(to_data(trace), None, to_data(other)).set_index("layer")
    for layer in trace.layers:
        top1, overlap = ref.agreement(trace, other, layer)
        assert same(df.loc[layer, "top1_agreement"], top1) and df.loc[layer, "topk_overlap"] == pytest.approx(overlap)


@SETTINGS
@given(traces(), st.integers(0, 5))
def test_npmi(trace: ref.Trace, token: int) -> None:
    df = A.npmi(to_data(trace), tokens=[token])
    for layer in trace.layers:
        expected = ref.npmi(trace, layer, lambda t: t.token_id == token)
        got = df[df.layer == layer].set_index("expert")["npmi"]
        for e, value in expected.items():
            assert same(got[e], value)


@SETTINGS
@given(traces())
def test_risk_difference(trace: ref.Trace) -> None:
    labels = sorted({t.label for t in trace.tokens() if t.label})
    if len(labels) < 2:
        return
    df = A.risk_difference(to_data(trace), label_a=labels[0], label_b=labels[1])
    for layer in trace.layers:
        got = df[df.layer == layer].set_index("expert")["risk_diff"]
        for e, value in ref.risk_difference(trace, layer, labels[0], labels[1]).items():
            assert got[e] == pytest.approx(value)


@SETTINGS
@given(traces(), st.sampled_from(["minmax", "frequency", "expected"]))
def test_eci(trace: ref.Trace, variant: str) -> None:
    from moelens.analysis.committee import contribution_index

    data = to_data(trace)
    for li, layer in enumerate(trace.layers):
        units = [t.slots[layer] for t in trace.tokens()]
        expected = ref.eci(units, trace.n_experts, variant)
        got = contribution_index(data.experts[li], data.weights[li], trace.n_experts, variant)
        assert got.tolist() == pytest.approx(expected, abs=1e-6)


@st.composite
def committee_lists(draw) -> dict[str, list[tuple[int, float]]]:
    K = draw(st.integers(1, 4))
    n_domains = draw(st.integers(1, 5))
    lists = {}
    for d in range(n_domains):
        ids = draw(st.permutations(range(8)))[:K]
        values = sorted((draw(st.integers(0, 50)) / 100 for _ in range(K)), reverse=True)
        lists[f"d{d}"] = list(zip(ids, values))
    return lists


@SETTINGS
@given(committee_lists(), st.sampled_from([0.5, 0.8, 1.0]))
def test_audit(lists: dict[str, list[tuple[int, float]]], gamma: float) -> None:
    import pandas as pd

    rows = [(0, d, r + 1, e, v) for d, lst in lists.items() for r, (e, v) in enumerate(lst)]
    frame = pd.DataFrame(rows, columns=["layer", "domain", "rank", "expert", "value"])
    row = A.audit_committee(frame, presence_ratio=gamma, n_experts=8).iloc[0]
    expected = ref.audit(lists, gamma, 8)
    assert row["committee"] == expected["committee"]
    assert row["coverage"] == pytest.approx(expected["coverage"])
    assert row["ratio"] == pytest.approx(expected["ratio"])


@SETTINGS
@given(traces(max_len=10), st.integers(1, 6), st.sampled_from(["expert", "model"]), st.booleans())
def test_srp_levels_and_labels(trace: ref.Trace, m: int, level: str, by_label: bool) -> None:
    df = A.srp(to_data(trace), segment_lengths=(m,), level=level, by_label=by_label)
    labels = sorted({s[0].label for s in trace.seqs}, key=lambda v: (v is None, v or "")) if by_label else ["any"]
    for label in labels:
        part = df[df["label"].isna()] if label is None else df[df["label"] == label] if by_label else df
        if level == "model":
            expected = ref.srp(trace, trace.layers, m, label=label)
            row = part.iloc[0]
            assert same(row["srp"], expected[0]) and row["theta"] == expected[1] and same(row["rho"], expected[2])
            continue
        for layer in trace.layers:
            for e in range(trace.n_experts):
                value, theta, rho = ref.srp(trace, layer, m, expert=e, label=label)
                row = part[(part.layer == layer) & (part.expert == e)].iloc[0]
                assert same(row["srp"], value) and row["theta"] == theta and same(row["rho"], rho)


@SETTINGS
@given(traces(max_len=10, max_experts=5, max_layers=2), st.integers(1, 8))
def test_sch_model_level(trace: ref.Trace, m: int) -> None:
    df = A.sch(to_data(trace), lookahead=(m,), level="model", sample_every=1)
    for policy, mm in (("sch", m), ("lru", None)):
        expected = ref.sch(trace, None, mm)
        got = df[df.policy == policy].sort_values("cache_size")["hit_rate"]
        assert got.tolist() == pytest.approx(expected) if expected else got.isna().all()


@SETTINGS
@given(traces(), st.data())
def test_expert_top_tokens(trace: ref.Trace, data: st.DataObject) -> None:
    layer = data.draw(st.sampled_from(trace.layers))
    expert = data.draw(st.integers(0, trace.n_experts - 1))
    df = A.expert_top_tokens(to_data(trace), None, layer, expert, n=3)
    counts = ref.top_tokens(trace, layer, expert)
    expected = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    assert list(zip(df["token_id"], df["count"])) == expected


@SETTINGS
@given(traces(), st.data())
def test_committee_share(trace: ref.Trace, data: st.DataObject) -> None:
    members = {layer: data.draw(st.sets(st.integers(0, trace.n_experts - 1), max_size=3)) for layer in trace.layers}
    df = A.committee_share(to_data(trace), committee=members)
    for layer in trace.layers:
        for label, (count_share, mass_share) in ref.committee_share(trace, layer, members[layer]).items():
            row = df[(df.layer == layer) & (df.label == label)].iloc[0]
            assert same(row["count_share"], count_share) and same(row["mass_share"], mass_share, tol=1e-6)  # float32 weights


@SETTINGS
@given(traces(), st.integers(0, 5), st.sampled_from(["a", "b"]), st.floats(-2, 2), st.floats(-2, 2))
def test_npmi_combined(trace: ref.Trace, token: int, label: str, c1: float, c2: float) -> None:
    if label not in {t.label for t in trace.tokens()}:
        return  # an unknown label is an InputError (tested in the fixtures)
    df = A.npmi_combined(to_data(trace), targets=[(c1, {"tokens": [token]}), (c2, {"label": label})])
    for layer in trace.layers:
        n1 = ref.npmi(trace, layer, lambda t: t.token_id == token)
        n2 = ref.npmi(trace, layer, lambda t: t.label == label)
        got = df[df.layer == layer].set_index("expert")["score"]
        for e in range(trace.n_experts):
            assert same(got[e], c1 * n1[e] + c2 * n2[e])


@SETTINGS
@given(traces(), st.data())
def test_shared_expert_stats(trace: ref.Trace, data: st.DataObject) -> None:
    T = len(trace.tokens())
    gates = [[data.draw(st.one_of(st.none(), st.floats(0, 1))) for _ in range(T)] for _ in trace.layers]
    base = to_data(trace)
    with_gates = RoutingData.from_arrays(
        base.experts, base.weights, n_experts=trace.n_experts, layer_ids=trace.layers, seq_id=base.seq_id,
        shared_gate=[[np.nan if g is None else g for g in row] for row in gates],
    )  # fmt: skip
    df = A.shared_expert_stats(with_gates).set_index("layer")
    for layer, row in zip(trace.layers, gates):
        values = [float(np.float32(g)) for g in row if g is not None]
        if not values:
            assert layer not in df.index
            continue
        mean = sum(values) / len(values)
        assert df.loc[layer, "n_tokens"] == len(values) and df.loc[layer, "mean_gate"] == pytest.approx(mean, abs=1e-9)
        assert df.loc[layer, "std_gate"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)), abs=1e-7)
        assert (df.loc[layer, "min_gate"], df.loc[layer, "max_gate"]) == (min(values), max(values))


@SETTINGS
@given(traces())
def test_label_profiles(trace: ref.Trace) -> None:
    data = to_data(trace)
    keys, matrix = A.expert_profiles(data, "label")
    labels = list(data.label_names)
    for layer in trace.layers:
        spec = ref.domain_spec(trace, layer)
        for e in range(trace.n_experts):
            row = matrix[(keys.layer == layer).to_numpy() & (keys.expert == e).to_numpy()][0]
            column = [spec.get((d, e), 0.0) for d in labels]
            total = sum(column)
            assert row.tolist() == pytest.approx([v / total for v in column] if total else [0.0] * len(labels))
