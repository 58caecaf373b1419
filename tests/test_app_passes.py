"""Pages on a run bigger than the pass budget: what needs a pass over the run shows one line and a Compute button
and no result, nothing crashes; Compute shows the result the analysis gives, and later renders show it without a
click; an interrupted pass keeps nothing. The budget is made tiny with ``MOELENS_PASS_SLOTS`` so the store stays
small (real DuckDB store, AppTest)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "app"))
sys.path.insert(0, str(ROOT / "tests"))

import moelens.analysis as analysis  # noqa: E402
from app_fixtures import make_store  # noqa: E402
from moelens import TraceStore  # noqa: E402
from workbench import data  # noqa: E402

PAGES = ROOT / "app" / "pages"
#: Pages with a section that reads the whole run when it has no summaries.
PASS_PAGES = ["02_Experts", "03_Specialization", "04_Consistency", "05_Committee", "06_nPMI", "07_Co-activation",
              "09_Compare", "11_Prune", "12_Router"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """The app fixture store, without summaries (so every score needs a pass over the run)."""
    return make_store(tmp_path_factory.mktemp("passes") / "p.duckdb")["path"]


@pytest.fixture
def tiny_budget(monkeypatch) -> None:
    import streamlit as st

    monkeypatch.setenv(data.PASS_SLOTS_ENV, "1")
    st.cache_data.clear()
    analysis.clear_cache()


def render(page: str, db: Path, state: dict | None = None) -> AppTest:
    at = AppTest.from_file(str(PAGES / f"{page}.py"), default_timeout=120)
    at.session_state["moelens_db"] = str(db)
    for k, v in (state or {}).items():
        at.session_state[k] = v
    at.run()
    return at


def problems(at: AppTest) -> list[str]:
    return [e.value for e in at.exception] + [e.value for e in at.error]


def offers(at: AppTest) -> list[tuple[str, object]]:
    """(the info line, its Compute button) of every section waiting for a pass, in page order."""
    lines = [i.value for i in at.info if "needs a pass over" in i.value]
    buttons = [b for b in at.button if (b.key or "").startswith("_pass_go_")]
    assert len(lines) == len(buttons), (lines, [b.key for b in buttons])
    return list(zip(lines, buttons))


def frames(at: AppTest) -> list[pd.DataFrame]:
    return [d.value for d in at.dataframe]


def shown(at: AppTest, want: pd.DataFrame) -> bool:
    """Whether a table on the page equals ``want`` (the analysis' own frame)."""
    for df in frames(at):
        if list(df.columns) == list(want.columns) and len(df) == len(want):
            try:
                pd.testing.assert_frame_equal(df.reset_index(drop=True), want.reset_index(drop=True), check_dtype=False)
                return True
            except AssertionError:
                continue
    return False


@pytest.mark.parametrize("page", PASS_PAGES)
def test_over_budget_sections_wait_for_compute_then_show(page: str, store: Path, tiny_budget: None) -> None:
    at = render(page, store)
    assert not problems(at), problems(at)
    waiting = offers(at)
    assert waiting, "a section over the budget offers Compute"
    assert all("tokens of this run (≈" in line for line, _ in waiting)
    computed = set()
    for _ in range(12):  # Compute each section in turn (a result can reveal a section that needs its own pass)
        waiting = offers(at)
        if not waiting:
            break
        computed.add(waiting[0][1].key)
        waiting[0][1].click().run()
        assert not problems(at), problems(at)
        assert computed.isdisjoint(b.key for _, b in offers(at)), "a computed section shows its result"
    assert not offers(at)
    again = render(page, store)  # a new session of the same server: kept results, no click
    assert not problems(again) and computed.isdisjoint(b.key for _, b in offers(again))


def test_compute_shows_what_the_analysis_gives(store: Path, tiny_budget: None) -> None:
    at = render("04_Consistency", store)
    lines = [line for line, _ in offers(at)]
    assert any("`sch`" in line for line in lines) and any("`srp`" in line for line in lines)
    want = analysis.sch(TraceStore(store, read_only=True), 1, lookahead=[4])
    assert not shown(at, want), "no result before the click"
    dict(offers(at))[next(line for line in lines if "`sch`" in line)].click().run()
    assert not problems(at) and shown(at, want)
    assert not any("`sch`" in line for line, _ in offers(at)) and any("`srp`" in line for line, _ in offers(at))


def test_compare_ranks_the_sequences_on_request(store: Path, tiny_budget: None) -> None:
    at = render("09_Compare", store)
    (line, button), = offers(at)  # the ranking waits for the agreement
    assert "`run_agreement` of runs #1 and #2" in line
    button.click().run()
    (line, _), = offers(at)
    assert "Ranking the sequences" in line and not problems(at)
    assert not any("sorted by its least-agreeing layer" in c.value for c in at.caption)
    while offers(at):
        offers(at)[0][1].click().run()
        assert not problems(at), problems(at)
    s = TraceStore(store, read_only=True)
    assert shown(at, analysis.run_agreement(s, 1, 2))
    assert any("sorted by its least-agreeing layer" in c.value for c in at.caption)
    a, b = analysis.RoutingData.from_store(s, 1), analysis.RoutingData.from_store(s, 2)
    want = data._agreement_per(a, b, "seq_id", np.intersect1d(a.seq_id, b.seq_id))
    got = data.sequence_agreement(str(store), data.stamp(store), 1, 2)  # kept: no pass, no PassNeeded
    pd.testing.assert_frame_equal(got, want, check_dtype=False)


def test_bootstrap_and_label_filter_follow_the_budget(store: Path, tiny_budget: None) -> None:
    at = render("04_Consistency", store, {"cons_ci": True})
    assert not problems(at)
    assert any("95% intervals of `repetition`" in line for line, _ in offers(at))
    at = render("02_Experts", store, {"exp_scope": "math"})
    assert not problems(at), problems(at)
    assert any("`layer_balance` on label 'math'" in line for line, _ in offers(at))
    assert any("its Compute button is above." in c.value for c in at.caption)  # the same result asked twice


def test_label_filter_passes_over_that_label_alone(store: Path, tiny_budget: None) -> None:
    """The Experts page's label filter: a pass over the label's tokens (not a load of the run) whose result is
    the score of the run restricted to that label."""
    s = TraceStore(store, read_only=True)
    whole = analysis.RoutingData.from_store(s, 1)
    math = whole.select(whole.label == whole.label_names.index("math"))
    with pytest.raises(data.PassNeeded) as err:
        data.analysis(str(store), "layer_balance", 1, only_label="math")
    assert err.value.n_tokens == math.n_tokens < whole.n_tokens
    seen: list[tuple[int, int]] = []
    got = data.run_pass(err.value, lambda d, t: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1]
    pd.testing.assert_frame_equal(got, analysis.layer_balance(math))
    at = render("02_Experts", store, {"exp_scope": "math"})
    assert not problems(at) and not any("`layer_balance` on label" in line for line, _ in offers(at))


def test_an_interrupted_pass_keeps_nothing(store: Path, tiny_budget: None) -> None:
    db = str(store)
    with pytest.raises(data.PassNeeded) as err:
        data.analysis(db, "srp", 1, segment_lengths=(4,))
    needed = err.value
    assert needed.n_tokens > 0 and needed.n_batches >= 1

    def stop(done: int, total: int) -> None:
        raise KeyboardInterrupt  # what Stop's rerun does to a pass: it ends at the next batch

    with pytest.raises(KeyboardInterrupt):
        data.run_pass(needed, stop)
    with pytest.raises(data.PassNeeded):
        data.analysis(db, "srp", 1, segment_lengths=(4,))
    seen: list[tuple[int, int]] = []
    got = data.run_pass(needed, lambda d, t: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1]
    pd.testing.assert_frame_equal(got, analysis.srp(TraceStore(store, read_only=True), 1, segment_lengths=(4,)))
    pd.testing.assert_frame_equal(data.analysis(db, "srp", 1, segment_lengths=(4,)), got)  # kept from now on


def test_summaries_answer_at_once_whatever_the_budget(tmp_path: Path, monkeypatch) -> None:
    import streamlit as st

    path = make_store(tmp_path / "s.duckdb")["path"]
    analysis.summarize(TraceStore(path), 1)
    monkeypatch.setenv(data.PASS_SLOTS_ENV, "0")
    st.cache_data.clear()
    analysis.clear_cache()
    got = data.analysis(str(path), "expert_load", 1)
    pd.testing.assert_frame_equal(got, analysis.expert_load(TraceStore(path, read_only=True), 1))


@pytest.mark.parametrize(("raw", "want"), [("", data.DEFAULT_PASS_SLOTS), ("1000", 1000), ("none", None),
                                           ("lots", data.DEFAULT_PASS_SLOTS)])
def test_pass_budget_setting(raw: str, want: int | None, monkeypatch) -> None:
    monkeypatch.setenv(data.PASS_SLOTS_ENV, raw)
    assert data.pass_slots() == want


def test_token_views_hover_a_bounded_window_of_layers() -> None:
    from workbench import ui

    routing = pd.DataFrame({"pos": 0, "layer": np.arange(48), "rank": 0, "expert": 1, "weight": 1.0})
    near, note = ui.near_layers(routing, 46)
    assert near["layer"].tolist() == list(range(36, 48)) and "L36–L47 (12 of 48" in note
    assert ui.near_layers(routing, 20)[0]["layer"].tolist() == list(range(14, 26))
    few = routing[routing["layer"] < 12]
    assert ui.near_layers(few, 3) == (few, "")  # small models: every layer, as before
