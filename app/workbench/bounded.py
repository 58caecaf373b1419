"""Bounded reads that answer a few page analyses on a big run without a pass over its routing; everything
else a page shows comes from the analysis functions, which finish from the run's derived summaries
(`moelens.analysis.summarize`) themselves.

* `shared_expert_stats`: the empty frame when the run has no shared-expert gates (one indexed count);
* `router_token_stats` of one sequence: the analysis on that sequence alone (one seq_id-range read with its logits).

It returns None when it cannot answer; the caller then runs the analysis. The result equals the analysis
function's frame (tests/test_app_data.py).
"""

from __future__ import annotations

from typing import Any

import pandas as pd


def shortcut(name: str, params: dict[str, Any]) -> Any:
    """A function ``(store, run) -> frame | None`` answering analysis ``name`` with ``params`` by bounded reads,
    or None when there is none (then the analysis runs, reading the summaries it needs itself)."""
    if params.get("phase") is not None:
        return None
    if name == "shared_expert_stats" and not params:
        return shared_expert_stats
    if name == "router_token_stats" and params.get("seq_id") is not None and set(params) <= {"layer", "seq_id", "near_tie", "phase"}:
        return lambda store, run: router_token_stats(store, run, **{k: v for k, v in params.items() if k != "phase"})
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


def router_token_stats(store: Any, run: int, layer: int, seq_id: int, near_tie: float = 0.02) -> pd.DataFrame:
    """`moelens.analysis.router_token_stats` of one sequence, on that sequence read alone (with its text and the
    layer's router logits) instead of the whole run."""
    from moelens.analysis import router_token_stats as score
    from moelens.analysis.stream import RunStream

    with RunStream(store, int(run)) as stream:
        one = stream.read((int(seq_id), int(seq_id)), text=True, logits_layer=int(layer))
    return score(one, layer=int(layer), seq_id=int(seq_id), near_tie=near_tie)
