"""Bounded reads that answer a few page analyses on a big run without a pass over its routing; everything
else a page shows comes from the analysis functions, which finish from the run's derived summaries
(`moelens.analysis.summarize`) themselves.

* `expert_top_tokens` (input tokens, every phase): the ``summary_token_experts`` rows of one (layer, expert),
  the top ids' totals and text, and their first routed occurrences searched in growing seq_id windows;
* `shared_expert_stats`: the empty frame when the run has no shared-expert gates (one indexed count);
* `router_token_stats` of one sequence: the analysis on that sequence alone (one seq_id-range read with its logits).

Each returns None when it cannot answer (no summary, another target or phase); the caller then runs the analysis.
Each result equals the analysis function's frame (tests/test_app_data.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from moelens.store.schema import summary_table

_TOP_TOKENS_PARAMS = {"layer", "expert", "n", "n_contexts", "window", "target", "phase"}


def shortcut(name: str, params: dict[str, Any], available: tuple[str, ...]) -> Any:
    """A function ``(store, run) -> frame | None`` answering analysis ``name`` with ``params`` by bounded reads,
    or None when there is none (then the analysis runs, reading the summaries it needs itself)."""
    if params.get("phase") is not None:
        return None
    if (name == "expert_top_tokens" and params.get("target", "input") == "input" and "token_experts" in available
            and set(params) <= _TOP_TOKENS_PARAMS):
        return lambda store, run: expert_top_tokens(store, run, **{k: v for k, v in params.items() if k not in ("target", "phase")})
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


def expert_top_tokens(store: Any, run: int, layer: int, expert: int, n: int = 20, n_contexts: int = 3, window: int = 8) -> pd.DataFrame:
    """`moelens.analysis.expert_top_tokens` (input tokens) from the ``token_experts`` summary plus bounded reads:
    the top ids' totals and text, and their first ``n_contexts`` routed occurrences, searched from the start of
    the run in growing seq_id windows (the frequent ids are found in the first few sequences)."""
    from moelens.errors import InputError

    lay = run_layers(store, run).set_index("layer")
    if layer not in lay.index:
        raise InputError(f"no MoE layer {layer} in this run; layers are {lay.index.tolist()}")
    if not 0 <= expert < lay.loc[layer, "n_experts"]:
        raise InputError(f"expert must be in 0..{lay.loc[layer, 'n_experts'] - 1} for layer {layer}, not {expert}")
    here = store.query(f"SELECT token_id, sum(count) AS count FROM {summary_table('token_experts')} WHERE run_id = ? "
                       "AND layer = ? AND expert = ? GROUP BY token_id",
                       [int(run), int(layer), int(expert)])  # one expert's rows (every phase), not the whole table
    total = here["count"].sum()
    top = here.sort_values(["count", "token_id"], ascending=[False, True]).head(n)
    ids = [int(t) for t in top["token_id"]]
    columns = ["token_id", "token", "count", "share", "token_rate", "contexts"]
    if not ids:
        return _params(pd.DataFrame(columns=columns), "expert_top_tokens", run, layer=layer, expert=expert)
    marks = ", ".join("?" for _ in ids)
    info = store.query(
        f"SELECT token_id, count(*) AS n, arg_min(coalesce(token, token_id::VARCHAR), seq_id::BIGINT * 4294967296 + pos) AS token "
        f"FROM tokens WHERE run_id = ? AND token_id IN ({marks}) GROUP BY token_id", [int(run), *ids]).set_index("token_id")
    contexts = _contexts(store, run, layer, expert, ids, n_contexts, window)
    out = pd.DataFrame({
        "token_id": ids, "token": [info.loc[t, "token"] for t in ids], "count": top["count"].astype(int).tolist(),
        "share": (top["count"] / total).tolist(), "token_rate": [c / info.loc[t, "n"] for t, c in zip(ids, top["count"])],
        "contexts": [contexts.get(t, []) for t in ids],
    })
    return _params(out, "expert_top_tokens", run, layer=layer, expert=expert, target="input", n=n, n_contexts=n_contexts, window=window)


def _contexts(store: Any, run: int, layer: int, expert: int, ids: list[int], n_contexts: int, window: int) -> dict[int, list[str]]:
    if n_contexts <= 0:
        return {}
    bounds = store.query("SELECT min(seq_id) AS lo, max(seq_id) AS hi FROM sequences WHERE run_id = ?", [int(run)]).iloc[0]
    lo, last = (int(bounds["lo"]), int(bounds["hi"])) if pd.notna(bounds["lo"]) else (0, 2**31 - 1)
    marks = ", ".join("?" for _ in ids)
    found: dict[int, list[tuple[int, int]]] = {}
    span = 64
    while lo <= last and any(len(found.get(t, [])) < n_contexts for t in ids):
        hi = lo + span - 1
        hits = store.query(
            f"SELECT t.token_id, t.seq_id, t.pos FROM tokens t SEMI JOIN (SELECT seq_id, pos FROM routing WHERE run_id = ? "
            f"AND layer = ? AND expert = ? AND seq_id BETWEEN ? AND ? AND (weight IS NULL OR weight <> 0)) r USING (seq_id, pos) "
            f"WHERE t.run_id = ? AND t.seq_id BETWEEN ? AND ? AND t.token_id IN ({marks}) ORDER BY t.seq_id, t.pos",
            [int(run), int(layer), int(expert), lo, hi, int(run), lo, hi, *ids])
        for t, s, p in hits.itertuples(index=False):
            if len(found.setdefault(int(t), [])) < n_contexts:
                found[int(t)].append((int(s), int(p)))
        lo, span = hi + 1, span * 4
    places = [sp for t in ids for sp in found.get(t, [])]
    if not places:
        return {}
    seqs = sorted({s for s, _ in places})
    text = store.query(
        f"SELECT seq_id, pos, coalesce(token, token_id::VARCHAR) AS token FROM tokens WHERE run_id = ? "
        f"AND seq_id IN ({', '.join('?' for _ in seqs)}) ORDER BY seq_id, pos", [int(run), *seqs])
    by_seq = {int(s): (g["pos"].to_numpy(), g["token"].tolist()) for s, g in text.groupby("seq_id")}
    out: dict[int, list[str]] = {}
    for t in ids:
        for s, p in found.get(t, []):
            pos, toks = by_seq[s]
            at = int(np.searchsorted(pos, p))
            a, b = max(at - window, 0), min(at + window + 1, len(toks))
            out.setdefault(t, []).append("".join(toks[a:at]) + "⟦" + str(toks[at]) + "⟧" + "".join(toks[at + 1 : b]))
    return out


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
