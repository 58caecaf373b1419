"""The compiled counting kernels and the prefetching stream against plain numpy / slow references on random
inputs: slot counts and gate mass equal ``np.bincount`` to the last bit, the vocabulary table is the same
whichever way a batch is counted (dense over its distinct ids, or by sorting) and whatever the batch split,
and `prefetched` hands over every item in order, re-raises errors and stops when closed."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_analysis_properties import SETTINGS, to_data, traces

import moelens.analysis as A
import moelens.analysis.vocabulary as vocabulary
from moelens.analysis._common import group_expert_counts
from moelens.analysis.stream import prefetched


def bincount_counts(experts, n_experts, group=None, n_groups=1, weights=None):
    """The previous implementation: a bincount over ``group · E + expert`` keys of the routed slots."""
    routed = experts >= 0
    if group is not None:
        routed &= (group >= 0)[:, None]
    g = np.zeros(len(experts), np.int64) if group is None else group.astype(np.int64)
    keys = (g[:, None] * n_experts + experts)[routed]
    w = None if weights is None else weights[routed].astype(np.float64)
    return np.bincount(keys, weights=w, minlength=n_groups * n_experts).reshape(n_groups, n_experts)


@pytest.mark.parametrize("seed", range(6))
def test_group_expert_counts_equal_bincount(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(40):
        T, K, E, G = int(rng.integers(0, 400)), int(rng.integers(1, 9)), int(rng.integers(1, 70)), int(rng.integers(1, 6))
        experts = rng.integers(-1, E, (T, K)).astype(rng.choice([np.int16, np.int64]))
        weights = rng.random((T, K)).astype(np.float32)
        weights[rng.random((T, K)) < 0.05] = np.nan
        group = rng.integers(-1, G, T).astype(rng.choice([np.int32, np.int64])) if rng.random() < 0.7 else None
        n_groups = G if group is not None else 1
        first = bool(rng.random() < 0.3)
        slots = experts[:, :1] if first else experts  # a strided view, as first-choice callers pass
        for w in (None, weights[:, : slots.shape[1]]):
            got = group_expert_counts(slots, E, group, n_groups, weights=w)
            want = bincount_counts(slots, E, group, n_groups, weights=w)
            if T or w is None:  # (np.bincount of no slots with weights gives int64 zeros; the mass is float64 zeros)
                assert got.dtype == want.dtype
            assert np.array_equal(got, want, equal_nan=True)


def test_group_expert_counts_rejects_out_of_range() -> None:
    with pytest.raises(ValueError, match="n_experts"):
        group_expert_counts(np.array([[0, 5]]), 4)
    with pytest.raises(ValueError, match="n_groups"):
        group_expert_counts(np.array([[0, 1]]), 4, np.array([2]), 2)


@SETTINGS
@given(traces(), st.sampled_from(["input", "next", "predicted"]), st.integers(1, 3), st.lists(st.integers(1, 3), min_size=1, max_size=3),
       st.sampled_from([0, 10**9]))  # fmt: skip
def test_vocabulary_dense_and_sorted_counting(monkeypatch_module, trace, target, min_count, sizes, dense_cells) -> None:
    """Either way of counting a batch, over any batch split, gives the whole-data tables (which
    test_analysis_properties checks against the reference)."""
    data = to_data(trace)
    whole = [fn(data, target=target, min_count=min_count) for fn in (A.vocabulary_specialization, A.vocabulary_by_expert)]
    monkeypatch_module.setattr(vocabulary, "DENSE_CELLS_PER_SLOT", dense_cells)  # 0: always sort; huge: always dense
    for fn, want in zip((A.vocabulary_specialization, A.vocabulary_by_expert), whole):
        pd.testing.assert_frame_equal(fn(data, target=target, min_count=min_count, batches=sizes), want)
    monkeypatch_module.undo()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_prefetched_order_errors_and_close() -> None:
    assert list(prefetched(iter(range(7)))) == list(range(7))
    assert list(prefetched([])) == []

    def failing():
        yield 1
        raise RuntimeError("bad batch")

    it = prefetched(failing())
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="bad batch"):
        next(it)

    alive, produced, closed = [], [], threading.Event()

    def source():
        try:
            for i in range(100):
                produced.append(i)
                alive.append(len(produced) - taken[0])
                yield i
        finally:
            closed.set()

    taken = [0]
    it = prefetched(source())
    for _ in range(3):
        next(it)
        taken[0] += 1
    it.close()  # stops the producer after at most its current item, and closes the source
    assert closed.is_set() and len(produced) <= 5
    assert max(alive) <= 2  # the next item is only started once the previous one was taken


def test_expert_profiles_finish_from_summaries(store) -> None:
    from moelens.analysis.summaries import summarize

    data = A.synthetic(2000, 3, 8, 2, seed=3, seq_len=41, drop_rate=0.05, generated_fraction=0.3)
    run = A.write_run(store, data, chunk_tokens=600)
    summarize(store, run)
    with store.connect(write=True) as con:  # the label profiles need nothing else
        con.execute("DELETE FROM routing WHERE run_id = ?", [run])
    A.clear_cache()
    for phase in (None, "prompt"):
        keys, matrix = A.expert_profiles(store, run, "label", phase=phase, max_pass_slots=0)
        want_keys, want = A.expert_profiles(data, "label", phase=phase)
        assert keys.equals(want_keys) and np.array_equal(matrix, want)


@pytest.mark.parametrize("seed", range(4))
def test_summary_transitions_and_pairs_equal_per_phase_counts(seed: int) -> None:
    from moelens.analysis.coactivation import grouped_pair_counts, pair_counts
    from moelens.analysis.summaries import _P, _phase_transitions
    from moelens.analysis.transitions import transition_counts

    data = A.synthetic(500, 3, 7, 3, seed=seed, seq_len=23, drop_rate=0.1, generated_fraction=0.4)
    phase = data.phase.astype(np.int64) + 1
    for li in range(data.n_layers - 1):
        got = _phase_transitions(data.experts[li], data.experts[li + 1], phase, 7, 7)
        want = np.stack([[transition_counts(data, li, top1, phase == p) for top1 in (True, False)] for p in range(_P)])
        assert np.array_equal(got, want)
    for variant in ("all", "adjacent"):
        got = grouped_pair_counts(data.experts[0], 7, phase, _P, variant)
        assert np.array_equal(got, np.stack([pair_counts(data.experts[0][phase == p], 7, variant) for p in range(_P)]))


@pytest.mark.parametrize("E", [5, 64, 130])
def test_shared_experts_equal_bitset_intersections(E: int) -> None:
    from moelens.analysis._kernels import jit, shared_experts
    from moelens.analysis._sets import bitsets, intersection_size

    rng = np.random.default_rng(E)
    for _ in range(20):
        T, K = int(rng.integers(0, 200)), int(rng.integers(1, min(E, 9) + 1))
        a, b = (np.stack([rng.permutation(E)[:K] for _ in range(T)]).reshape(T, K).astype(np.int16) for _ in range(2))
        a[rng.random((T, K)) < 0.2] = -1
        b[rng.random((T, K)) < 0.2] = -1
        assert jit(shared_experts)(a, b, E) == intersection_size(bitsets(a, E), bitsets(b, E)).sum()
