"""How routing at one MoE layer relates to routing at the next. [moelens]

Why: expert ids are never comparable across layers (the unit is (layer, expert)), but the *path* a token
takes is — if the next layer's choice is largely determined by this one's, prefetching and expert
merging can exploit it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from moelens.analysis._common import entropy, result
from moelens.analysis.chunked import Chunked, Context, compute
from moelens.analysis.data import RoutingData


def transition_counts(data: RoutingData, li: int, top1: bool = True, rows: np.ndarray | None = None) -> np.ndarray:
    """``[E_l, E_next]`` tokens going from expert e at layer position li to e' at li + 1: first choices
    only, or (``top1=False``) every pair of routed slots (k·k' per token); only tokens where ``rows``
    (bool[T]) is True when given."""
    E, E2 = int(data.n_experts[li]), int(data.n_experts[li + 1])
    K = 1 if top1 else data.k_max
    here, there = data.experts[li], data.experts[li + 1]
    if rows is not None:
        here, there = here[rows], there[rows]
    counts = np.zeros(E * E2, np.int64)
    for r in range(K):
        for s in range(K):
            a = here[:, r].astype(np.int64)
            b = there[:, s].astype(np.int64)
            ok = (a >= 0) & (b >= 0)
            counts += np.bincount((a * E2 + b)[ok], minlength=E * E2)
    return counts.reshape(E, E2)


@dataclass(frozen=True)
class TransitionCounts(Chunked):
    """Per consecutive layer pair ``[E_l, E_next]`` transition counts (first choices, or all slot pairs)."""

    top1: bool = True

    def map(self, batch: RoutingData) -> list[np.ndarray]:
        return [transition_counts(batch, li, self.top1) for li in range(batch.n_layers - 1)]

    def from_summaries(self, store: Any, ctx: Context) -> Any:
        from moelens.analysis.summary_partials import transition_counts_of

        return transition_counts_of(store, ctx, self.top1)

    def finish(self, partial: list[np.ndarray], ctx: Context) -> pd.DataFrame:
        data = ctx.meta
        frames = []
        for li, counts in enumerate(partial):
            e, e2 = np.nonzero(counts)
            frames.append(
                pd.DataFrame(
                    {
                        "layer": int(data.layer_ids[li]),
                        "next_layer": int(data.layer_ids[li + 1]),
                        "expert": e,
                        "next_expert": e2,
                        "count": counts[e, e2],
                        "p": counts[e, e2] / counts.sum(axis=1)[e],
                    }
                )
            )
        columns = ["layer", "next_layer", "expert", "next_expert", "count", "p"]
        df = pd.concat(frames) if frames else pd.DataFrame(columns=columns)
        return result(df, data, "cross_layer_transitions", top1=self.top1, reference="[moelens]")


def cross_layer_transitions(source: Any, run: int | None = None, *, phase: str | None = None, top1: bool = True, **how: Any) -> pd.DataFrame:
    """Per consecutive MoE layer pair: ``count`` of tokens routed expert → next_expert (first choices, or
    all slot pairs with ``top1=False``) and ``p`` = P(next_expert | expert). Only pairs with count > 0.
    [moelens] (no reference definition)."""
    return compute(TransitionCounts(top1), source, run, phase=phase, **how)


@dataclass(frozen=True)
class LayerConsistency(TransitionCounts):
    """`cross_layer_consistency` from first-choice `TransitionCounts`."""

    def finish(self, partial: list[np.ndarray], ctx: Context) -> pd.DataFrame:
        data = ctx.meta
        rows = []
        for li, counts in enumerate(partial):
            n = counts.sum()
            row = {"layer": int(data.layer_ids[li]), "next_layer": int(data.layer_ids[li + 1]), "n_tokens": int(n)}
            if n:
                h_next = float(entropy(counts.sum(axis=0) / n, base=2))
                mi = float(entropy(counts.sum(axis=1) / n, base=2) + h_next - entropy(counts.ravel() / n, base=2))
                row.update(
                    mi_bits=mi,
                    u_next=mi / h_next if h_next > 0 else np.nan,
                    predictability=float(counts.max(axis=1).sum() / n),
                    baseline=float(counts.sum(axis=0).max() / n),
                )
            else:
                row.update(mi_bits=np.nan, u_next=np.nan, predictability=np.nan, baseline=np.nan)
            rows.append(row)
        columns = ["layer", "next_layer", "n_tokens", "mi_bits", "u_next", "predictability", "baseline"]
        return result(pd.DataFrame(rows, columns=columns), data, "cross_layer_consistency", reference="[moelens]")


def cross_layer_consistency(source: Any, run: int | None = None, *, phase: str | None = None, **how: Any) -> pd.DataFrame:
    """Per consecutive MoE layer pair, from first choices of tokens routed at both: ``mi_bits`` =
    MI(top-1 here; top-1 next), ``u_next`` = MI / H(next) (share of the next choice's uncertainty this
    layer explains), ``predictability`` = accuracy of the best map expert → next expert (Σ_e max_e' n /
    N) against ``baseline`` = always guessing the most common next expert. [moelens], after Megatron
    ``tools/moe_routing`` "predictability"."""
    return compute(LayerConsistency(True), source, run, phase=phase, **how)
