"""Bootstrap confidence intervals over sequences for any score, and minimum-count filters for ranked scores.

Why sequences: tokens of one sequence are not independent (a document routes consistently), so resampling
tokens would understate the spread. `bootstrap` draws whole sequences with replacement (a seeded percentile
bootstrap, Efron & Tibshirani 1993; the resampling moe-lrc uses for SRP/SCH, arXiv:2505.16056), recomputes the
score on each draw through its public function, and adds ``<value>_lo`` / ``<value>_hi`` columns to the point
estimate. It only calls score functions, so it holds however a score computes internally.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from moelens.analysis._common import resolve
from moelens.analysis.data import RoutingData
from moelens.errors import InputError

#: The value columns each score's interval is computed for by default.
VALUES: dict[str, tuple[str, ...]] = {
    "srp": ("srp",),
    "sch": ("hit_rate",),
    "repetition": ("first_choice", "any_overlap"),
    "npmi": ("npmi",),
    "risk_difference": ("risk_diff",),
}

#: Columns that name a row of a score's output (the rest are measured and vary from draw to draw).
KEYS = ("layer", "expert", "label", "m", "policy", "cache_size", "cache_ratio", "next_layer", "next_expert",
        "expert_i", "expert_j")

#: Count columns a ranked score's rows rest on, for `min_count`: a row needs at least ``n`` of them.
COUNTS: dict[str, Callable[[pd.DataFrame], pd.Series]] = {
    "npmi": lambda df: df["n_xe"],
    "risk_difference": lambda df: df["a1"] + df["a2"],
}


def resample_sequences(data: RoutingData, rng: np.random.Generator) -> RoutingData:
    """A bootstrap draw: as many sequences as ``data`` has, drawn with replacement, renumbered 0..n-1 in draw
    order (a sequence drawn twice counts twice and never joins its copy)."""
    starts = np.r_[0, np.flatnonzero(np.diff(data.seq_id)) + 1]
    ends = np.r_[starts[1:], data.n_tokens]
    draw = rng.integers(0, len(starts), len(starts))
    lengths = ends[draw] - starts[draw]
    idx = np.concatenate([np.arange(starts[i], ends[i]) for i in draw]) if len(draw) else np.zeros(0, np.int64)
    sub = replace(
        data,
        experts=data.experts[:, idx],
        weights=data.weights[:, idx],
        seq_id=np.repeat(np.arange(len(draw), dtype=np.int32), lengths),
        pos=data.pos[idx],
        token_id=data.token_id[idx],
        predicted_id=data.predicted_id[idx],
        phase=data.phase[idx],
        label=data.label[idx],
        shared_gate=None if data.shared_gate is None else data.shared_gate[:, idx],
        _lazy={},
    )
    sub._lazy["parent"] = (data, idx)
    return sub.freeze()


def bootstrap(
    score: Callable[..., pd.DataFrame] | str,
    source: Any,
    run: int | None = None,
    *,
    n_boot: int = 200,
    ci: float = 0.95,
    seed: int = 0,
    values: Sequence[str] | None = None,
    **params: Any,
) -> pd.DataFrame:
    """``score(source, run, **params)`` with a percentile interval over ``n_boot`` sequence resamples:
    ``<value>_lo`` and ``<value>_hi`` for every value column (default `VALUES` of the score). Rows are matched
    across draws by the score's other columns; a row missing from a draw leaves that draw out of its interval."""
    name = score if isinstance(score, str) else score.__name__
    if isinstance(score, str):
        from moelens.analysis.registry import SCORES

        if score not in SCORES:
            raise InputError(f"no score {score!r}; scores: {sorted(SCORES)}")
        score = SCORES[score].function
    if not 0 < ci < 1:
        raise InputError(f"ci must be between 0 and 1, not {ci}")
    if n_boot < 2:
        raise InputError(f"n_boot must be at least 2, not {n_boot}")
    data = resolve(source, run, phase=params.pop("phase", None))
    point = score(data, **params)
    cols = list(values or VALUES.get(name, ()))
    missing = [c for c in cols if c not in point.columns]
    if not cols or missing:
        raise InputError(f"give values=[...] columns of {name}'s output to bootstrap (columns: {list(point.columns)})")
    keys = [c for c in KEYS if c in point.columns and c not in cols]
    rng = np.random.default_rng(seed)
    draws = []
    for b in range(n_boot):
        d = score(resample_sequences(data, rng), **params)
        draws.append(d[keys + cols].assign(_draw=b))
    stacked = pd.concat(draws, ignore_index=True)
    alpha = (1 - ci) / 2
    grouped = stacked.groupby(keys, dropna=False, sort=False)[cols] if keys else stacked[cols]
    lo = grouped.quantile(alpha) if keys else grouped.quantile(alpha).to_frame().T
    hi = grouped.quantile(1 - alpha) if keys else grouped.quantile(1 - alpha).to_frame().T
    bounds = lo.add_suffix("_lo").join(hi.add_suffix("_hi"))
    out = point.merge(bounds.reset_index(), on=keys, how="left") if keys else point.assign(
        **{c: bounds[c].iloc[0] for c in bounds.columns})
    out = out[list(point.columns) + [f"{c}_{s}" for c in cols for s in ("lo", "hi")]]
    out.attrs["params"] = {**point.attrs.get("params", {}),
                           "bootstrap_ci": f"{ci:.0%} percentile interval over {n_boot} resamples of the "
                                           f"{len(np.unique(data.seq_id))} sequences (seed {seed})",
                           "n_boot": n_boot, "ci": ci, "seed": seed}
    return out


def min_count(df: pd.DataFrame, score: str, n: int) -> pd.DataFrame:
    """The rows of a ranked score's output resting on at least ``n`` events (`COUNTS`); a score with no known
    count column is returned unchanged. The filter is recorded in ``attrs["params"]["min_count"]``."""
    if df is None or df.empty or score not in COUNTS or n <= 0:
        return df
    kept = df[COUNTS[score](df) >= n].copy()
    kept.attrs["params"] = {**df.attrs.get("params", {}), "min_count": int(n), "dropped_below_min_count": len(df) - len(kept)}
    return kept
