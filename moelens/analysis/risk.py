"""SteerMoE risk difference between two behaviours (Fayyaz et al., arXiv 2509.09660).

Why: the experts whose selection rate differs most between paired examples of opposite behaviours are the
candidates to force on or off (steering). Behaviours are two labels of one run, or (for paired runs, e.g.
two prompt sets recorded separately) two runs.

Two labels of one run are one score (`RiskPair`): one pass (or the summaries) serves both behaviours, and its
partial is a sum over sequences (each sequence belongs to one label), so `moelens.analysis.bootstrap` streams
its intervals. Paired runs take one pass per run; their bootstrap recomputes the score on materialised draws
of the loaded runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from moelens.analysis._common import group_expert_counts, result
from moelens.analysis.chunked import Chunked, Context, Fused, compute, compute_partial, context, label_sequences
from moelens.analysis.data import RoutingData
from moelens.errors import InputError

REFERENCE = "SteerMoE (arXiv 2509.09660) custom_steering.ipynb"


@dataclass(frozen=True)
class RiskCounts(Chunked):
    """Per layer ``[E]`` selections over one behaviour's tokens (a label, or all), and that token count;
    with ``limit`` = (seq_id, n) only the behaviour's tokens before the n-th token of sequence seq_id."""

    label: str | None = None
    limit: tuple[int, int] | None = None

    def map(self, batch: RoutingData) -> dict[str, Any]:
        rows = _tokens(batch, self.label)
        if self.limit is not None:
            seq, n = self.limit
            starts = np.searchsorted(batch.seq_id, batch.seq_id[rows], side="left")
            within = rows - starts  # kept tokens of a sequence are contiguous, so this is the index inside it
            rows = rows[(batch.seq_id[rows] < seq) | ((batch.seq_id[rows] == seq) & (within < n))]
        return {"n": len(rows), "a": [group_expert_counts(batch.experts[li, rows], int(E))[0] for li, E in enumerate(batch.n_experts)]}

    def from_summaries(self, store: Any, ctx: Context) -> Any:
        """Any phase filter, from ``tokens`` and ``expert_counts``; not with a token ``limit`` that cuts the
        behaviour inside the run (``equalize`` when the two sizes differ): where a sequence ends is not in
        the summaries, so that is streamed."""
        from moelens.analysis.summary_partials import label_rows, label_tables

        _tokens(ctx.meta, self.label)  # refuses an unknown label
        tables = None if self.limit is not None else label_tables(store, ctx)
        if tables is None:
            return None
        n_tok, (counts,) = tables
        n, a = label_rows(n_tok, counts, None if self.label is None else ctx.meta.label_names.index(self.label))
        return {"n": n, "a": a}


@dataclass(frozen=True)
class RiskPair(Fused):
    """Two labels of one run in one pass: ``parts`` are the two behaviours' `RiskCounts`, the result is the
    ranked frame. With ``equalize`` the cuts (each label's first tokens, in seq order) are fixed from the
    whole run's sequence sizes in `prepare`, before any pass — so the partial stays a sum over sequences."""

    equalize: bool = False

    @classmethod
    def of(cls, label_a: str, label_b: str, equalize: bool = False) -> RiskPair:
        return cls((RiskCounts(label_a), RiskCounts(label_b)), equalize)

    def prepare(self, ctx: Context) -> RiskPair:
        sizes = [_size(ctx, p.label) for p in self.parts]  # refuses an unknown label before any pass
        if not self.equalize:
            return self
        return replace(self, parts=tuple(replace(p, limit=_first_tokens(ctx, p.label, min(sizes))) for p in self.parts))

    def finish(self, partial: tuple[dict[str, Any], dict[str, Any]], ctx: Context) -> pd.DataFrame:
        one, two = partial
        return _frame(one, two, ctx.meta, ctx.meta, label_a=self.parts[0].label, label_b=self.parts[1].label,
                      run_b=None, equalize=self.equalize)


def _tokens(data: RoutingData, label: str | None) -> np.ndarray:
    if label is None:
        return np.arange(data.n_tokens)
    if label not in data.label_names:
        raise InputError(f"unknown label {label!r}; labels are {list(data.label_names)}")
    return np.flatnonzero(data.label == data.label_names.index(label))


def _sequences(ctx: Context, label: str | None) -> pd.DataFrame:
    """The run's sequences (seq_id, kept n_tokens, label) of one behaviour (None = all)."""
    keep = label_sequences(ctx, label)  # refuses an unknown label
    return ctx.sequences if keep is None else ctx.sequences[keep]


def _size(ctx: Context, label: str | None) -> int:
    """Tokens of a behaviour, from the sequence sizes (no pass over routing)."""
    return int(_sequences(ctx, label)["n_tokens"].sum())


