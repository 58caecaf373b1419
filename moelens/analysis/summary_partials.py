"""Partials of the label/token-set scores rebuilt from a run's derived summaries (`moelens.analysis.summaries`).

Why a module of its own: each function here returns exactly the merged partial that the score's ``map`` over
every batch would have produced (integers equal, float sums up to rounding), so ``finish`` cannot tell the
two apart, and the score answers without reading ``routing``. Each returns None when a summary it needs
is not materialised; the score's own ``from_summaries`` decides which parameters can be answered at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from moelens.analysis.chunked import Context, High, Low
from moelens.analysis.summaries import _label_codes, _layer_arrays, _read


def label_tables(store: Any, ctx: Context, column: str = "count") -> tuple[np.ndarray, list[np.ndarray]] | None:
    """([D + 1] tokens per label code, per layer [D + 1, E] ``column`` of ``expert_counts``); code D =
    unlabelled. None when a summary is missing."""
    counts, tokens = _read(store, ctx, "expert_counts"), _read(store, ctx, "tokens")
    if counts is None or tokens is None:
        return None
    D = len(ctx.meta.label_names)
    n = np.bincount(_label_codes(tokens, ctx.meta), weights=tokens["n_tokens"].to_numpy(), minlength=D + 1).astype(np.int64)
    dtype = np.float64 if column == "gate_mass" else np.int64
    return n, _layer_arrays(counts, ctx.meta, _label_codes(counts, ctx.meta), D + 1, column, dtype)


def pair_counts_by_label(store: Any, ctx: Context) -> list[np.ndarray] | None:
    """Per layer ``[4, D + 1]`` consecutive-pair counts (n_pairs, same_first, n_overlap_pairs, overlap) by
    the pair's label code, from ``repetition``."""
    rows = _read(store, ctx, "repetition")
    if rows is None:
        return None
    D = len(ctx.meta.label_names)
    codes = _label_codes(rows, ctx.meta)
    out = []
    for layer in ctx.meta.layer_ids:
        here = (rows["layer"] == layer).to_numpy()
        out.append(np.stack([np.bincount(codes[here], weights=rows[c].to_numpy()[here], minlength=D + 1).astype(np.int64)
                             for c in ("n_pairs", "same_first", "n_overlap_pairs", "overlap")]))  # fmt: skip
    return out


def token_set_counts(store: Any, ctx: Context, ids: Sequence[int], layers: Sequence[int]) -> tuple[int, list[np.ndarray]] | None:
    """(positions whose token id is in ``ids``, per layer position in ``layers`` ``[E]`` routed slots of
    those positions), from ``token_ids`` and ``token_experts``."""
    rows, n_ids = _read(store, ctx, "token_experts"), _read(store, ctx, "token_ids")
    if rows is None or n_ids is None:
        return None
    wanted = np.unique(np.asarray(ids, np.int64))
    n_x = int(n_ids.loc[np.isin(n_ids["token_id"].to_numpy(), wanted), "n"].sum())
    rows = rows[np.isin(rows["token_id"].to_numpy(), wanted)]
    out = []
    for li in layers:
        here = rows[rows["layer"] == ctx.meta.layer_ids[li]]
        out.append(np.bincount(here["expert"].to_numpy().astype(np.int64), weights=here["count"].to_numpy(),
                               minlength=int(ctx.meta.n_experts[li])).astype(np.int64))  # fmt: skip
    return n_x, out


def label_rows(n_tokens: np.ndarray, per_layer: list[np.ndarray], label: int | None) -> tuple[int, list[np.ndarray]]:
    """(tokens, per layer ``[E]``) of one label code, or of every token (``label`` None)."""
    if label is None:
        return int(n_tokens.sum()), [a.sum(axis=0) for a in per_layer]
    return int(n_tokens[label]), [a[label] for a in per_layer]



def committee_units(store: Any, ctx: Context) -> list[tuple[Any, ...]] | None:
    """`moelens.analysis.committee.EciStats`'s partial over last prompt tokens, from ``committee_units``."""
    rows = _read(store, ctx, "committee_units")
    if rows is None:
        return None
    D = len(ctx.meta.label_names)
    codes = _label_codes(rows, ctx.meta)
    out = []
    for li, layer in enumerate(ctx.meta.layer_ids):
        E = int(ctx.meta.n_experts[li])
        here = (rows["layer"] == layer).to_numpy() & (codes < D)
        d, e = codes[here], rows["expert"].to_numpy()[here].astype(np.int64)
        n = np.zeros(D, np.int64)
        n[d] = rows["n_units"].to_numpy()[here]
        stats = []
        for column, fill in (("count", 0), ("gate_mass", 0.0), ("gate_max", 0.0), ("gate_min", np.inf)):
            arr = np.full((D, E), fill, np.int64 if column == "count" else np.float64)
            arr[d, e] = rows[column].to_numpy()[here]
            stats.append(arr)
        out.append((n, stats[0], stats[1], High(stats[2]), Low(stats[3])))
    return out
