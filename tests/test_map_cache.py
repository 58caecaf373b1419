"""Maps on disk (moelens.analysis.map_cache): a complete run's map is computed once and read back equal,
keyed by run and parameters; a run that is not complete is never cached."""

from __future__ import annotations

import pytest

from app_fixtures import make_store
from moelens import TraceStore
from moelens.analysis import map_cache


@pytest.mark.slow
def test_a_map_is_computed_once_then_read_from_disk(tmp_path, monkeypatch) -> None:
    pytest.importorskip("umap")
    monkeypatch.setenv("MOELENS_CACHE_DIR", str(tmp_path / "cache"))
    info = make_store(tmp_path / "f.duckdb")
    store = TraceStore(info["path"], read_only=True)
    run = info["runs"]["baseline"]
    assert not map_cache.is_cached(store, run, profile="label")
    first = map_cache.cached_map(store, run, profile="label")
    assert map_cache.is_cached(store, run, profile="label")
    assert not map_cache.is_cached(store, run, profile="token")  # other parameters, another entry
    files = list((tmp_path / "cache" / "maps").glob("*.parquet"))
    assert len(files) == 1
    again = map_cache.cached_map(store, run, profile="label")
    assert again.equals(first) and again.attrs["params"]["score"] == "expert_map"
    # an interrupted run may still grow: never cached
    assert map_cache._key(store, info["runs"]["interrupted"], "expert_map", {}) is None
