"""Bootstrap confidence intervals over sequences for any score, and minimum-count filters for ranked scores.

Why sequences: tokens of one sequence are not independent (a document routes consistently), so resampling
tokens would understate the spread. `bootstrap` draws whole sequences with replacement (a seeded percentile
bootstrap, Efron & Tibshirani 1993; the resampling moe-lrc uses for SRP/SCH, arXiv:2505.16056), recomputes the
score on each draw, and adds ``<value>_lo`` / ``<value>_hi`` columns to the point estimate.

The draws are fixed before any pass: how often each of the run's sequences is drawn in each resample
(`draw_counts`, from ``np.random.default_rng(seed)``). The scores whose partial statistics are sums over
sequences (`STREAMED`: srp, sch, repetition, npmi, risk_difference of two labels of one run) never hold the
run: each sequence's partial is mapped once and added into every draw with its draw count as weight
(`Resampled`), over a streamed store run in bounded memory (a few passes when the per-draw partials exceed
`DRAW_BUDGET_BYTES`) or over in-memory data alike, then each draw is finished. For sum partials that is
exactly the score recomputed on each materialised draw. Any other score (permutation baselines, paired runs,
scores that are no sum over sequences) is recomputed on each materialised draw (`resample_sequences`) of
the loaded run.

Two scores fix part of their definition from the whole run before the draws, as their point estimate does:
SCH simulates only its sampled sequences (hashed seq_id, `moelens.analysis.sch.sampled_sequences`; the stride
is chosen from the run's size), so a draw's curve is the mean over the drawn copies of the sampled sequences
(with ``sample_every=1``: every drawn sequence, the recompute on the materialised draw); and
``risk_difference(equalize=True)`` keeps each label's first tokens as cut on the run, so a draw resamples the
equalised tokens (it is not equalised again).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from moelens.analysis._common import resolve
from moelens.analysis.chunked import HOW_OPTIONS, Chunked, Context, NeedsFullPass, compute_partial, context
from moelens.analysis.data import RoutingData
from moelens.errors import InputError, did_you_mean

#: Memory for the per-draw partials of one streamed pass (more draws take more passes).
DRAW_BUDGET_BYTES = 256 << 20
#: Memory for the per-sequence partials `Resampled` stacks before adding them into the draws.
BLOCK_BYTES = 16 << 20
#: Sequences per batch when the draws are mapped over in-memory data.
MEMORY_BATCH_SEQUENCES = 64

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


def _streamed_scores() -> dict[str, Callable[..., Chunked | None]]:
    """Per `STREAMED` score, its sum-over-sequences `Chunked` for the public function's parameters (None
    where those parameters make no such sum: then the draws are materialised)."""
    from moelens.analysis.npmi import PredicateCounts
    from moelens.analysis.repetition import RepetitionCounts
    from moelens.analysis.risk import RiskPair
    from moelens.analysis.sch import SchCurves
    from moelens.analysis.srp import SrpHistograms

    return {
        "srp": lambda segment_lengths=(4, 16, 64, 256), level="layer", by_label=False: SrpHistograms(tuple(int(m) for m in segment_lengths), level, by_label),
        "sch": lambda lookahead=(4, 16, 64, 256), level="layer", lru=True, sample_every=None: SchCurves(tuple(int(m) for m in lookahead), level, lru, sample_every),
        # the permutation baselines are no interval column, and their token sample is no sum over sequences
        "repetition": lambda by_label=False, seed=0, permutation=True: RepetitionCounts(by_label, seed, False),
        "npmi": lambda tokens=None, regex=None, label=None, layer=None: PredicateCounts(
            None if tokens is None else tuple(int(t) for t in tokens), regex, label, layer),
        # paired runs: two passes over two runs, left to the materialised draws
        "risk_difference": lambda label_a=None, label_b=None, source_b=None, run_b=None, equalize=False: None
            if source_b is not None or run_b is not None else RiskPair.of(label_a, label_b, bool(equalize)),
    }  # fmt: skip


#: Scores whose draws stream (partials are sums over sequences); the rest are recomputed on each draw.
STREAMED = ("srp", "sch", "repetition", "npmi", "risk_difference")


def streamed_score(name: str, params: Mapping[str, Any], values: Sequence[str] | None = None) -> Chunked | None:
    """The `Chunked` whose sequence partials `bootstrap` streams for score ``name`` with ``params`` (the
    score's own parameters; ``phase`` and the pass options are ignored) and interval columns ``values``, or
    None when its draws are recomputed on the loaded run."""
    cols = list(values or VALUES.get(name, ()))
    if name not in STREAMED or any(c.startswith("perm_") for c in cols):  # (the permutation sample is no sum over sequences)
        return None
    return _streamed_scores()[name](**{k: v for k, v in params.items() if k != "phase" and k not in HOW_OPTIONS})


def draw_counts(n_sequences: int, n_boot: int, seed: int) -> np.ndarray:
    """``int64[n_boot, n_sequences]``: how often each sequence is drawn in each resample — the draws of
    `resample_sequences` with ``np.random.default_rng(seed)``, one after the other."""
    rng = np.random.default_rng(seed)
    return np.stack([np.bincount(rng.integers(0, n_sequences, n_sequences), minlength=n_sequences) for _ in range(n_boot)]) \
        if n_sequences else np.zeros((n_boot, 0), np.int64)


class Resampled(Chunked):
    """A score's partial over every draw at once: each sequence of a batch is mapped alone, its partial (a
    nest of arrays and numbers, summed over sequences) flattened, and a block of them added into the draws'
    rows with the sequences' draw counts as weights (one matrix product). Exact for sum partials: integers
    stay exact below 2^53. Reads only the sequences the inner score selects."""

    def __init__(self, inner: Chunked, seq_ids: np.ndarray, counts: np.ndarray, template: Any):
        self.inner, self.seq_ids, self.template = inner, seq_ids, template
        self.counts = np.asarray(counts, np.float64)
        self.text, self.logits_layer = inner.text, inner.logits_layer
        self.size = len(flatten(template))

    def select_sequences(self, seq_ids: np.ndarray) -> np.ndarray | None:
        return self.inner.select_sequences(seq_ids)

    def map(self, batch: RoutingData) -> np.ndarray:
        acc = np.zeros((len(self.counts), self.size))
        starts = np.r_[0, np.flatnonzero(np.diff(batch.seq_id)) + 1] if batch.n_tokens else np.zeros(0, np.int64)
        ends = np.r_[starts[1:], batch.n_tokens]
        columns = np.searchsorted(self.seq_ids, batch.seq_id[starts])
        block = max(1, BLOCK_BYTES // (8 * max(self.size, 1)))
        for lo in range(0, len(starts), block):
            rows = [flatten(self.inner.map(_sequence(batch, a, b))) for a, b in zip(starts[lo : lo + block], ends[lo : lo + block])]
            acc += self.counts[:, columns[lo : lo + block]] @ np.stack(rows)
        return acc

    def merge(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a += b  # both are this score's own fresh partials: no third copy of the draws' rows
        return a

    def finish(self, partial: np.ndarray, ctx: Context) -> list[pd.DataFrame]:
        inner_ctx = replace(ctx, chunked=self.inner)
        return [self.inner.finish(unflatten(self.template, row), inner_ctx) for row in partial]


def _sequence(batch: RoutingData, start: int, end: int) -> RoutingData:
    mask = np.zeros(batch.n_tokens, bool)
    mask[start:end] = True
    return batch.select(mask)


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


def _plan(chunked: Chunked, source: Any, run: int | None, phase: str | None, n_boot: int, seed: int) -> dict[str, Any]:
    """What the streamed draws need before any pass: the score prepared on the whole run, the run's
    sequences and their draw counts, the partial's shape and how many draws each pass holds."""
    ctx = context(source, run, phase=phase)
    inner = chunked.prepare(ctx)
    seq_ids = ctx.sequences["seq_id"].to_numpy()
    template = inner.map(ctx.meta)
    per_pass = max(1, DRAW_BUDGET_BYTES // max(8 * len(flatten(template)), 1))
    return {"inner": inner, "seq_ids": seq_ids, "counts": draw_counts(len(seq_ids), n_boot, seed), "template": template,
            "per_pass": per_pass, "n_passes": -(-n_boot // per_pass)}


def _streamed_draws(plan: dict[str, Any], source: Any, run: int | None, phase: str | None, how: dict[str, Any],
                    stage: Callable[[int], Any]) -> list[pd.DataFrame]:
    """Every draw's frame, from `_plan`'s passes (pass i reports to ``stage(i)``; 0 is the point estimate's)."""
    if isinstance(source, RoutingData):
        how = {"batches": MEMORY_BATCH_SEQUENCES, **how}  # one sequence at a time is masked out of each batch
    frames: list[pd.DataFrame] = []
    counts, per_pass = plan["counts"], plan["per_pass"]
    for i, lo in enumerate(range(0, len(counts), per_pass)):
        chunked = Resampled(plan["inner"], plan["seq_ids"], counts[lo : lo + per_pass], plan["template"])
        partial, pass_ctx = compute_partial(chunked, source, run, phase=phase, progress=stage(i + 1), **how)
        frames.extend(chunked.finish(partial, pass_ctx))
    return frames


def _stages(progress: Callable[[int, int], None] | None, n_stages: int) -> Callable[[int], Callable[[int, int], None] | None]:
    """``stage(i)``: a pass's ``progress(done, total)`` reported as batches done of all ``n_stages`` passes."""
    if progress is None:
        return lambda i: None
    return lambda i: (lambda done, total: progress(i * total + done, n_stages * total))


def _check_params(name: str, score: Callable[..., Any], params: Mapping[str, Any]) -> None:
    """Refuse, in one line, a parameter neither the score nor the pass options take."""
    sig = inspect.signature(score).parameters
    known = [k for k, p in list(sig.items())[1:] if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and k != "run"]
    from moelens.analysis.registry import takes_how

    options = [k for k, p in inspect.signature(compute_partial).parameters.items() if p.kind is p.KEYWORD_ONLY] if takes_how(score) else HOW_OPTIONS
    known += [k for k in options if k not in known]
    for key in params:
        if key not in known:
            raise InputError(f"{name} has no parameter {key!r}{did_you_mean(key, known)}; it takes {', '.join(known)}")


def _load_check(source: Any, run: int | None, phase: str | None, params: Mapping[str, Any], max_pass_slots: int | None) -> None:
    """`NeedsFullPass` when loading the run(s) to materialise draws reads more routing slots than allowed."""
    if max_pass_slots is None or isinstance(source, RoutingData):
        return
    from moelens.analysis.stream import TARGET_SLOTS

    runs = [(source, run), *([(params.get("source_b") or source, params["run_b"])] if params.get("run_b") is not None else [])]
    ctxs = [context(s, r, phase=phase) for s, r in runs]
    n_tokens = sum(c.n_tokens for c in ctxs)
    n_slots = sum(c.n_tokens * int(c.meta.n_layers * c.meta.k_max) for c in ctxs)
    if n_slots > max_pass_slots:
        raise NeedsFullPass("loading the run for the bootstrap", n_tokens, n_slots, -(-n_slots // TARGET_SLOTS))


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
    across draws by the score's other columns; a row missing from a draw leaves that draw out of its interval.

    The pass options (`moelens.analysis.chunked.HOW_OPTIONS`) reach every pass: ``max_pass_slots`` refuses
    (`NeedsFullPass`) the point estimate's pass, each streamed pass of the draws, and loading a run for
    materialised draws when they are larger; ``progress(done, total)`` counts batches over all the passes
    (the point estimate's, then the draws'; a materialised bootstrap reports 0 of 1, then 1 of 1)."""
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
    _check_params(name, score, params)
    phase = params.pop("phase", None)
    how = {k: params.pop(k) for k in list(params) if k in HOW_OPTIONS}
    progress = how.pop("progress", None)
    cols = list(values or VALUES.get(name, ()))
    chunked = streamed_score(name, params, cols)
    if chunked is not None:
        try:
            plan = _plan(chunked, source, run, phase, n_boot, seed)
        except Exception:
            score(source, run, phase=phase, **params)  # a bad parameter gets the score's own message
            raise
        stage = _stages(progress, 1 + plan["n_passes"])
        point = score(source, run, phase=phase, progress=stage(0), **params, **how)
        n_sequences = len(plan["seq_ids"])
    else:
        _load_check(source, run, phase, params, how.get("max_pass_slots"))
        stage = _stages(progress, 1)
        data = resolve(source, run, phase=phase)
        point = score(data, **params)
        n_sequences = len(np.unique(data.seq_id))
    missing = [c for c in cols if c not in point.columns]
    if not cols or missing:
        raise InputError(f"give values=[...] columns of {name}'s output to bootstrap (columns: {list(point.columns)})")
    keys = [c for c in KEYS if c in point.columns and c not in cols]
    if chunked is not None:
        frames = _streamed_draws(plan, source, run, phase, how, stage)
    else:
        report = stage(0) or (lambda done, total: None)
        report(0, 1)
        rng = np.random.default_rng(seed)
        frames = [score(resample_sequences(data, rng), **params) for _ in range(n_boot)]
        report(1, 1)
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
    out.attrs["params"] = {**point.attrs.get("params", {}), "bootstrap_ci": _described(name, point, ci, n_boot, n_sequences, seed, chunked),
                           "n_boot": n_boot, "ci": ci, "seed": seed}
    return out


def _described(name: str, point: pd.DataFrame, ci: float, n_boot: int, n_sequences: int, seed: int, chunked: Chunked | None) -> str:
    """The interval's definition in words, for ``attrs["params"]["bootstrap_ci"]``."""
    text = f"{ci:.0%} percentile interval over {n_boot} resamples of the {n_sequences} sequences (seed {seed})"
    text += ", streamed from sequence partials" if chunked is not None else ", recomputed on each materialised resample"
    params = point.attrs.get("params", {})
    if name == "sch" and int(params.get("sample_every", 1)) > 1:
        text += (f"; a resample's curve is the mean over its copies of the sampled sequences (hashed seq_id divisible "
                 f"by {params['sample_every']})")
    if name == "risk_difference" and params.get("equalize") and chunked is not None:
        text += "; the equalize cut is the run's (a resample is not equalised again)"
    return text


def min_count(df: pd.DataFrame, score: str, n: int) -> pd.DataFrame:
    """The rows of a ranked score's output resting on at least ``n`` events (`COUNTS`); a score with no known
    count column is returned unchanged. The filter is recorded in ``attrs["params"]["min_count"]``."""
    if df is None or df.empty or score not in COUNTS or n <= 0:
        return df
    kept = df[COUNTS[score](df) >= n].copy()
    kept.attrs["params"] = {**df.attrs.get("params", {}), "min_count": int(n), "dropped_below_min_count": len(df) - len(kept)}
    return kept
