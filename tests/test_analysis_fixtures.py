"""Every score on hand-computed fixtures of the papers' definitions: a 6-token toy, the 8-token SRP example, SCH
fixture A (computed with moe-lrc's ``calc_fsf``), CommitteeAudit's audit and ECI fixtures (confirmed with its
``Audit_Committee.py``), a risk-difference toy and OLMoE's adjacent-pair example."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

import moelens.analysis as A
from moelens.analysis import RoutingData
from moelens.errors import InputError

TOY = [[0, 1], [0, 2], [2, 0], [3, 1], [3, 1], [1, 2]]
TOY_TOKENS = [5, 7, 5, 9, 9, 5]
SECOND_RUN = [[0, 1], [0, 3], [2, 0], [1, 3], [3, 2], [1, 2]]
FIXTURE_A = [[0, 1], [0, 2], [1, 2], [3, 0], [3, 1], [0, 1], [2, 3], [0, 1]]


def approx(x: float, rel: float = 1e-4) -> object:
    return pytest.approx(x, rel=rel, abs=1e-6)


@pytest.fixture
def toy() -> RoutingData:
    """The toy: one sequence, one layer, 6 tokens, E = 4, k = 2; labels A (t0-t2), B (t3-t5)."""
    return RoutingData.from_arrays(np.array(TOY), n_experts=4, token_id=TOY_TOKENS, labels=["A"] * 3 + ["B"] * 3)


def test_load_and_balance_toy(toy: RoutingData) -> None:
    load = A.expert_load(toy)
    assert load["count"].tolist() == [3, 4, 3, 2]
    assert load["activation_rate"].tolist() == pytest.approx([0.5, 2 / 3, 0.5, 1 / 3])
    assert load["share"].tolist() == pytest.approx([0.25, 1 / 3, 0.25, 1 / 6])
    assert load["gate_share"].tolist() == pytest.approx([0.25, 1 / 3, 0.25, 1 / 6])  # equal default weights
    bal = A.layer_balance(toy).iloc[0]
    assert bal["entropy"] == approx(1.357978)
    assert bal["norm_entropy"] == approx(0.979574)
    assert bal["effective_experts"] == approx(3.888323)
    assert bal["max_mean"] == approx(4 / 3)
    assert bal["maxvio"] == approx(1 / 3)
    assert bal["cv"] == approx(0.235702)
    assert bal["dead_experts"] == 0


def test_load_by_label_and_gate_mass() -> None:
    data = RoutingData.from_arrays(
        np.array([[0, 1], [0, 2], [1, -1]]), np.array([[0.7, 0.3], [0.6, 0.4], [1.0, 0.0]]), n_experts=3, labels=["x", "x", None]
    )
    load = A.expert_load(data, by_label=True)
    x = load[load["label"] == "x"]
    assert x["count"].tolist() == [2, 1, 1]
    assert x["gate_mass"].tolist() == pytest.approx([1.3, 0.3, 0.4])
    none = load[load["label"].isna()]
    assert none["count"].tolist() == [0, 1, 0] and none["activation_rate"].tolist() == [0, 1, 0]


def test_empty_layer_is_nan_not_zero() -> None:
    data = RoutingData.from_arrays(np.full((3, 2), -1), n_experts=4)
    bal = A.layer_balance(data).iloc[0]
    assert math.isnan(bal["entropy"]) and bal["dead_experts"] == 4
    assert A.expert_load(data)["share"].isna().all()


def test_repetition_toy(toy: RoutingData) -> None:
    row = A.repetition(toy).iloc[0]
    assert row["first_choice"] == approx(0.4) and row["n_pairs"] == 5
    assert row["any_overlap"] == approx(0.8)
    assert row["uniform_first"] == approx(0.25)
    assert row["uniform_overlap"] == approx(0.833333)
    assert row["sum_sq_first"] == approx(0.277778)


@pytest.mark.parametrize(("E", "k", "expected"), [(8, 2, 0.4643), (64, 8, 0.6791), (128, 8, 0.4123), (64, 6, 0.4601), (256, 8, 0.2271), (4, 2, 0.8333)])
def test_uniform_overlap_baselines(E: int, k: int, expected: float) -> None:
    from moelens.analysis.repetition import uniform_overlap

    assert uniform_overlap(E, k) == pytest.approx(expected, abs=1e-4)


def test_srp_toy_and_eight_token_fixture(toy: RoutingData) -> None:
    df = A.srp(toy, segment_lengths=(2, 4)).set_index("m")
    assert df.loc[2, "srp"] == approx(0.833333) and df.loc[2, "theta"] == 1 and df.loc[2, "rho"] == approx(1.4)
    assert df.loc[2, "f1_theta0"] == approx(2 / 3) and df.loc[2, "act_rate"] == approx(0.5)
    assert df.loc[4, "srp"] == approx(0.6875) and df.loc[4, "theta"] == 2 and df.loc[4, "rho"] == approx(1.666667)
    eight = RoutingData.from_arrays(np.array([[0, 1], [0, 1], [0, 2], [0, 2], [1, 3], [1, 3], [1, 3], [2, 3]]), n_experts=4)
    row = A.srp(eight, segment_lengths=(4,)).iloc[0]
    assert row["srp"] == approx(0.75) and row["theta"] == 2 and row["rho"] == approx(1.4)


def test_srp_f1_curve_eight_token() -> None:  # θ = 0..4 → 0.6667, 0.7143, 0.75, 0.625, 0.3333
    from moelens.analysis._kernels import jit, window_histograms
    from moelens.analysis.srp import f1_curve

    exp = np.array([[0, 1], [0, 1], [0, 2], [0, 2], [1, 3], [1, 3], [1, 3], [2, 3]], np.int16)
    hist = jit(window_histograms)(exp, np.array([0]), np.array([8]), np.zeros(1, np.int64), 1, 4, 4)[0].sum(axis=0)
    tp, pred, act = f1_curve(hist, 4)
    assert (tp[2], pred[2], act) == (36, 56, 40)
    assert (2 * tp / (pred + act)).tolist() == pytest.approx([0.6667, 0.7143, 0.75, 0.625, 0.3333], abs=1e-4)


def test_srp_single_sequence_any_m_and_too_short() -> None:  # moelens allows any m <= T
    data = RoutingData.from_arrays(np.array(FIXTURE_A), n_experts=4)
    df = A.srp(data, segment_lengths=(3, 8, 9)).set_index("m")
    assert not math.isnan(df.loc[3, "srp"]) and df.loc[8, "n_windows"] == 1
    assert math.isnan(df.loc[9, "srp"]) and df.loc[9, "n_windows"] == 0


def _curves(df: pd.DataFrame) -> dict[object, list[float]]:
    return {(p, m): g.sort_values("cache_size")["hit_rate"].round(4).tolist() for (p, m), g in df.groupby(["policy", "m"])}


def test_sch_fixture_a() -> None:
    curves = _curves(A.sch(RoutingData.from_arrays(np.array(FIXTURE_A), n_experts=4), lookahead=(1, 2, 4, 8)))
    assert curves[("sch", 1)] == [0.1875, 0.375, 0.75, 1.0]
    assert curves[("sch", 2)] == [0.1875, 0.5625, 0.875, 1.0]
    assert curves[("sch", 4)] == [0.1875, 0.5625, 0.875, 1.0]
    assert curves[("sch", 8)] == [0.1875, 0.5, 0.875, 1.0]  # not monotone in m
    assert curves[("lru", -1)] == [0.1875, 0.375, 0.75, 1.0]


def test_sch_toy_and_reversed_order(toy: RoutingData) -> None:
    curves = _curves(A.sch(toy, lookahead=(1, 2, 4, 8)))
    third = [0.3333, 0.6667, 0.8333, 1.0]
    assert curves[("sch", 1)] == third and curves[("sch", 2)] == third and curves[("lru", -1)] == third
    assert curves[("sch", 4)] == curves[("sch", 8)] == [0.3333, 0.6667, 0.9167, 1.0]
    reversed_ = _curves(A.sch(RoutingData.from_arrays(np.array(TOY)[:, ::-1], n_experts=4), lookahead=(1, 2, 4)))
    assert all(c == [0.3333, 0.6667, 0.9167, 1.0] for c in reversed_.values())


def test_sch_cache_ratio_sampling_and_model_level(toy: RoutingData) -> None:
    df = A.sch(toy, lookahead=(2,), sample_every=1)
    assert df["cache_ratio"].tolist()[:4] == [0.5, 1.0, 1.5, 2.0]
    assert df.attrs["params"]["sample_every"] == 1 and df["n_sequences"].eq(1).all()
    model = A.sch(toy, lookahead=(2,), level="model", lru=False)
    assert "layer" not in model and model["hit_rate"].tolist() == pytest.approx(df[df.policy == "sch"]["hit_rate"].tolist())


def test_coactivation_toy(toy: RoutingData) -> None:
    df = A.coactivation(toy).set_index(["expert_i", "expert_j"])
    expected = {(0, 1): 1 / 3, (0, 2): 2 / 3, (0, 3): 0, (1, 0): 0.25, (1, 2): 0.25, (1, 3): 0.5, (2, 0): 2 / 3, (2, 1): 1 / 3, (2, 3): 0, (3, 0): 0, (3, 1): 1.0, (3, 2): 0}
    for pair, value in expected.items():
        assert df.loc[pair, "p_j_given_i"] == approx(value)
    assert df["baseline"].iloc[0] == approx(1 / 3)
    assert df.loc[(0, 2), "jaccard"] == approx(2 / (3 + 3 - 2))
    adjacent = A.coactivation(toy, variant="adjacent")
    assert adjacent["n_ij"].tolist() == A.coactivation(toy)["n_ij"].tolist()  # k = 2: identical
    assert adjacent.attrs["params"]["variant_label"] == "OLMoE adjacent-pair (figure reproduction)"


def test_coactivation_adjacent_example() -> None:  # (2, 0, 3) → all {2,0},{2,3},{0,3}; adjacent {2,0},{0,3}
    data = RoutingData.from_arrays(np.array([[2, 0, 3]]), n_experts=4)
    n_all = A.coactivation(data).set_index(["expert_i", "expert_j"])["n_ij"]
    n_adj = A.coactivation(data, variant="adjacent").set_index(["expert_i", "expert_j"])["n_ij"]
    assert (n_all[(2, 0)], n_all[(2, 3)], n_all[(0, 3)]) == (1, 1, 1)
    assert (n_adj[(2, 0)], n_adj[(2, 3)], n_adj[(0, 3)], n_adj[(3, 0)]) == (1, 0, 1, 1)


def test_domain_specialization_toy(toy: RoutingData) -> None:
    df = A.domain_specialization(toy).set_index(["label", "expert"])
    assert [df.loc[("A", e), "spec"] for e in range(4)] == pytest.approx([1.0, 1 / 3, 2 / 3, 0])
    assert [df.loc[("B", e), "spec"] for e in range(4)] == pytest.approx([0, 1.0, 1 / 3, 2 / 3])
    assert df["baseline"].eq(0.5).all() and df.loc[("A", 0), "lift"] == approx(2.0)
    # smoothed log-ratio: A's share of expert 0 = (3+1)/(6+4) vs overall (3+1)/(12+4)
    assert df.loc[("A", 0), "log2_ratio"] == approx(math.log2(0.4 / 0.25))
    top1 = A.domain_specialization(toy, top1=True).set_index(["label", "expert"])
    assert top1.loc[("A", 0), "spec"] == approx(2 / 3) and top1["baseline"].eq(0.25).all()


def test_domain_summary_toy(toy: RoutingData) -> None:
    row = A.domain_summary(toy).iloc[0]
    # first choices: A → 0, 0, 2; B → 3, 3, 1: labels are fully determined by the first choice
    assert row["mi_ratio"] == approx(1.0)
    assert row["max_spec"] == approx(1.0) and row["uniform_spec"] == approx(0.5)
    assert row["same_top1"] == approx(0.4) and row["uniform_top1"] == approx(0.25)
    assert row["sum_sq_top1"] == approx(10 / 36) and row["dead_experts"] == 0 and row["chance_purity"] == approx(0.5)
    # purity per expert: max spec / sum spec = 1, 0.75, 0.6667, 1 → mean 0.854167
    assert row["purity"] == approx((1 + 0.75 + 2 / 3 + 1) / 4)
    # load vectors A = (3,1,2,0)/6, B = (0,3,1,2)/6 → JS in bits
    a, b = np.array([3, 1, 2, 0]) / 6, np.array([0, 3, 1, 2]) / 6
    h = lambda p: -sum(x * math.log2(x) for x in p if x > 0)  # noqa: E731
    assert row["js_bits"] == approx(h((a + b) / 2) - (h(a) + h(b)) / 2)


def test_vocabulary_toy(toy: RoutingData) -> None:
    assert A.vocabulary_specialization(toy, min_count=1)["score"].iloc[0] == approx(0.888889)
    assert A.vocabulary_specialization(toy, min_count=1, target="next")["score"].iloc[0] == approx(0.666667)
    assert A.vocabulary_specialization(toy, min_count=1)["n_token_ids"].iloc[0] == 3
    assert A.vocabulary_specialization(toy, min_count=2)["n_token_ids"].iloc[0] == 2  # token 7 seen once
    by = A.vocabulary_by_expert(toy, min_count=1).set_index("expert")
    # token 5 → e* = 0 (first seen, tie at 2/3); token 7 → 0 (first of its tied list); token 9 → 3
    assert by.loc[0, "n_token_ids"] == 2 and by.loc[0, "score"] == approx((2 / 3 + 1) / 2)
    assert by.loc[3, "n_token_ids"] == 1 and math.isnan(by.loc[1, "score"])
    normalized = A.vocabulary_specialization(toy, min_count=1, normalize=True)["score"].iloc[0]
    assert normalized == approx(((2 / 3 - 0.5) / 0.5 + 1 + 1) / 3)


def test_vocabulary_predicted_target() -> None:
    data = RoutingData.from_arrays(np.array(TOY), n_experts=4, token_id=TOY_TOKENS, predicted_id=[7, 5, -1, 9, 5, 7])
    # predicted 7 ← t0, t5: ids (0,1,1,2) → 2/2 = 1; 5 ← t1, t4: (0,2,3,1) → 1/2; 9 ← t3 → 1; t2 unknown
    assert A.vocabulary_specialization(data, min_count=1, target="predicted")["score"].iloc[0] == approx(2.5 / 3)


def test_expert_top_tokens_toy() -> None:
    data = RoutingData.from_arrays(np.array(TOY), n_experts=4, token_id=TOY_TOKENS, token_text=["a", "b", "a", "c", "c", "a"])
    df = A.expert_top_tokens(data, None, 0, 1, n=5, n_contexts=2, window=1)
    # expert 1 routed at t0 (5), t3 (9), t4 (9), t5 (5)
    assert df["token_id"].tolist() == [5, 9] and df["count"].tolist() == [2, 2]
    assert df["token"].tolist() == ["a", "c"] and df["share"].tolist() == [0.5, 0.5]
    assert df["token_rate"].tolist() == pytest.approx([2 / 3, 1.0])
    assert df["contexts"].iloc[0] == ["⟦a⟧b", "c⟦a⟧"]
    with pytest.raises(InputError):
        A.expert_top_tokens(data, None, 0, 9)


def test_npmi_toy(toy: RoutingData) -> None:
    five = A.npmi(toy, tokens=[5]).set_index("expert")["npmi"]
    assert five[0] == approx(0.261860) and five[1] == approx(0.0, rel=1e-9)
    assert A.npmi(toy, tokens=[7]).set_index("expert")["npmi"][2] == approx(0.386853)
    nine = A.npmi(toy, tokens=[9]).set_index("expert")["npmi"]
    assert nine[3] == approx(1.0) and nine[0] == -1.0
    ranked = A.npmi(toy, tokens=[9])
    assert ranked["expert"].iloc[0] == 3  # ranked highest first


def test_npmi_predicates_and_combined(toy: RoutingData) -> None:
    data = RoutingData.from_arrays(np.array(TOY), n_experts=4, token_id=TOY_TOKENS, token_text=["five", "7", "five", "n", "n", "five"], labels=["A"] * 3 + ["B"] * 3)
    by_regex = A.npmi(data, regex="^fi").set_index("expert")["npmi"]
    assert by_regex.tolist() == A.npmi(data, tokens=[5]).set_index("expert")["npmi"].tolist()
    by_label = A.npmi(data, label="B").set_index("expert")
    assert by_label.loc[0, "npmi"] == -1.0 and by_label.loc[0, "n_x"] == 3
    combo = A.npmi_combined(data, targets=[(1, {"tokens": [5]}), (-1, {"label": "B"})]).set_index("expert")
    assert combo.loc[0, "score"] == approx(0.261860 + 1.0)
    with pytest.raises(InputError):
        A.npmi(data, tokens=[5], regex="x")


def test_risk_difference_toy(toy: RoutingData) -> None:
    df = A.risk_difference(toy, label_a="A", label_b="B")
    rd = df.set_index("expert")["risk_diff"]
    assert (rd[0], rd[1], rd[2], rd[3]) == pytest.approx((1.0, -2 / 3, 1 / 3, -2 / 3))
    assert df["expert"].iloc[0] == 0 and df["risk_diff_abs"].is_monotonic_decreasing
    row = df.set_index("expert").loc[1]
    assert (row["a1"], row["d1"], row["a2"], row["d2"]) == (1, 2, 3, 0)


def test_risk_difference_two_runs_and_equalize(toy: RoutingData) -> None:
    other = RoutingData.from_arrays(np.array(SECOND_RUN), n_experts=4, token_id=TOY_TOKENS)
    df = A.risk_difference(toy, None, source_b=other, label_a="A").set_index("expert")
    # behaviour 1 = toy's A tokens (t0-t2), behaviour 2 = all 6 tokens of the other run
    assert df.loc[3, "risk_diff"] == approx(0 - 3 / 6)
    eq = A.risk_difference(toy, None, source_b=other, equalize=True)
    assert eq.attrs["params"]["n_tokens_a"] == eq.attrs["params"]["n_tokens_b"] == 6


def test_run_agreement_toy(toy: RoutingData) -> None:
    other = RoutingData.from_arrays(np.array(SECOND_RUN), n_experts=4, token_id=TOY_TOKENS)
    row = A.run_agreement(toy, None, other).iloc[0]
    assert row["topk_overlap"] == approx(0.833333) and row["top1_agreement"] == approx(0.833333)
    assert row["n_tokens"] == 6 and row["baseline"] == approx(0.5)


def test_run_agreement_shared_prefix_only(toy: RoutingData) -> None:
    diverged = RoutingData.from_arrays(np.array(TOY), n_experts=4, token_id=[5, 7, 6, 9, 9, 5])
    assert A.run_agreement(toy, None, diverged)["n_tokens"].iloc[0] == 2  # tokens after t2 differ in context


def test_cross_layer_transitions_and_consistency() -> None:
    # layer 0 first choices 0,0,1,1 → layer 1 first choices 2,2,3,2
    exp = np.array([[[0, 1], [0, 2], [1, 0], [1, 2]], [[2, 0], [2, 1], [3, 0], [2, 3]]])
    data = RoutingData.from_arrays(exp, n_experts=4, layer_ids=[3, 5])
    tr = A.cross_layer_transitions(data).set_index(["expert", "next_expert"])
    assert tr.loc[(0, 2), "count"] == 2 and tr.loc[(1, 3), "p"] == approx(0.5) and (tr["layer"] == 3).all()
    assert set(tr.index) == {(0, 2), (1, 3), (1, 2)}
    row = A.cross_layer_consistency(data).iloc[0]
    assert row["predictability"] == approx(0.75) and row["baseline"] == approx(0.75)
    h = lambda p: -sum(x * math.log2(x) for x in p if x > 0)  # noqa: E731
    mi = h([0.5, 0.5]) + h([0.75, 0.25]) - h([0.5, 0.25, 0.25])
    assert row["mi_bits"] == approx(mi) and row["u_next"] == approx(mi / h([0.75, 0.25]))
    all_pairs = A.cross_layer_transitions(data, top1=False)
    assert all_pairs["count"].sum() == 16


def _lists(spec: dict[str, list[tuple[int, float]]], layer: int = 0) -> pd.DataFrame:
    rows = [(layer, d, r + 1, e, v) for d, lst in spec.items() for r, (e, v) in enumerate(lst)]
    return pd.DataFrame(rows, columns=["layer", "domain", "rank", "expert", "value"])


def test_committee_fixture_1() -> None:
    lists = _lists({"D1": [(5, 0.30), (2, 0.20), (7, 0.10)], "D2": [(2, 0.25), (5, 0.22), (1, 0.15)], "D3": [(5, 0.28), (3, 0.18), (2, 0.12)]})
    row = A.audit_committee(lists).iloc[0]
    assert row["committee"] == [5] and row["size"] == 1
    assert round(row["avg_mu"], 2) == 1.33 and round(row["avg_sigma_sq"], 2) == 0.22
    assert round(row["coverage"], 4) == 0.4444 and round(row["ratio"], 2) == 50.4
    assert round(A.audit_committee(lists, n_experts=8)["ratio"].iloc[0], 1) == 5.6
    assert A.audit_committee(lists, n_experts=8)["ratio_reference_pool"].iloc[0] == pytest.approx(50.4)


def test_committee_fixture_2() -> None:  # two incomparable members
    lists = _lists({"D1": [(5, 0.30), (2, 0.20), (7, 0.10)], "D2": [(5, 0.26), (2, 0.20), (1, 0.15)], "D3": [(3, 0.24), (2, 0.22), (5, 0.12)]})
    row = A.audit_committee(lists).iloc[0]
    assert row["committee"] == [5, 2]
    assert round(row["avg_mu"], 2) == 1.83 and round(row["avg_sigma_sq"], 2) == 0.44
    assert round(row["coverage"], 4) == 0.7263 and round(row["ratio"], 1) == 82.2  # reference prints 82.24 from rounded inputs


def test_committee_long_format_fixture() -> None:
    rows = pd.DataFrame(
        [("A", 1, 0.6, 0), ("A", 2, 0.4, 1), ("A", 1, 0.5, 0), ("A", 3, 0.5, 1), ("B", 1, 0.7, 0), ("B", 3, 0.3, 1)],
        columns=["domain", "expert_idx", "expert_weight", "topk_rank"],
    ).assign(layer=3)
    lists = A.committee_lists_from_long(rows)
    assert lists[lists.domain == "A"]["expert"].tolist() == [1, 3] and lists[lists.domain == "A"]["value"].tolist() == pytest.approx([0.55, 0.5])
    row = A.audit_committee(lists).iloc[0]
    assert row["layer"] == 3 and row["committee"] == [1] and row["avg_mu"] == 1.0 and row["avg_sigma_sq"] == 0.0
    assert round(row["coverage"], 4) == 0.6098 and round(row["ratio"], 2) == 98.44


def test_eci_fixture() -> None:  # ECI fixture
    from moelens.analysis.committee import contribution_index

    exp, w = np.array([[0], [-1], [0], [0]]), np.array([[0.5], [0.0], [0.3], [0.4]])
    assert contribution_index(exp, w, 1, "minmax")[0] == pytest.approx(0.4499991, abs=1e-7)
    assert contribution_index(exp, w, 1, "expected")[0] == pytest.approx(0.30)
    assert contribution_index(exp, w, 1, "frequency")[0] == pytest.approx(0.75)
    assert contribution_index(np.zeros((4, 1), int), np.full((4, 1), 0.2), 1, "minmax")[0] == 0.0


def test_standing_committee_end_to_end() -> None:
    # three domains, two prompts each (one sequence per prompt); expert 0 is in every prompt's top-2
    exp = np.array([[0, 1], [0, 2], [0, 1], [0, 3], [2, 0], [0, 1]])
    w = np.array([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5], [0.8, 0.2], [0.6, 0.4], [0.9, 0.1]])
    data = RoutingData.from_arrays(exp, w, n_experts=4, seq_id=range(6), labels=["a", "a", "b", "b", "c", "c"])
    df = A.standing_committee(data, eci="expected")
    assert df["committee"].iloc[0] == [0] and df["n_experts"].iloc[0] == 4
    lists = A.committee_lists(data, eci="expected")
    assert lists[lists.domain == "a"]["value"].tolist() == [0.65, 0.2]
    share = A.committee_share(data, committee=df).set_index("label")
    assert share.loc["a", "count_share"] == approx(0.5) and share.loc["c", "mass_share"] == approx((0.4 + 0.9) / 2)


def test_shared_expert_stats() -> None:
    gate = np.array([[0.2, 0.4, np.nan], [np.nan] * 3])
    df = A.shared_expert_stats(RoutingData.from_arrays(np.zeros((2, 3, 1), int), n_experts=2, shared_gate=gate))
    assert df["layer"].tolist() == [0] and df["mean_gate"].iloc[0] == approx(0.3) and df["std_gate"].iloc[0] == approx(0.1)


def test_params_are_attached(toy: RoutingData) -> None:
    df = A.srp(toy, segment_lengths=(2,))
    assert df.attrs["params"]["score"] == "srp" and df.attrs["params"]["segment_lengths"] == [2]
    assert "arXiv 2505.16056" in df.attrs["params"]["reference"] and ".md" not in df.attrs["params"]["reference"]


def test_phase_filter_splits_sequences() -> None:
    data = RoutingData.from_arrays(np.array(TOY), n_experts=4, phase=["prompt"] * 3 + ["generated"] * 3)
    assert A.repetition(data)["n_pairs"].iloc[0] == 5
    assert A.repetition(data, phase="prompt")["n_pairs"].iloc[0] == 2
    gen = A.srp(data, phase="generated", segment_lengths=(2,))
    assert gen["n_windows"].iloc[0] == 2 and gen.attrs["params"]["phase"] == "generated"


def test_from_arrays_validation() -> None:
    with pytest.raises(InputError):
        RoutingData.from_arrays(np.array([[0, 0]]), n_experts=2)  # same expert twice
    with pytest.raises(InputError):
        RoutingData.from_arrays(np.array([[0, 4]]), n_experts=4)  # id >= E
    with pytest.raises(InputError):
        RoutingData.from_arrays(np.array([[0], [1]]), n_experts=2, seq_id=[0, 0], pos=[1, 0])  # unsorted
    weight_zero = RoutingData.from_arrays(np.array([[0, 1]]), np.array([[1.0, 0.0]]), n_experts=2)
    assert weight_zero.experts.tolist() == [[[0, -1]]]


def test_registry_lists_every_score_and_parses() -> None:
    assert set(A.SCORES) >= {"expert_load", "srp", "sch", "npmi", "run_agreement", "standing_committee", "expert_map"}
    spec = A.SCORES["srp"]
    assert spec.parse({"segment_lengths": "4,16", "level": "model"}) == {"segment_lengths": (4, 16), "level": "model"}
    with pytest.raises(InputError):
        spec.parse({"level": "galaxy"})
    with pytest.raises(InputError):
        spec.parse({"nope": "1"})
    for s in A.SCORES.values():
        assert s.help and s.reference and callable(s.function)
