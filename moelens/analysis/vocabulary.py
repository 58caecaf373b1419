"""Vocabulary specialization against three token targets (OLMoE §5) and an expert's top
tokens with example contexts.

Why three targets: an expert can key on the token it reads (input), on what comes next (ground truth), or
on what the model is about to predict — OLMoE found the latter two increasingly explain later layers.
Why ``min_count``: every token id seen once scores p = 1, so rare ids inflate the unweighted mean; the
number of token ids used is always reported.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from moelens.analysis._common import Source, consecutive_pairs, group_expert_counts, resolve, result
from moelens.analysis.data import RoutingData
from moelens.errors import InputError

TARGETS = ("input", "next", "predicted")


def aligned_tokens(data: RoutingData, target: str) -> tuple[np.ndarray, np.ndarray]:
    """(positions whose routing is used, the token id paired with each): ``input`` x_t; ``next`` x_{t+1}
    (a sequence's last token has no pair); ``predicted`` the model's argmax at t (where recorded)."""
    if target == "input":
        rows = np.flatnonzero(data.token_id >= 0)
        return rows, data.token_id[rows]
    if target == "next":
        rows = consecutive_pairs(data)
        rows = rows[data.token_id[rows + 1] >= 0]
        return rows, data.token_id[rows + 1]
    if target == "predicted":
        rows = np.flatnonzero(data.predicted_id >= 0)
        return rows, data.predicted_id[rows]
    raise InputError(f"target must be one of {TARGETS}, not {target!r}")


def _frequent(data: RoutingData, target: str, min_count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Aligned positions of token ids seen at least ``min_count`` times: (rows, id codes, ids, N_x)."""
    rows, x = aligned_tokens(data, target)
    ids, codes, n_x = np.unique(x, return_inverse=True, return_counts=True)
    keep = n_x >= max(min_count, 1)
    remap = np.cumsum(keep) - 1
    sel = keep[codes]
    return rows[sel], remap[codes[sel]], ids[keep], n_x[keep]


def _purity(counts: np.ndarray, n_x: np.ndarray, k: int, E: int, normalize: bool) -> np.ndarray:
    """p_x per token id: (count of x's most frequent expert) / N_x; with ``normalize``, (p_x − k/E) / (1 − k/E)
    so uniform routing scores 0 (left as is when k ≥ E, where that rescaling divides by zero)."""
    p = counts.max(axis=1, initial=0) / np.maximum(n_x, 1)
    return (p - k / E) / (1 - k / E) if normalize and k < E else p


def vocabulary_specialization(
    source: Source,
    run: int | None = None,
    *,
    phase: str | None = None,
    target: str = "input",
    min_count: int = 10,
    normalize: bool = False,
) -> pd.DataFrame:
    """Per layer: ``score`` = unweighted mean over token ids x (with N_x ≥ ``min_count`` aligned
    occurrences) of p_x = (count of x's most frequent expert) / N_x, and ``n_token_ids`` used. With
    ``normalize``: (p_x − k/E) / (1 − k/E). OLMoE ``scripts/run_moe_analysis.py``
    ``do_token_analysis_layers_experts`` (its ``min_count`` is 1). N_x counts
    aligned positions, including ones whose slots were dropped.
    """
    data = resolve(source, run, phase=phase)
    rows, codes, ids, n_x = _frequent(data, target, min_count)
    out = []
    for li, layer in enumerate(data.layer_ids):
        E, k = int(data.n_experts[li]), int(data.top_k[li])
        counts = group_expert_counts(data.experts[li, rows], E, codes, len(ids))
        p = _purity(counts, n_x, k, E, normalize)
        out.append({"layer": int(layer), "score": float(p.mean()) if len(p) else np.nan, "n_token_ids": len(ids)})
    return result(
        pd.DataFrame(out, columns=["layer", "score", "n_token_ids"]), data, "vocabulary_specialization",
        target=target, min_count=min_count, normalize=normalize,
        reference="OLMoE (arXiv 2409.02060) §5, scripts/run_moe_analysis.py",
    )  # fmt: skip


def vocabulary_by_expert(
    source: Source,
    run: int | None = None,
    *,
    phase: str | None = None,
    target: str = "input",
    min_count: int = 10,
    normalize: bool = False,
) -> pd.DataFrame:
    """Per (layer, expert): ``score`` = mean p_x over the token ids credited to the expert (their most
    frequent expert; ties go to the expert seen first in position-then-rank order, as the reference's
    stable sort over a ``Counter``), with ``n_token_ids`` credited (score NaN when none)."""
    data = resolve(source, run, phase=phase)
    rows, codes, ids, n_x = _frequent(data, target, min_count)
    frames = []
    for li, layer in enumerate(data.layer_ids):
        E, k = int(data.n_experts[li]), int(data.top_k[li])
        exp = data.experts[li, rows]
        counts = group_expert_counts(exp, E, codes, len(ids))
        p = _purity(counts, n_x, k, E, normalize)
        credited = _credited_expert(counts, exp, codes)
        n = np.bincount(credited, minlength=E)
        with np.errstate(invalid="ignore", divide="ignore"):
            score = np.bincount(credited, weights=p, minlength=E) / n
        frames.append(pd.DataFrame({"layer": int(layer), "expert": np.arange(E), "score": score, "n_token_ids": n}))
    df = pd.concat(frames) if frames else pd.DataFrame(columns=["layer", "expert", "score", "n_token_ids"])
    return result(
        df, data, "vocabulary_by_expert", target=target, min_count=min_count, normalize=normalize,
        reference="OLMoE scripts/run_moe_analysis.py do_token_analysis_layers_experts",
    )  # fmt: skip


def _credited_expert(counts: np.ndarray, exp: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Each token id's most frequent expert; among tied experts the one whose first occurrence (flattened
    position-then-rank order) comes first."""
    V, E = counts.shape
    tied = counts == counts.max(axis=1, initial=0)[:, None]
    credited = tied.argmax(axis=1)
    multi = tied.sum(axis=1) > 1
    if multi.any():
        sel = multi[codes]
        sub = exp[sel]
        keys = (codes[sel][:, None].astype(np.int64) * E + sub)[sub >= 0]
        seen, first = np.unique(keys, return_index=True)
        order = np.full(V * E, np.iinfo(np.int64).max)
        order[seen] = first
        order = np.where(tied, order.reshape(V, E), np.iinfo(np.int64).max)
        credited[multi] = order[multi].argmin(axis=1)
    return credited


def expert_top_tokens(
    source: Source,
    run: int | None = None,
    layer: int | None = None,
    expert: int | None = None,
    n: int = 20,
    n_contexts: int = 3,
    *,
    target: str = "input",
    phase: str | None = None,
    window: int = 8,
) -> pd.DataFrame:
    """The ``n`` token ids most often routed to (layer, expert) under ``target`` alignment: ``count``,
    ``share`` of the expert's aligned routings, ``token_rate`` = count / N_x (how much of that token goes
    here) and up to ``n_contexts`` example ``contexts`` (``window`` tokens either side inside the sequence,
    the routed position marked ⟦…⟧; the first occurrences). [moelens]; OLMoE ``eid2token`` counters."""
    if layer is None or expert is None:
        raise InputError("expert_top_tokens needs layer=... and expert=...")
    data = resolve(source, run, phase=phase)
    li = data.layer_index(layer)
    if not 0 <= expert < data.n_experts[li]:
        raise InputError(f"expert must be in 0..{data.n_experts[li] - 1} for layer {layer}, not {expert}")
    rows, x = aligned_tokens(data, target)
    here = (data.experts[li, rows] == expert).any(axis=1)
    ids, counts = np.unique(x[here], return_counts=True)
    all_ids, all_counts = np.unique(x, return_counts=True)
    order = np.lexsort((ids, -counts))[:n]
    text = data.token_text()
    vocab_ids, first_at = np.unique(data.token_id, return_index=True)
    out = []
    for i in order:
        tok = ids[i]
        at = np.searchsorted(vocab_ids, tok)
        known = at < len(vocab_ids) and vocab_ids[at] == tok
        examples = rows[here][x[here] == tok][:n_contexts]
        out.append(
            {
                "token_id": int(tok),
                "token": text[first_at[at]] if known else str(tok),
                "count": int(counts[i]),
                "share": counts[i] / here.sum(),
                "token_rate": counts[i] / all_counts[np.searchsorted(all_ids, tok)],
                "contexts": [_context(data, text, int(t), window) for t in examples],
            }
        )
    return result(
        pd.DataFrame(out, columns=["token_id", "token", "count", "share", "token_rate", "contexts"]), data,
        "expert_top_tokens", layer=layer, expert=expert, target=target, n=n, n_contexts=n_contexts, window=window,
        reference="[moelens]; OLMoE eid2token counters",
    )  # fmt: skip


def _context(data: RoutingData, text: np.ndarray, t: int, window: int) -> str:
    lo = max(t - window, int(np.searchsorted(data.seq_id, data.seq_id[t], side="left")))
    hi = min(t + window + 1, int(np.searchsorted(data.seq_id, data.seq_id[t], side="right")))
    return "".join(text[lo:t]) + "⟦" + str(text[t]) + "⟧" + "".join(text[t + 1 : hi])
