"""Consecutive-token expert repetition — Mixtral Table 5.

Why the extra baselines: the uniform rates (1/E, 1 − C(E−k,k)/C(E,k)) assume balanced routing, which no
real router has; the load-aware Σq² and a permutation baseline (each token paired with a random
non-adjacent token of the same group) separate "consecutive tokens share experts" from "a few experts are
popular" (demo-model.md: random-init routing already beats 1/E in deep layers).
"""

from __future__ import annotations

from math import comb

import numpy as np
import pandas as pd

from moelens.analysis._common import Source, consecutive_pairs, group_expert_counts, resolve, result
from moelens.analysis._sets import bitsets, intersection_size
from moelens.analysis.data import RoutingData


def uniform_overlap(n_experts: int, k: int) -> float:
    """P(two independent uniform top-k sets share an expert) = 1 − C(E−k, k) / C(E, k)."""
    return 1.0 - comb(n_experts - k, k) / comb(n_experts, k) if k <= n_experts else float("nan")


def first_choice_repeats(data: RoutingData, li: int, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For pairs (t, t+1): which have a first choice on both sides, and whether the two are equal."""
    a = data.experts[li, pairs, 0]
    b = data.experts[li, pairs + 1, 0]
    valid = (a >= 0) & (b >= 0)
    return valid, valid & (a == b)


def repetition(
    source: Source, run: int | None = None, *, phase: str | None = None, by_label: bool = False, seed: int = 0
) -> pd.DataFrame:
    """Per layer [, label]: ``first_choice`` = share of consecutive pairs (same sequence) with the same
    rank-0 expert, ``any_overlap`` = share sharing at least one expert, over ``n_pairs`` / ``n_overlap_pairs``
    (a token without a first choice / without any routed expert leaves its pairs out); baselines
    ``uniform_first`` 1/E, ``uniform_overlap``, load-aware ``sum_sq_first`` Σq² (q = first-choice shares of
    the group's tokens) and the permutation rates ``perm_first`` / ``perm_overlap`` (seeded by ``seed``).
    With ``by_label`` a pair belongs to its first token's label. Mixtral (arXiv 2401.04088) Table 5.
    """
    data = resolve(source, run, phase=phase)
    rng = np.random.default_rng(seed)
    pairs = consecutive_pairs(data)
    groups = _groups(data, by_label)
    rows = []
    for li, layer in enumerate(data.layer_ids):
        E, k = int(data.n_experts[li]), int(data.top_k[li])
        bits = bitsets(data.experts[li], E)
        has_any = bits.any(axis=1)
        first_ok, same = first_choice_repeats(data, li, pairs)
        overlap_ok = has_any[pairs] & has_any[pairs + 1]
        overlap = intersection_size(bits[pairs], bits[pairs + 1]) > 0
        for name, code in groups:
            in_pair = data.label[pairs] == code if code is not None else np.ones(len(pairs), bool)
            in_tok = data.label == code if code is not None else np.ones(data.n_tokens, bool)
            q = group_expert_counts(data.experts[li, in_tok, :1], E)[0]
            partner_first, partner_overlap = _permutation(data, li, bits, np.flatnonzero(in_tok & has_any), rng)
            row = {
                "layer": int(layer),
                "n_pairs": int((first_ok & in_pair).sum()),
                "first_choice": _rate(same[in_pair], first_ok[in_pair]),
                "n_overlap_pairs": int((overlap_ok & in_pair).sum()),
                "any_overlap": _rate(overlap[in_pair], overlap_ok[in_pair]),
                "uniform_first": 1.0 / E,
                "uniform_overlap": uniform_overlap(E, k),
                "sum_sq_first": float(((q / q.sum()) ** 2).sum()) if q.sum() else np.nan,
                "perm_first": partner_first,
                "perm_overlap": partner_overlap,
            }
            if by_label:
                row = {"layer": row.pop("layer"), "label": name, **row}
            rows.append(row)
    return result(
        pd.DataFrame(rows), data, "repetition", by_label=by_label, seed=seed,
        pairs="consecutive tokens of one sequence; with phases pooled the prompt→generation pair is included",
        reference="Mixtral of Experts (arXiv 2401.04088) Table 5",
    )  # fmt: skip


def _groups(data: RoutingData, by_label: bool) -> list[tuple[str | None, int | None]]:
    if not by_label:
        return [(None, None)]
    groups: list[tuple[str | None, int | None]] = [(n, i) for i, n in enumerate(data.label_names)]
    if np.any(data.label < 0):
        groups.append((None, -1))
    return groups


def _rate(hits: np.ndarray, valid: np.ndarray) -> float:
    n = int(valid.sum())
    return float((hits & valid).sum() / n) if n else float("nan")


def _permutation(data: RoutingData, li: int, bits: np.ndarray, tokens: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """First-choice and overlap rates of each token with a random partner from ``tokens`` that is neither
    itself nor a sequence neighbour (redrawn until none is)."""
    if len(tokens) < 4:
        return float("nan"), float("nan")
    partner = rng.integers(0, len(tokens), len(tokens))
    for _ in range(100):
        a, b = tokens, tokens[partner]
        near = (data.seq_id[a] == data.seq_id[b]) & (np.abs(data.pos[a] - data.pos[b]) <= 1)
        if not near.any():
            break
        partner[near] = rng.integers(0, len(tokens), int(near.sum()))
    keep = ~near
    a, b = tokens[keep], tokens[partner[keep]]
    overlap = float((intersection_size(bits[a], bits[b]) > 0).mean())
    fa, fb = data.experts[li, a, 0], data.experts[li, b, 0]
    ok = (fa >= 0) & (fb >= 0)
    return _rate(fa == fb, ok), overlap
