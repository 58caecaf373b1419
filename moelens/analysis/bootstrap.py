"""Bootstrap confidence intervals over sequences for any score, and minimum-count filters for ranked scores.

Why sequences: tokens of one sequence are not independent (a document routes consistently), so resampling
tokens would understate the spread. `bootstrap` draws whole sequences with replacement (a seeded percentile
bootstrap, Efron & Tibshirani 1993; the resampling moe-lrc uses for SRP/SCH, arXiv:2505.16056), recomputes the
score on each draw, and adds ``<value>_lo`` / ``<value>_hi`` columns to the point estimate.

Two ways to score the draws, with the same draws (the sequence counts come from the seeded generator over the
run's sequence list, known before any pass) and the same result: on a store's run, the scores whose partial
statistics are sums over sequences (`STREAMED`) stream the run once (or a few times, to bound memory): each
sequence's partial is mapped once and added into every draw with its draw count as weight (`Resampled`), then
finished per draw. Any other score (or an in-memory source) is recomputed on each materialised draw through
its public function, which needs the run in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from moelens.analysis._common import resolve
from moelens.analysis.chunked import HOW_OPTIONS, Chunked, Context, compute_partial, context
from moelens.analysis.data import RoutingData
from moelens.errors import InputError

#: Memory for the per-draw partials of one streamed pass (more draws take more passes).
DRAW_BUDGET_BYTES = 256 << 20

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


def _streamed_scores() -> dict[str, Callable[..., Chunked]]:
    from moelens.analysis.npmi import PredicateCounts
    from moelens.analysis.repetition import RepetitionCounts
    from moelens.analysis.srp import SrpHistograms

    return {
        "srp": lambda segment_lengths=(4, 16, 64, 256), level="layer", by_label=False: SrpHistograms(tuple(int(m) for m in segment_lengths), level, by_label),
        # the permutation baselines are no interval column, and their token sample is no sum over sequences
        "repetition": lambda by_label=False, seed=0, permutation=True: RepetitionCounts(by_label, seed, False),
        "npmi": lambda tokens=None, regex=None, label=None, layer=None: PredicateCounts(
            None if tokens is None else tuple(int(t) for t in tokens), regex, label, layer),
    }  # fmt: skip


#: Scores whose draws stream (partials are sums over sequences); the rest are recomputed on each draw.
STREAMED = ("srp", "repetition", "npmi")


def draw_counts(n_sequences: int, n_boot: int, seed: int) -> np.ndarray:
    """``int64[n_boot, n_sequences]``: how often each sequence is drawn in each resample — the draws of
    `resample_sequences` with ``np.random.default_rng(seed)``, one after the other."""
    rng = np.random.default_rng(seed)
    return np.stack([np.bincount(rng.integers(0, n_sequences, n_sequences), minlength=n_sequences) for _ in range(n_boot)]) \
        if n_sequences else np.zeros((n_boot, 0), np.int64)


class Resampled(Chunked):
    """A score's partial over every draw at once: each sequence of a batch is mapped alone, its partial (a
    nest of arrays and numbers, summed over sequences) flattened and added into each draw's row with the
    sequence's draw count as weight. Exact for sum partials: integers stay exact below 2^53."""

    def __init__(self, inner: Chunked, seq_ids: np.ndarray, counts: np.ndarray, template: Any):
        self.inner, self.seq_ids, self.counts, self.template = inner, seq_ids, counts, template
        self.text, self.logits_layer = inner.text, inner.logits_layer
        self.size = len(flatten(template))

    def map(self, batch: RoutingData) -> np.ndarray:
        acc = np.zeros((len(self.counts), self.size))
        starts = np.r_[0, np.flatnonzero(np.diff(batch.seq_id)) + 1] if batch.n_tokens else np.zeros(0, np.int64)
        columns = np.searchsorted(self.seq_ids, batch.seq_id[starts])
        for start, end, column in zip(starts, np.r_[starts[1:], batch.n_tokens], columns):
            mask = np.zeros(batch.n_tokens, bool)
            mask[start:end] = True
            values = flatten(self.inner.map(batch.select(mask)))
            hit = np.flatnonzero(values)
            acc[:, hit] += np.outer(self.counts[:, column], values[hit])
        return acc

    def merge(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a + b

    def finish(self, partial: np.ndarray, ctx: Context) -> list[pd.DataFrame]:
        inner_ctx = Context(ctx.meta, ctx.n_tokens, ctx.sequences, self.inner)
        return [self.inner.finish(unflatten(self.template, row), inner_ctx) for row in partial]


def flatten(partial: Any) -> np.ndarray:
    """The numbers of a sum partial (nested dicts/lists/tuples of arrays and numbers) as one float vector."""
    leaves: list[np.ndarray] = []

    def walk(p: Any) -> None:
        if isinstance(p, dict):
            for v in p.values():
                walk(v)
        elif isinstance(p, (list, tuple)):
            for v in p:
                walk(v)
        elif p is not None:
            if not isinstance(p, (np.ndarray, int, float, np.number)):
                raise TypeError(f"not a sum partial: {type(p).__name__}")
            leaves.append(np.asarray(p, np.float64).ravel())

    walk(partial)
    return np.concatenate(leaves) if leaves else np.zeros(0)


def unflatten(template: Any, values: np.ndarray) -> Any:
    """``template``'s structure filled with ``values`` (as `flatten` ordered them), in each leaf's dtype."""
    at = 0

    def fill(p: Any) -> Any:
        nonlocal at
        if isinstance(p, dict):
            return {k: fill(v) for k, v in p.items()}
        if isinstance(p, (list, tuple)):
            return type(p)(fill(v) for v in p)
        if p is None:
            return None
        arr = np.asarray(p)
        part = values[at : at + arr.size]
        at += arr.size
        part = np.rint(part) if np.issubdtype(arr.dtype, np.integer) else part
        out = part.astype(arr.dtype).reshape(arr.shape)
        return out if isinstance(p, np.ndarray) else out.item()

    return fill(template)


def _streamed_draws(name: str, source: Any, run: int, phase: str | None, n_boot: int, seed: int, params: dict[str, Any]) -> tuple[list[pd.DataFrame], int]:
    """Every draw's frame of a `STREAMED` score on a store's run, and the number of sequences drawn from."""
    how = {k: params.pop(k) for k in list(params) if k in HOW_OPTIONS}
    inner = _streamed_scores()[name](**params)
    ctx = context(source, run, phase=phase)
    inner = inner.prepare(ctx)
    seq_ids = ctx.sequences["seq_id"].to_numpy()
    counts = draw_counts(len(seq_ids), n_boot, seed)
    template = inner.map(ctx.meta)
    per_pass = max(1, DRAW_BUDGET_BYTES // max(8 * len(flatten(template)), 1))
    frames: list[pd.DataFrame] = []
    for lo in range(0, n_boot, per_pass):
        chunked = Resampled(inner, seq_ids, counts[lo : lo + per_pass], template)
        partial, pass_ctx = compute_partial(chunked, source, run, phase=phase, **how)
        frames.extend(chunked.finish(partial, pass_ctx))
    return frames, len(seq_ids)


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
    phase = params.pop("phase", None)
    cols = list(values or VALUES.get(name, ()))
    streamed = (name in STREAMED and not isinstance(source, RoutingData) and run is not None
                and not any(c.startswith("perm_") for c in cols))  # (the permutation sample is no sum over sequences)
    data = None if streamed else resolve(source, run, phase=phase)
    point = score(source, run, phase=phase, **params) if streamed else score(data, **params)
    missing = [c for c in cols if c not in point.columns]
    if not cols or missing:
        raise InputError(f"give values=[...] columns of {name}'s output to bootstrap (columns: {list(point.columns)})")
    keys = [c for c in KEYS if c in point.columns and c not in cols]
    if streamed:
        frames, n_sequences = _streamed_draws(name, source, int(run), phase, n_boot, seed, dict(params))  # type: ignore[arg-type]
    else:
        rng = np.random.default_rng(seed)
        frames = [score(resample_sequences(data, rng), **params) for _ in range(n_boot)]
        n_sequences = len(np.unique(data.seq_id))
    draws = [d[keys + cols].assign(_draw=b) for b, d in enumerate(frames)]
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
                                           f"{n_sequences} sequences (seed {seed})",
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
