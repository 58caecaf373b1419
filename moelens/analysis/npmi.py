"""Normalised PMI between a token predicate and each expert — RICE "cognitive experts".

Why nPMI: it is bounded in [−1, 1] and corrects for both the expert's overall load and the predicate's
frequency, so a busy expert does not win by default (unlike raw co-occurrence counts). The RICE estimator
and its composite score come from summaries of the paper (not verified against the PDF); the estimator
here is moelens' own: nPMI of (predicate, expert in the top-k) over all token positions of one layer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from moelens.analysis._common import group_expert_counts, result
from moelens.analysis.chunked import Chunked, Context, compute
from moelens.analysis.data import RoutingData
from moelens.errors import InputError

_REFERENCE = "RICE (arXiv 2505.14681) via summaries, unverified"


def npmi_from_counts(n_xy: np.ndarray, n_x: Any, n_y: Any, total: int) -> tuple[np.ndarray, np.ndarray]:
    """(PMI in bits, nPMI) from joint and marginal counts over ``total`` positions. nPMI = −1 when the pair
    never co-occurs, 1 when it always does (p(x, y) = 1); NaN when a marginal is 0 (undefined)."""
    n_xy, n_x, n_y = (np.asarray(v, np.float64) for v in (n_xy, n_x, n_y))
    with np.errstate(divide="ignore", invalid="ignore"):
        p_xy = n_xy / total
        pmi = np.log2(p_xy / ((n_x / total) * (n_y / total)))
        value = pmi / -np.log2(p_xy)
    value = np.where(n_xy == 0, -1.0, np.where(n_xy == total, 1.0, value))
    undefined = (n_x == 0) | (n_y == 0) | (total == 0)
    return np.where(undefined, np.nan, pmi), np.where(undefined, np.nan, value)


def token_predicate(
    data: RoutingData,
    *,
    tokens: Iterable[int] | None = None,
    regex: str | None = None,
    label: str | None = None,
) -> tuple[np.ndarray, str]:
    """bool[T] "position t matches x" for exactly one of: a set of token ids, a regex searched in the token
    text, or a sequence label; plus a short description of the predicate."""
    given = [v is not None for v in (tokens, regex, label)]
    if sum(given) != 1:
        raise InputError("give exactly one of tokens=[ids...], regex='...' or label='...'")
    if tokens is not None:
        ids = np.asarray(list(tokens), dtype=np.int64)
        return np.isin(data.token_id, ids), f"token_id in {ids.tolist()}"
    if regex is not None:
        pattern = re.compile(regex)
        codes, uniques = pd.factorize(pd.Series(data.token_text(), dtype=object))
        matches = np.array([bool(pattern.search(str(u))) for u in uniques], dtype=bool)
        return (matches[codes] if len(codes) else np.zeros(0, bool)), f"token text matches {regex!r}"
    if label not in data.label_names:
        raise InputError(f"unknown label {label!r}; labels are {list(data.label_names)}")
    return data.label == data.label_names.index(label), f"sequence label == {label!r}"


@dataclass(frozen=True)
class PredicateCounts(Chunked):
    """Per layer ``[E]`` tokens with each expert overall and among predicate positions, and the positions
    matching the predicate and in total."""

    tokens: tuple[int, ...] | None = None
    regex: str | None = None
    label: str | None = None
    layer: int | None = None

    @property
    def text(self) -> bool:  # type: ignore[override]
        return self.regex is not None

    def map(self, batch: RoutingData) -> dict[str, Any]:
        mask, _ = token_predicate(batch, tokens=self.tokens, regex=self.regex, label=self.label)
        layers = range(batch.n_layers) if self.layer is None else [batch.layer_index(self.layer)]
        return {
            "n_x": int(mask.sum()),
            "T": batch.n_tokens,
            "n_e": [group_expert_counts(batch.experts[li], int(batch.n_experts[li]))[0] for li in layers],
            "n_xe": [group_expert_counts(batch.experts[li, mask], int(batch.n_experts[li]))[0] for li in layers],
        }

    def from_summaries(self, store: Any, ctx: Context) -> Any:
        """Label and token-id predicates (any phase filter): label sizes from ``tokens``, expert counts from
        ``expert_counts``, token-id positions and their experts from ``token_ids`` and ``token_experts``. A
        regex is matched against each position's own text: answered as the set of token ids whose text matches
        when every token id of the run has one text (one grouped read of ``tokens``), else None (streamed),
        as for a run with positions of unknown token id."""
        from moelens.analysis.summary_partials import label_rows, label_tables, regex_token_ids, token_set_counts

        token_predicate(ctx.meta, tokens=self.tokens, regex=self.regex, label=self.label)  # refuses a bad label
        ids = regex_token_ids(store, ctx, self.regex) if self.regex is not None else self.tokens
        if self.label is None and (ids is None or min(ids, default=0) < 0):
            return None  # (summaries keep no position without a token id)
        layers = range(ctx.meta.n_layers) if self.layer is None else [ctx.meta.layer_index(self.layer)]
        tables = label_tables(store, ctx)
        if tables is None:
            return None
        n_tok, (counts,) = tables
        n_e = [counts[li].sum(axis=0) for li in layers]
        if self.label is not None:
            n_x, n_xe = label_rows(n_tok, [counts[li] for li in layers], ctx.meta.label_names.index(self.label))
        else:
            found = token_set_counts(store, ctx, ids or (), list(layers))
            if found is None:
                return None
            n_x, n_xe = found
        return {"n_x": n_x, "T": int(n_tok.sum()), "n_e": n_e, "n_xe": n_xe}

    def finish(self, partial: dict[str, Any], ctx: Context) -> pd.DataFrame:
        data = ctx.meta
        _, described = token_predicate(data, tokens=self.tokens, regex=self.regex, label=self.label)
        layers = range(data.n_layers) if self.layer is None else [data.layer_index(self.layer)]
        frames = []
        for i, li in enumerate(layers):
            E = int(data.n_experts[li])
            n_e, n_xe = partial["n_e"][i], partial["n_xe"][i]
            pmi, value = npmi_from_counts(n_xe, partial["n_x"], n_e, partial["T"])
            frames.append(
                pd.DataFrame(
                    {"layer": int(data.layer_ids[li]), "expert": np.arange(E), "n_x": int(partial["n_x"]), "n_e": n_e,
                     "n_xe": n_xe, "pmi": pmi, "npmi": value}
                )
            )  # fmt: skip
        df = pd.concat(frames).sort_values(["npmi", "layer", "expert"], ascending=[False, True, True], na_position="last")
        return result(df, data, "npmi", predicate=described, layer=self.layer, reference=_REFERENCE)


def npmi(
    source: Any,
    run: int | None = None,
    *,
    tokens: Iterable[int] | None = None,
    regex: str | None = None,
    label: str | None = None,
    layer: int | None = None,
    phase: str | None = None,
    **how: Any,
) -> pd.DataFrame:
    """nPMI(x, (layer, expert)) for a token predicate x, ranked (highest first). Per layer over its T
    positions: p(x) = n_x/T, p(e) = n_e/T (tokens with e in the top-k), p(x, e) = n_xe/T; nPMI = PMI /
    −log2 p(x, e). Columns layer, expert, n_x, n_e, n_xe, pmi (bits), npmi."""
    if sum(v is not None for v in (tokens, regex, label)) != 1:
        raise InputError("give exactly one of tokens=[ids...], regex='...' or label='...'")
    if regex is not None:
        try:
            re.compile(regex)
        except re.error as exc:
            raise InputError(f"regex {regex!r} is not a valid regular expression: {exc}") from exc
    ids = None if tokens is None else tuple(int(t) for t in tokens)
    return compute(PredicateCounts(ids, regex, label, layer), source, run, phase=phase, **how)


def npmi_combined(
    source: Any,
    run: int | None = None,
    targets: Sequence[tuple[float, Mapping[str, Any]]] = (),
    *,
    layer: int | None = None,
    phase: str | None = None,
    **how: Any,
) -> pd.DataFrame:
    """RICE-style composite ``score`` = Σ coef_i · nPMI(predicate_i, e) per (layer, expert), ranked globally
    (whether RICE ranks per layer or globally is unverified). ``targets`` is a list of
    ``(coef, {"tokens": [...]} | {"regex": ...} | {"label": ...})``; e.g. RICE's
    ``[(1, {"regex": "<think>"}), (-1, {"regex": "</think>"}), (-1, {"regex": "Alternatively"})]``.
    Columns layer, expert, score, npmi_0 … npmi_{n-1}. (A composite from summaries of RICE,
    unverified)."""
    if not targets:
        raise InputError("give targets=[(coef, {'tokens'|'regex'|'label': ...}), ...]")
    merged: pd.DataFrame | None = None
    score: Any = 0.0
    for i, (coef, kwargs) in enumerate(targets):
        full = npmi(source, run, layer=layer, phase=phase, **dict(kwargs), **how)
        params = {k: v for k, v in full.attrs["params"].items() if k in ("run", "phase", "not_routed")}
        part = full[["layer", "expert", "npmi"]].rename(columns={"npmi": f"npmi_{i}"})
        merged = part if merged is None else merged.merge(part, on=["layer", "expert"])
    assert merged is not None
    for i, (coef, _) in enumerate(targets):
        score = score + float(coef) * merged[f"npmi_{i}"]
    merged.insert(2, "score", score)
    merged = merged.sort_values(["score", "layer", "expert"], ascending=[False, True, True], na_position="last")
    described = [(float(c), dict(kw)) for c, kw in targets]
    merged = merged.reset_index(drop=True)
    merged.attrs = {}
    merged.attrs["params"] = {"score": "npmi_combined", **params, "targets": described, "layer": layer, "reference": _REFERENCE}
    return merged
