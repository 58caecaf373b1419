"""The app's data layer on big-run terms: caches keyed by run version, pages that read a run's derived summaries
(not its routing) and get the analyses' frames, bounded streamed run-vs-run passes equal to the whole-run computation. Real stores throughout."""

from __future__ import annotations

import shutil
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
from workbench import bounded, data  # noqa: E402


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("appdata") / "s.duckdb"
    make_store(path)
    analysis.summarize(TraceStore(path), 1)
    return path


#: What the Experts and Co-activation pages ask ``data.analysis`` for on a run with summaries.
PAGE_CASES = [
    ("expert_load", {}),
    ("expert_load", {"by_label": True}),
    ("layer_balance", {}),
    ("coactivation", {}),
    ("cross_layer_transitions", {}),
    ("expert_top_tokens", {"layer": 2, "expert": 3, "n": 10, "n_contexts": 0}),
    ("shared_expert_stats", {}),
]


@pytest.fixture(scope="module")
def without_routing(small: Path, tmp_path_factory) -> tuple[Path, dict]:
    """A copy of ``small`` whose run 1 has its summaries but no routing rows, and the analyses of run 1
    computed on the original before the rows were deleted."""
    want = {(n, tuple(sorted(p.items()))): getattr(analysis, n)(TraceStore(small, read_only=True), 1, **p) for n, p in PAGE_CASES}
    path = tmp_path_factory.mktemp("norouting") / "s.duckdb"
    shutil.copy(small, path)
    with TraceStore(path).connect(write=True) as con:
        con.execute("DELETE FROM routing WHERE run_id = 1")
    return path, want


@pytest.mark.parametrize(("name", "params"), PAGE_CASES)
def test_pages_read_summaries_not_routing(without_routing: tuple[Path, dict], name: str, params: dict) -> None:
    path, want = without_routing
    got = data.analysis(str(path), name, 1, **params)
    expected = want[(name, tuple(sorted(params.items())))]
    assert len(expected) or name == "shared_expert_stats"
    pd.testing.assert_frame_equal(got, expected, check_dtype=False)


def test_what_bounded_reads_cannot_answer_goes_to_the_analysis() -> None:
    assert bounded.shortcut("expert_top_tokens", {"layer": 1, "expert": 0}) is None  # finishes from summaries itself
    assert bounded.shortcut("shared_expert_stats", {"phase": "prompt"}) is None
    assert bounded.shortcut("expert_load", {}) is None  # the analysis reads its summaries itself


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
    analysis.summarize(store, done)  # new summaries are a new key (pages switch to them)
    assert "expert_counts" in data.run_key(str(path), data.stamp(path), done)[1]


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


def test_router_token_stats_of_one_sequence_reads_that_sequence(small: Path) -> None:
    store = TraceStore(small, read_only=True)
    seq = int(store.sequences(1)["seq_id"].iloc[2])
    quick = bounded.shortcut("router_token_stats", {"layer": 2, "seq_id": seq, "near_tie": 0.05})
    assert quick is not None and bounded.shortcut("router_token_stats", {"layer": 2}) is None
    want = analysis.router_token_stats(store, 1, layer=2, seq_id=seq, near_tie=0.05)
    assert len(want) > 3
    pd.testing.assert_frame_equal(quick(store, 1), want, check_dtype=False)
