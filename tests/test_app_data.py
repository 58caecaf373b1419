"""The app's data layer on big-run terms: caches keyed by run version, frames from derived summaries equal to
the analyses, bounded streamed run-vs-run passes equal to the whole-run computation. Real stores throughout."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "app"))
sys.path.insert(0, str(ROOT / "tests"))

import moelens.analysis as analysis  # noqa: E402
from app_fixtures import make_store  # noqa: E402
from moelens import TraceStore  # noqa: E402
from workbench import data, summaries  # noqa: E402


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("appdata") / "s.duckdb"
    make_store(path)
    summaries.materialise(TraceStore(path), 1)
    return path


CASES = [
    ("expert_load", {}),
    ("expert_load", {"by_label": True}),
    ("layer_balance", {}),
    ("coactivation", {}),
    ("expert_top_tokens", {"layer": 2, "expert": 3, "n": 10, "n_contexts": 3}),
    ("expert_top_tokens", {"layer": 1, "expert": 0, "n": 5, "n_contexts": 2, "window": 2}),
    ("shared_expert_stats", {}),
    ("cross_layer_transitions", {}),
]


@pytest.mark.parametrize(("name", "params"), CASES)
def test_frames_from_summaries_equal_the_analyses(small: Path, name: str, params: dict) -> None:
    store = TraceStore(small, read_only=True)
    derived = summaries.derive(name, params, tuple(store.summary_names(1)))
    assert derived is not None
    got, want = derived(store, 1), getattr(analysis, name)(store, 1, **params)
    assert len(want)  or name == "shared_expert_stats"
    pd.testing.assert_frame_equal(got, want, check_dtype=False)


def test_what_a_summary_cannot_answer_goes_to_the_analysis(small: Path) -> None:
    names = ("expert_load", "coactivation", "token_expert")
    assert summaries.derive("coactivation", {"variant": "adjacent"}, names) is None
    assert summaries.derive("expert_load", {"phase": "prompt"}, names) is None
    assert summaries.derive("expert_top_tokens", {"layer": 1, "expert": 0, "target": "next"}, names) is None
    assert summaries.derive("expert_load", {}, ()) is None  # not materialised
    assert summaries.derive("srp", {}, names) is None


def test_reference_summary_sql_is_the_same_in_both_layouts(small: Path, tmp_path: Path) -> None:
    store = TraceStore(small, read_only=True)
    store.export_parquet(1, tmp_path / "ds")
    ds = TraceStore(tmp_path / "ds")
    for name in summaries.SQL:
        assert ds.read_summary(1, name).equals(store.read_summary(1, name))
    pd.testing.assert_frame_equal(summaries.coactivation(ds, 1), summaries.coactivation(store, 1))


def test_cache_key_survives_another_recording_and_moves_when_the_run_finishes(tmp_path: Path) -> None:
    from moelens.analysis.synthetic import synthetic, write_run

    path = tmp_path / "k.duckdb"
    store = TraceStore(path)
    done = write_run(store, synthetic(300, 2, 4, 2, seq_len=50))
    live = store.create_run("still recording")
    key_done = data.run_key(str(path), data.stamp(path), done)
    key_live = data.run_key(str(path), data.stamp(path), live)
    write_run(store, synthetic(300, 2, 4, 2, seq_len=50, seed=1))  # another run lands: the file changed
    assert data.stamp(path) != 0 and data.run_key(str(path), data.stamp(path), done) == key_done
    store.finish_run(live)
    assert data.run_key(str(path), data.stamp(path), live) != key_live
    summaries.materialise(store, done, ("expert_load",))  # new summaries are a new key (pages switch to them)
    assert data.run_key(str(path), data.stamp(path), done)[1] == ("expert_load",)


def test_streamed_sequence_agreement_equals_the_whole_run_pass(small: Path, monkeypatch) -> None:
    from moelens.analysis import RoutingData, run_agreement

    monkeypatch.setattr(data, "PASS_TOKENS", 64)  # many small batches
    store = TraceStore(small, read_only=True)
    got = data.sequence_agreement(str(small), data.stamp(small), 1, 2)
    a, b = RoutingData.from_store(store, 1), RoutingData.from_store(store, 2)
    want = data._agreement_per(a, b, "seq_id", np.intersect1d(a.seq_id, b.seq_id))
    assert got["seq_id"].nunique() > 3
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
    seq = int(got["seq_id"].iloc[0])
    sa, sb = a.select(a.seq_id == seq), b.select(b.seq_id == seq)
    pd.testing.assert_frame_equal(data.token_agreement_in_sequence(str(small), data.stamp(small), 1, 2, seq),
                                  data._agreement_per(sa, sb, "pos", np.intersect1d(sa.pos, sb.pos)), check_dtype=False)
    whole = run_agreement(store, 1, 2)
    assert (got.groupby("layer")["n_tokens"].sum().to_numpy() == whole["n_tokens"].to_numpy()).all()


def test_the_app_opens_a_parquet_dataset(small: Path, tmp_path: Path) -> None:
    from streamlit.testing.v1 import AppTest

    TraceStore(small, read_only=True).export_parquet(1, tmp_path / "ds", shards=2)
    for page in ("Home.py", "pages/02_Experts.py", "pages/01_Tokens.py"):
        at = AppTest.from_file(str(ROOT / "app" / page), default_timeout=120)
        at.session_state["moelens_db"] = str(tmp_path / "ds")
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        assert not at.error, [e.value for e in at.error]


def test_compare_scores_every_sequence_with_progress_and_stop(small: Path) -> None:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app" / "pages" / "09_Compare.py"), default_timeout=120)
    at.session_state["moelens_db"] = str(small)
    at.run()
    at.toggle(key="cmp_score").set_value(True).run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("sorted by its least-agreeing layer" in c.value for c in at.caption)  # the ranked table is shown
    stop = next(b for b in at.button if b.key.startswith("_stop_"))
    stop.click().run()
    assert at.toggle(key="cmp_score").value is False  # Stop switches the pass off instead of restarting it
    assert not at.exception
