"""Page-ready frames from a run's derived summary tables, so a page on a huge run reads thousands of rows.

The summaries the app reads (``store.read_summary(run, name)``; columns besides ``run_id``):

* ``expert_load`` — layer, expert, label (NULL = unlabelled), ``count`` routed slots, ``gate_mass`` Σ weight,
  ``n_tokens`` tokens of that label (the same on every row of the label);
* ``coactivation`` — layer, expert_i, expert_j (i ≠ j, both orders), ``n_ij`` tokens with both in their top-k;
* ``token_expert`` — layer, token_id, expert, ``count`` of the token id's occurrences routed to the expert;
* ``transitions`` — layer, next_layer (the next MoE layer), expert, next_expert, ``count`` of tokens whose first
  choice is expert at layer and next_expert at next_layer (pairs with count > 0).

"Routed" is what every moelens score counts: expert ≥ 0 and weight ≠ 0. `SQL` holds the reference definitions
(exact, and checked against the analyses in the tests); the analysis side materialises the same tables for big
runs in one streamed pass. Each ``derive`` result equals the analysis function's frame for the same parameters
(tests/test_app.py checks them against each other); anything a summary cannot answer returns None and the
caller runs the analysis itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from moelens.store.schema import summary_table

#: Reference SQL of each summary over one run (``$run``), in the columns documented above.
SQL: dict[str, str] = {
    "expert_load": """
        WITH lab AS (SELECT seq_id, label FROM sequences WHERE run_id = $run),
             ntok AS (SELECT l.label, count(*) AS n_tokens FROM tokens t LEFT JOIN lab l USING (seq_id)
                      WHERE t.run_id = $run GROUP BY l.label)
        SELECT r.layer, r.expert, l.label, count(*) AS count, sum(r.weight)::DOUBLE AS gate_mass, any_value(n.n_tokens) AS n_tokens
        FROM routing r LEFT JOIN lab l USING (seq_id) JOIN ntok n ON n.label IS NOT DISTINCT FROM l.label
        WHERE r.run_id = $run AND r.expert >= 0 AND (r.weight IS NULL OR r.weight <> 0)
        GROUP BY r.layer, r.expert, l.label ORDER BY ALL""",
    "coactivation": """
        WITH r AS (SELECT seq_id, pos, layer, expert FROM routing
                   WHERE run_id = $run AND expert >= 0 AND (weight IS NULL OR weight <> 0))
        SELECT a.layer, a.expert AS expert_i, b.expert AS expert_j, count(*) AS n_ij
        FROM r a JOIN r b ON a.seq_id = b.seq_id AND a.pos = b.pos AND a.layer = b.layer AND a.expert <> b.expert
        GROUP BY ALL ORDER BY ALL""",
    "token_expert": """
        SELECT r.layer, t.token_id, r.expert, count(*) AS count
        FROM routing r JOIN tokens t ON t.run_id = r.run_id AND t.seq_id = r.seq_id AND t.pos = r.pos
        WHERE r.run_id = $run AND r.expert >= 0 AND (r.weight IS NULL OR r.weight <> 0)
        GROUP BY ALL ORDER BY ALL""",
    "transitions": """
        WITH lay AS (SELECT layer, lead(layer) OVER (ORDER BY layer) AS next_layer FROM layers WHERE run_id = $run),
             r AS (SELECT seq_id, pos, layer, expert FROM routing
                   WHERE run_id = $run AND rank = 0 AND expert >= 0 AND (weight IS NULL OR weight <> 0))
        SELECT a.layer, l.next_layer, a.expert, b.expert AS next_expert, count(*) AS count
        FROM r a JOIN lay l ON a.layer = l.layer JOIN r b ON b.seq_id = a.seq_id AND b.pos = a.pos AND b.layer = l.next_layer
        GROUP BY ALL ORDER BY ALL""",
}


def materialise(store: Any, run: int, names: tuple[str, ...] = tuple(SQL)) -> None:
    """Compute the summaries ``names`` of a run with the reference SQL and store them (small runs, tests)."""
    for name in names:
        with store.connect() as con:
            table = con.sql(SQL[name].replace("$run", str(int(run)))).to_arrow_table()
        store.write_summary(int(run), name, table)


def derive(name: str, params: dict[str, Any], available: tuple[str, ...]) -> Callable[[Any, int], pd.DataFrame | None] | None:
    """A function ``(store, run) -> frame`` that answers analysis ``name`` with ``params`` from the summaries in
    ``available``, or None when they cannot (another phase, another variant, no summary)."""
    if params.get("phase") is not None:
        return None
    have = set(available)
    if name == "expert_load" and set(params) <= {"by_label", "phase"} and "expert_load" in have:
        return lambda store, run: expert_load(store, run, by_label=bool(params.get("by_label", False)))
    if name == "layer_balance" and set(params) <= {"phase"} and "expert_load" in have:
        return layer_balance
    if name == "coactivation" and params.get("variant", "all") == "all" and {"expert_load", "coactivation"} <= have:
        return coactivation
    if (name == "expert_top_tokens" and params.get("target", "input") == "input" and "token_expert" in have
            and set(params) <= {"layer", "expert", "n", "n_contexts", "window", "target", "phase"}):
        return lambda store, run: expert_top_tokens(store, run, **{k: v for k, v in params.items() if k not in ("target", "phase")})
    if name == "cross_layer_transitions" and params.get("top1", True) is True and "transitions" in have:
        return transitions
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


_NO_LABEL = "\0"  # unlabelled tokens' group while grouping (pandas drops None keys)


def _load_grid(store: Any, run: int, by_label: bool) -> tuple[pd.DataFrame, dict[Any, float]]:
    """Counts and gate mass on the full (layer, label group, expert) grid, zeros where nothing was routed;
    and the number of tokens of each group. One scatter over all layers (numpy), not a groupby per layer."""
    rows = store.read_summary(run, "expert_load").to_pandas()
    label = rows["label"].astype(object).where(rows["label"].notna(), _NO_LABEL)
    n_tok = {k: float(v) for k, v in rows.groupby(label)["n_tokens"].first().items()}
    if not by_label:
        label, n_tok = pd.Series(_NO_LABEL, index=rows.index), {_NO_LABEL: float(sum(n_tok.values()))}
    names = sorted(k for k in n_tok if k != _NO_LABEL) + ([_NO_LABEL] if _NO_LABEL in n_tok else [])
    lay = run_layers(store, run)
    G, E = len(names), lay["n_experts"].to_numpy()
    start = np.r_[0, np.cumsum(G * E)[:-1]]
    where = pd.Series(np.arange(len(lay)), index=lay["layer"].to_numpy())
    li = where.reindex(rows["layer"].to_numpy()).to_numpy()
    ok = ~np.isnan(li)
    li = li[ok].astype(np.int64)
    at = start[li] + pd.Index(names).get_indexer(label[ok]) * E[li] + rows["expert"].to_numpy()[ok]
    total = int((G * E).sum())
    df = pd.DataFrame({
        "layer": np.repeat(lay["layer"].to_numpy(), G * E),
        "group": np.concatenate([np.repeat(np.array(names, dtype=object), e) for e in E]) if len(E) else [],
        "expert": np.concatenate([np.tile(np.arange(e), G) for e in E]) if len(E) else [],
        "count": np.bincount(at, weights=rows["count"].to_numpy()[ok], minlength=total).astype(np.int64),
        "gate_mass": np.bincount(at, weights=rows["gate_mass"].to_numpy(np.float64)[ok], minlength=total),
    })
    df["n_group"] = df["group"].map(n_tok).astype(float)
    df["label"] = df["group"].where(df["group"] != _NO_LABEL, None)
    return df, n_tok


def expert_load(store: Any, run: int, *, by_label: bool = False) -> pd.DataFrame:
    """`moelens.analysis.expert_load` from the ``expert_load`` summary."""
    df, _ = _load_grid(store, run, by_label)
    key = [df["layer"], df["group"]]
    with np.errstate(invalid="ignore", divide="ignore"):
        df["activation_rate"] = df["count"] / df["n_group"]
        df["share"] = df["count"] / df.groupby(key)["count"].transform("sum")
        df["gate_share"] = df["gate_mass"] / df.groupby(key)["gate_mass"].transform("sum")
    df = df[df["n_group"] > 0]
    cols = ["layer", "expert", "label", "count", "activation_rate", "share", "gate_mass", "gate_share"]
    df = df[cols] if by_label else df[[c for c in cols if c != "label"]]
    return _params(df, "expert_load", run, by_label=by_label)


def _counts(store: Any, run: int) -> tuple[pd.DataFrame, float]:
    df, n_tok = _load_grid(store, run, by_label=False)
    return df, n_tok[_NO_LABEL]


def layer_balance(store: Any, run: int) -> pd.DataFrame:
    """`moelens.analysis.layer_balance` from the ``expert_load`` summary."""
    counts, n_tokens = _counts(store, run)
    rows = []
    for layer in run_layers(store, run).itertuples():
        n = counts.loc[counts["layer"] == layer.layer, "count"].to_numpy(np.float64)
        E, total = int(layer.n_experts), n.sum()
        row = {"layer": int(layer.layer), "n_experts": E, "top_k": int(layer.top_k), "n_tokens": int(n_tokens)}
        if total == 0:
            row.update(dict.fromkeys(["entropy", "norm_entropy", "effective_experts", "max_mean", "maxvio", "cv"], np.nan))
            row["dead_experts"] = E if n_tokens else np.nan
        else:
            f = n / total
            h = float(-(f[f > 0] * np.log(f[f > 0])).sum())
            row.update(entropy=h, norm_entropy=h / np.log(E) if E > 1 else np.nan, effective_experts=float(np.exp(h)),
                       max_mean=float(E * f.max()), maxvio=float(E * f.max() - 1), cv=float(n.std() / n.mean()),
                       dead_experts=int((n == 0).sum()))
        rows.append(row)
    return _params(pd.DataFrame(rows), "layer_balance", run)


def coactivation(store: Any, run: int) -> pd.DataFrame:
    """`moelens.analysis.coactivation` (all pairs) from the ``coactivation`` and ``expert_load`` summaries."""
    from moelens.analysis.npmi import npmi_from_counts

    counts, n_tokens = _counts(store, run)
    pairs = store.read_summary(run, "coactivation").to_pandas()
    frames = []
    for layer in run_layers(store, run).itertuples():
        E, k = int(layer.n_experts), int(layer.top_k)
        n = counts.loc[counts["layer"] == layer.layer, "count"].to_numpy(np.float64)
        n_ij = np.zeros((E, E))
        here = pairs[pairs["layer"] == layer.layer]
        n_ij[here["expert_i"].to_numpy(), here["expert_j"].to_numpy()] = here["n_ij"].to_numpy()
        i, j = np.nonzero(~np.eye(E, dtype=bool))
        with np.errstate(invalid="ignore", divide="ignore"):
            frames.append(pd.DataFrame({
                "layer": int(layer.layer), "expert_i": i, "expert_j": j, "n_i": n[i], "n_ij": n_ij[i, j],
                "p_j_given_i": n_ij[i, j] / n[i], "jaccard": n_ij[i, j] / (n[i] + n[j] - n_ij[i, j]),
                "npmi": npmi_from_counts(n_ij[i, j], n[i], n[j], n_tokens)[1],
                "baseline": (k - 1) / (E - 1) if E > 1 else np.nan,
            }))
    return _params(pd.concat(frames, ignore_index=True), "coactivation", run, variant="all")


def transitions(store: Any, run: int) -> pd.DataFrame:
    """`moelens.analysis.cross_layer_transitions` (first choices) from the ``transitions`` summary."""
    df = store.read_summary(run, "transitions").to_pandas()
    df = df.sort_values(["layer", "expert", "next_expert"]).reset_index(drop=True)
    df["p"] = df["count"] / df.groupby(["layer", "expert"])["count"].transform("sum")
    return _params(df[["layer", "next_layer", "expert", "next_expert", "count", "p"]], "cross_layer_transitions", run, top1=True)


def expert_top_tokens(store: Any, run: int, layer: int, expert: int, n: int = 20, n_contexts: int = 3, window: int = 8) -> pd.DataFrame:
    """`moelens.analysis.expert_top_tokens` (input tokens) from the ``token_expert`` summary plus bounded reads:
    the top ids' totals and text, and their first ``n_contexts`` routed occurrences, searched from the start of
    the run in growing seq_id windows (the frequent ids are found in the first few sequences)."""
    from moelens.errors import InputError

    lay = run_layers(store, run).set_index("layer")
    if layer not in lay.index:
        raise InputError(f"no MoE layer {layer} in this run; layers are {lay.index.tolist()}")
    if not 0 <= expert < lay.loc[layer, "n_experts"]:
        raise InputError(f"expert must be in 0..{lay.loc[layer, 'n_experts'] - 1} for layer {layer}, not {expert}")
    here = store.query(f"SELECT token_id, count FROM {summary_table('token_expert')} WHERE run_id = ? AND layer = ? "
                       "AND expert = ?", [int(run), int(layer), int(expert)])  # one expert's rows, not the whole table
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
