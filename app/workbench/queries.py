"""Cached app-side queries that are not plain analysis calls: bootstrap intervals over a run's sequences."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from workbench.data import Progress, _freeze, batch, run_key, run_size, within_budget


@st.cache_data(show_spinner=False, max_entries=64)
def bootstrapped(db: str, key: tuple, name: str, run: int, n_boot: int, seed: int, params: tuple,
                 _budget: int | None = None) -> pd.DataFrame:
    """``moelens.analysis.bootstrap.bootstrap(name, store, run, n_boot=..., seed=..., **params)``, cached; a pass
    over more than ``_budget`` routing slots raises `NeedsFullPass` (not cached)."""
    from moelens.analysis.bootstrap import bootstrap

    with batch(db) as store:
        return bootstrap(name, store, int(run), n_boot=int(n_boot), seed=int(seed), max_pass_slots=_budget, **dict(params))


def bootstrap(db: str, stamp: float, name: str, run: int, n_boot: int, seed: int, **params: Any) -> pd.DataFrame:
    """`bootstrapped`, within the pass budget: a pass over more than `data.pass_slots` routing slots raises
    `data.PassNeeded` instead. Scores whose draws stream (`moelens.analysis.bootstrap.streamed_score`) are
    refused by their own passes; the others load the run, so the run's size decides."""
    from moelens.analysis.bootstrap import bootstrap as compute, streamed_score

    key, frozen = run_key(db, stamp, int(run)), _freeze(params)

    def full(progress: Progress) -> pd.DataFrame:
        with batch(db) as store:
            return compute(name, store, int(run), n_boot=int(n_boot), seed=int(seed), progress=progress, **params)

    size = None if streamed_score(name, params) is not None else run_size(db, int(run))
    return within_budget(("bootstrap", db, key, name, int(run), int(n_boot), int(seed), frozen),
                         f"95% intervals of `{name}` ({n_boot} resamples)",
                         lambda budget: bootstrapped(db, key, name, int(run), int(n_boot), int(seed), frozen, _budget=budget),
                         full, size)


@st.cache_data(show_spinner=False, max_entries=128)
def logit_layers(db: str, stamp: float, run: int) -> list[int]:
    """The layers of ``run`` that have router logits recorded (empty for runs recorded without --logits)."""
    with batch(db) as store:
        df = store.query("SELECT DISTINCT layer FROM router_logits WHERE run_id = ? ORDER BY layer", [int(run)])
    return [int(v) for v in df["layer"]]


@st.cache_data(show_spinner=False, max_entries=64)
def concordance(db: str, stamp: float, run: int, token: str, layer: int, limit: int = 200, width: int = 6) -> pd.DataFrame:
    """Every occurrence (up to ``limit``) of the exact token text ``token`` in ``run``: ``seq_id, pos, left,
    token, right`` (``width`` tokens of context each side) and its top-1 expert at ``layer``, one bounded query."""
    sql = """
        WITH hits AS (
            SELECT seq_id, pos FROM tokens WHERE run_id = $run AND token = $token ORDER BY seq_id, pos LIMIT $limit
        ), ctx AS (
            SELECT h.seq_id, h.pos,
                   string_agg(t.token, '' ORDER BY t.pos) FILTER (WHERE t.pos < h.pos) AS "left",
                   string_agg(t.token, '' ORDER BY t.pos) FILTER (WHERE t.pos > h.pos) AS "right"
            FROM hits h JOIN tokens t ON t.run_id = $run AND t.seq_id = h.seq_id
                 AND t.pos BETWEEN h.pos - $width AND h.pos + $width
            GROUP BY h.seq_id, h.pos
        )
        SELECT c.seq_id, c.pos, coalesce(c."left", '') AS "left", $token AS token, coalesce(c."right", '') AS "right",
               r.expert AS top1
        FROM ctx c LEFT JOIN routing r ON r.run_id = $run AND r.seq_id = c.seq_id AND r.pos = c.pos
             AND r.layer = $layer AND r.rank = 0
        ORDER BY c.seq_id, c.pos"""
    with batch(db) as store:
        return store.query(sql, {"run": int(run), "token": token, "layer": int(layer), "limit": int(limit),
                                 "width": int(width)})


def match_positions(tokens: pd.DataFrame, query: str) -> set[int]:
    """Positions of the tokens that overlap a case-insensitive match of ``query`` in the sequence's text."""
    if not query:
        return set()
    texts = tokens["token"].fillna("").astype(str).tolist()
    ends = pd.Series([len(t) for t in texts]).cumsum().tolist()
    text, needle = "".join(texts).lower(), query.lower()
    hits: set[int] = set()
    start = text.find(needle)
    while start >= 0:
        stop = start + len(needle)
        first = next(i for i, e in enumerate(ends) if e > start)
        i = first
        while i < len(texts) and (ends[i] - len(texts[i])) < stop:
            hits.add(int(tokens["pos"].iloc[i]))
            i += 1
        start = text.find(needle, start + 1)
    return hits


def mispredicted(tokens: pd.DataFrame) -> tuple[set[int], int]:
    """``(positions, n_scored)``: tokens the model's stored greedy prediction (``predicted_id`` of the token
    before) got wrong, and how many tokens had a prediction to compare with."""
    if "predicted_id" not in tokens.columns:
        return set(), 0
    t = tokens.sort_values("pos")
    before = t["predicted_id"].shift(1)
    scored = before.notna() & (t["pos"].diff() == 1)
    wrong = scored & (before != t["token_id"])
    return {int(p) for p in t.loc[wrong, "pos"]}, int(scored.sum())


@st.cache_data(show_spinner=False, max_entries=32)
def umap_map(db: str, stamp: float, name: str, run: int, params: tuple) -> pd.DataFrame:
    """An expert or token map through the disk cache (`moelens.analysis.map_cache`): UMAP runs once per run."""
    from moelens.analysis.map_cache import cached_map

    with batch(db) as store:
        return cached_map(store, int(run), name, **dict(params))


def map_is_cached(db: str, name: str, run: int, **params) -> bool:
    from moelens.analysis.map_cache import is_cached

    with batch(db) as store:
        return is_cached(store, int(run), name, **params)
