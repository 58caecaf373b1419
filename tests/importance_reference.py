"""Slow per-row reference implementations of the pruning-importance scores (plain Python dicts and loops,
independent of `moelens.analysis.importance`), used as oracles by ``tests/test_importance.py``.

A row is a dict with ``seq_id, pos, layer, expert, weight, norm, cos`` and optionally ``logits``.
"""

from __future__ import annotations

import math
from collections import defaultdict


def _routed(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["expert"] >= 0 and r["weight"] > 0]


def _softmax_gate(row: dict, rows: list[dict], renorm: bool) -> float:
    def p(r: dict) -> float:
        z = r["logits"]
        return math.exp(z[r["expert"]]) / sum(math.exp(v) for v in z)

    if not renorm:
        return p(row)
    same = [r for r in rows if (r["seq_id"], r["pos"], r["layer"]) == (row["seq_id"], row["pos"], row["layer"])]
    return p(row) / sum(p(r) for r in same)


def reap(rows: list[dict], gate: str = "used") -> dict[tuple[int, int], float]:
    rows = _routed(rows)
    total, count = defaultdict(float), defaultdict(int)
    for r in rows:
        g = r["weight"] if gate == "used" else _softmax_gate(r, rows, gate == "softmax_renorm")
        total[r["layer"], r["expert"]] += g * r["norm"]
        count[r["layer"], r["expert"]] += 1
    return {key: total[key] / count[key] for key in count}


def ean(rows: list[dict]) -> dict[tuple[int, int], float]:
    out = defaultdict(float)
    for r in _routed(rows):
        out[r["layer"], r["expert"]] += r["norm"]
    return dict(out)


def frequency(rows: list[dict]) -> dict[tuple[int, int], int]:
    out = defaultdict(int)
    for r in _routed(rows):
        out[r["layer"], r["expert"]] += 1
    return dict(out)


def easy_ep(rows: list[dict]) -> dict[tuple[int, int], float]:
    out = defaultdict(float)
    for r in _routed(rows):
        out[r["layer"], r["expert"]] += r["weight"] * r["norm"] * max(1 - r["cos"], 0)
    return dict(out)


def esft_keep(relevance: dict[int, float], top_p: float) -> set[int]:
    """Experts of one layer kept by the cumulative rule: descending relevance, ties by id, while the sum of the
    already-kept ones is below top_p."""
    kept, cumulative = set(), 0.0
    for expert in sorted(relevance, key=lambda e: (-relevance[e], e)):
        if cumulative >= top_p:
            break
        kept.add(expert)
        cumulative += relevance[expert]
    return kept
