"""The Prune page under AppTest: on a run with contributions (scores, heatmap, removed experts' label profiles),
on a routing-only run (frequency only), and the evaluation on the bundled demo model with its progress bar."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from moelens import TraceStore
from moelens.recording.record import record

PAGE = Path(__file__).resolve().parents[1] / "app" / "pages" / "11_Prune.py"
TEXTS = [("def f(x):\n    return x + 1\n", "code"), ("The dog ran in the park.", "prose"), ("1 + 2 = 3", "math")]


def _page(db: Path, run: int, **state) -> AppTest:
    at = AppTest.from_file(str(PAGE), default_timeout=300)
    at.session_state["moelens_db"] = str(db)
    at.query_params["run"] = str(run)
    for key, value in state.items():
        at.session_state[key] = value
    return at.run()


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    from moelens.demo import DEMO_MODEL_DIR
    from moelens.recording.loading import load_model

    db = tmp_path_factory.mktemp("prune_app") / "t.duckdb"
    model, tok = load_model(str(DEMO_MODEL_DIR), dtype="float32")
    texts, labels = [t for t, _ in TEXTS], [lab for _, lab in TEXTS]
    store = TraceStore(db)
    with_c = record(model, tok, texts, labels=labels, store=store, contributions=True, progress=False)
    plain = record(model, tok, texts, labels=labels, store=store, progress=False)
    return db, with_c, plain


def test_scores_heatmap_and_removed_experts(demo_runs) -> None:
    db, run, _ = demo_runs
    at = _page(db, run, prune_score="easy_ep", prune_keep=0.75)
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    heatmap = json.loads(at.get("plotly_chart")[0].proto.spec)
    marks = sum(cell == "✕" for row in heatmap["data"][0]["text"] for cell in row)
    assert marks == 4 * 4  # 4 layers x (16 - 12) removed
    removed = at.dataframe[0].value
    assert len(removed) == 16 and {"code", "prose", "math"} <= set(removed.columns)
    assert any("--score easy_ep --keep 0.75 --uniform" in c.value for c in at.code)


def test_routing_only_run_offers_frequency(demo_runs) -> None:
    db, _, plain = demo_runs
    at = _page(db, plain)
    assert not at.exception and not at.error
    assert at.selectbox(key="prune_score").options == ["frequency (routing only)", "ESFT gate relevance"]
    assert any("--contributions" in c.value for c in at.code)


def test_evaluation_with_progress(demo_runs) -> None:
    db, run, _ = demo_runs
    at = _page(db, run, prune_n_random=2)
    at.button(key="prune_evaluate").click().run()
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    result = at.session_state["prune_result"]
    assert set(result["method"]) == {"reap", "frequency", "random"}
    assert result.loc[result["method"] == "random", "std"].notna().all()
