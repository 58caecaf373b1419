"""UMAP maps kept on disk, so the Map page answers in milliseconds instead of compiling UMAP (~40 s).

The first UMAP in a process spends most of its time in numba compiling UMAP's kernels, most of which numba cannot
cache; a map of a completed run never changes (a completed run is immutable), so the map itself is cached, keyed
by the store file, the run, its completion time and the parameters. `moelens demo` fills the cache for the demo's
runs; any other map lands there the first time it is computed. The folder is ``$MOELENS_CACHE_DIR`` or the
user cache dir (``~/.cache/moelens/maps``); deleting it only costs recomputation.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from moelens.analysis.maps import expert_map, token_map

MAPS = {"expert_map": expert_map, "token_map": token_map}


def cache_dir() -> Path:
    root = os.environ.get("MOELENS_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "moelens")
    return Path(root).expanduser() / "maps"


def _key(store: Any, run: int, name: str, params: dict[str, Any]) -> str | None:
    """A stable key for a complete run's map, or None when the run is not complete (not cacheable)."""
    info = store.run(int(run))
    if info.get("status") != "complete":
        return None
    parts = [str(Path(store.path).resolve()), int(run), str(info.get("finished_at")), name, sorted(params.items())]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


def cached_map(store: Any, run: int, name: str = "expert_map", **params: Any) -> pd.DataFrame:
    """``expert_map`` / ``token_map`` of ``run`` from the disk cache, computed (and stored) on a miss."""
    if name not in MAPS:
        raise ValueError(f"cached maps are {sorted(MAPS)}, not {name!r}")
    key = _key(store, run, name, params)
    path = cache_dir() / f"{key}.parquet" if key else None
    if path is not None and path.exists():
        df = pd.read_parquet(path)
        df.attrs["params"] = json.loads(path.with_suffix(".json").read_text())
        return df
    df = MAPS[name](store, int(run), **params)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        df.to_parquet(tmp, index=False)
        path.with_suffix(".json").write_text(json.dumps(df.attrs.get("params", {}), default=str))
        tmp.replace(path)  # the parquet appears last: a reader never sees a half-written map
    return df


def is_cached(store: Any, run: int, name: str = "expert_map", **params: Any) -> bool:
    key = _key(store, run, name, params)
    return bool(key) and (cache_dir() / f"{key}.parquet").exists()


def precompute(store: Any, runs: list[int], profiles: tuple[str, ...] = ("label", "token")) -> None:
    """Fill the cache with the expert maps the Map page opens with (every profile, default seed)."""
    for run in runs:
        for profile in profiles:
            cached_map(store, run, "expert_map", profile=profile)
