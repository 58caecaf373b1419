"""Bounded reads that answer an Experts-page analysis on a big run without a pass over its routing; everything
else a page shows comes from the analysis functions, which finish from the run's derived summaries
(`moelens.analysis.summarize`) themselves (``expert_top_tokens`` included).

* `shared_expert_stats`: the empty frame when the run has no shared-expert gates (one indexed count).

It returns None when it cannot answer; the caller then runs the analysis. The result equals the analysis
function's frame (tests/test_app_data.py).
"""

from __future__ import annotations

from typing import Any

import pandas as pd


def shortcut(name: str, params: dict[str, Any], available: tuple[str, ...] = ()) -> Any:
    """A function ``(store, run) -> frame | None`` answering analysis ``name`` with ``params`` by bounded reads,
    or None when there is none (then the analysis runs, reading the summaries it needs itself). ``available``
    (the run's summary names) is what callers pass; no shortcut here needs it now."""
    if params.get("phase") is not None:
        return None
    if name == "shared_expert_stats" and not params:
        return shared_expert_stats
    return None


def run_layers(store: Any, run: int) -> pd.DataFrame:
    """layer, n_experts, top_k of the run (the run row fills what the layers table lacks)."""
    lay = store.layers(run)[["layer", "n_experts", "top_k"]]
    info = store.run(run)
    lay = lay.fillna({"n_experts": info.get("n_experts"), "top_k": info.get("top_k")})
    return lay.astype({"layer": int, "n_experts": int, "top_k": int}).sort_values("layer").reset_index(drop=True)


def _params(df: pd.DataFrame, score: str, run: int, **params: Any) -> pd.DataFrame:
    from moelens.analysis._common import NOT_ROUTED

    df = df.reset_index(drop=True)
    df.attrs["params"] = {"score": score, "run": int(run), "phase": "all (prompt and generated pooled)",
                          "not_routed": NOT_ROUTED, **params, "source": "derived summary"}
    return df


def shared_expert_stats(store: Any, run: int) -> pd.DataFrame | None:
    """The empty `shared_expert_stats` frame when the run has no shared-expert gates (one indexed count instead
    of loading the run); None (= run the analysis) otherwise."""
    n = store.query("SELECT count(*) AS n FROM (SELECT 1 FROM shared_experts WHERE run_id = ? LIMIT 1)", [int(run)])["n"][0]
    if n:
        return None
    columns = ["layer", "n_tokens", "mean_gate", "std_gate", "min_gate", "max_gate"]
    return _params(pd.DataFrame(columns=columns), "shared_expert_stats", run)