def _first_tokens(ctx: Context, label: str | None, n: int) -> tuple[int, int] | None:
    """(seq_id, tokens inside it) bounding the first ``n`` tokens of ``label`` (None = no cut needed)."""
    seqs = _sequences(ctx, label)
    total = np.cumsum(seqs["n_tokens"].to_numpy())
    if not len(total) or total[-1] <= n:
        return None
    at = int(np.searchsorted(total, n, side="left"))
    before = int(total[at - 1]) if at else 0
    return int(seqs["seq_id"].iloc[at]), n - before


def _frame(one: dict[str, Any], two: dict[str, Any], a: RoutingData, b: RoutingData, **params: Any) -> pd.DataFrame:
    """The ranked table of two behaviours' selection counts (``one`` on ``a``'s layers, ``two`` on ``b``'s)."""
    layers = np.intersect1d(a.layer_ids, b.layer_ids).astype(np.int64)
    at_a, at_b = [a.layer_index(int(x)) for x in layers], [b.layer_index(int(x)) for x in layers]
    E = np.array([int(a.n_experts[i]) for i in at_a], np.int64)
    for layer, e, j in zip(layers, E, at_b):
        if e != int(b.n_experts[j]):
            raise InputError(f"layer {layer}: the runs have different numbers of experts")
    columns = ["layer", "expert", "a1", "a2", "d1", "d2", "a1_n", "a2_n", "risk_diff", "risk_diff_abs"]
    df = pd.DataFrame(columns=columns)
    if len(layers):  # every layer in one frame: a bootstrap finishes hundreds of these
        a1, a2 = np.concatenate([one["a"][i] for i in at_a]), np.concatenate([two["a"][j] for j in at_b])
        n1, n2 = one["n"], two["n"]
        with np.errstate(invalid="ignore", divide="ignore"):
            rate1, rate2 = a1 / n1, a2 / n2
        df = pd.DataFrame(
            {"layer": np.repeat(layers, E), "expert": np.concatenate([np.arange(e) for e in E]), "a1": a1, "a2": a2,
             "d1": n1 - a1, "d2": n2 - a2, "a1_n": rate1, "a2_n": rate2, "risk_diff": rate1 - rate2,
             "risk_diff_abs": np.abs(rate1 - rate2)}
        )  # fmt: skip
    df = df.sort_values(["risk_diff_abs", "layer", "expert"], ascending=[False, True, True], na_position="last")
    return result(df, a, "risk_difference", **params, n_tokens_a=int(one["n"]), n_tokens_b=int(two["n"]), reference=REFERENCE)


def risk_difference(
    source: Any,
    run: int | None = None,
    *,
    label_a: str | None = None,
    label_b: str | None = None,
    source_b: Any = None,
    run_b: int | None = None,
    phase: str | None = None,
    equalize: bool = False,
    **how: Any,
) -> pd.DataFrame:
    """Per (layer, expert): a = tokens of a behaviour where the expert is selected, d = where it is not,
    ``risk_diff`` = a1/(a1+d1) − a2/(a2+d2), ``a1_n``/``a2_n`` the two rates, ranked globally by
    ``risk_diff_abs``. Behaviour 1 = ``label_a`` tokens of (source, run); behaviour 2 = ``label_b`` tokens
    of the same run, or of (``source_b`` or source, ``run_b``) when given (None = all tokens).
    ``equalize`` truncates both to the same number of tokens (SteerMoE's "eq" option, first tokens kept).
    Two labels of one run are read in one pass (`RiskPair`); paired runs in one pass each.
    SteerMoE ``custom_steering.ipynb``"""
    paired_runs = run_b is not None or source_b is not None
    if not paired_runs:
        if label_a is None or label_b is None:
            raise InputError("give label_a and label_b (two behaviours of one run), or run_b/source_b for a second run")
        return compute(RiskPair.of(label_a, label_b, equalize), source, run, phase=phase, **how)
    second = (source_b if source_b is not None else source, run_b)
    cuts: tuple[Any, Any] = (None, None)
    if equalize:
        ctx_a, ctx_b = context(source, run, phase=phase), context(*second, phase=phase)
        limit = min(_size(ctx_a, label_a), _size(ctx_b, label_b))
        cuts = (_first_tokens(ctx_a, label_a, limit), _first_tokens(ctx_b, label_b, limit))
    one, ctx_a = compute_partial(RiskCounts(label_a, cuts[0]), source, run, phase=phase, **how)
    two, ctx_b = compute_partial(RiskCounts(label_b, cuts[1]), *second, phase=phase, **how)
    return _frame(one, two, ctx_a.meta, ctx_b.meta, label_a=label_a, label_b=label_b,
                  run_b=None if ctx_b.meta.origin is None else ctx_b.meta.origin.run_id, equalize=equalize)
