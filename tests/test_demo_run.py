"""`moelens demo --no-app` end to end into a temporary store (issue #7), on a token budget to stay fast."""

from __future__ import annotations

import contextlib
import io

import pytest

from moelens import TraceStore
from moelens.cli import main
from moelens.demo import DEMO_MODEL_DIR, DOMAINS
from moelens.demo.run import RUN_EARLY, RUN_GENERATIONS, RUN_HELDOUT

pytestmark = pytest.mark.skipif(not (DEMO_MODEL_DIR / "model.safetensors").exists(), reason="demo model not shipped")


def test_demo_no_app_records_three_runs_and_prints_a_summary(tmp_path) -> None:
    db = tmp_path / "demo.duckdb"
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        main(["demo", "--no-app", "--db", str(db), "--max-tokens", "2500"])
    assert exit_.value.code in (0, None)
    store = TraceStore(db, read_only=True)
    runs = store.runs().set_index("name")
    assert runs.loc[[RUN_EARLY, RUN_GENERATIONS, RUN_HELDOUT], "status"].tolist() == ["complete"] * 3
    assert runs.loc[RUN_HELDOUT, "run_id"] == runs["run_id"].max()  # the app opens on the newest run
    assert set(runs.loc[RUN_HELDOUT, "labels"].split(", ")) == set(DOMAINS)
    assert runs.loc[RUN_HELDOUT, "n_tokens"] == runs.loc[RUN_EARLY, "n_tokens"] == 2500
    phases = store.query("SELECT DISTINCT phase FROM tokens WHERE run_id = ?", [int(runs.loc[RUN_GENERATIONS, "run_id"])])
    assert set(phases["phase"]) == {"prompt", "generated"}
    text = out.getvalue()
    assert "early checkpoint vs final" in text and "routing structure per layer" in text
    from moelens.analysis import map_cache  # the Map page's maps are ready before the app opens

    heldout = int(runs.loc[RUN_HELDOUT, "run_id"])
    assert all(map_cache.is_cached(store, heldout, "expert_map", profile=p) for p in ("label", "token"))
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit):
        main(["demo", "--no-app", "--db", str(db), "--max-tokens", "2500"])  # a second run reuses the runs
    assert len(TraceStore(db, read_only=True).runs()) == 3
