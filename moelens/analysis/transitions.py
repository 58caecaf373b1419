"""How routing at one MoE layer relates to routing at the next. [moelens]

Why: expert ids are never comparable across layers (the unit is (layer, expert)), but the *path* a token
takes is — if the next layer's choice is largely determined by this one's, prefetching and expert
merging can exploit it (Megatron's ``moe_routing`` "predictability", peers.md §2.2).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from moelens.analysis._common import Source, entropy, resolve, result
from moelens.analysis.data import RoutingData


def transition_counts(data: RoutingData, li: int, top1: bool = True) -> np.ndarray:
    """``[E_l, E_next]`` tokens going from expert e at layer position li to e' at li + 1: first choices
    only, or (``top1=False``) every pair of routed slots (k·k' per token)."""
    E, E2 = int(data.n_experts[li]), int(data.n_experts[li + 1])
    K = 1 if top1 else data.k_max
    counts = np.zeros(E * E2, np.int64)
    for r in range(K):
        for s in range(K):
            a = data.experts[li, :, r].astype(np.int64)
            b = data.experts[li + 1, :, s].astype(np.int64)
            ok = (a >= 0) & (b >= 0)
            counts += np.bincount((a * E2 + b)[ok], minlength=E * E2)
    return counts.reshape(E, E2)


def cross_layer_transitions(source: Source, run: int | None = None, *, phase: str | None = None, top1: bool = True) -> pd.DataFrame:
    """Per consecutive MoE layer pair: ``count`` of tokens routed expert → next_expert (first choices, or
    all slot pairs with ``top1=False``) and ``p`` = P(next_expert | expert). Only pairs with count > 0.
    [moelens] (no reference definition)."""
    data = resolve(source, run, phase=phase)
    frames = []
    for li in range(data.n_layers - 1):
        counts = transition_counts(data, li, top1)
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
    return result(df, data, "cross_layer_transitions", top1=top1, reference="[moelens]")


def cross_layer_consistency(source: Source, run: int | None = None, *, phase: str | None = None) -> pd.DataFrame:
    """Per consecutive MoE layer pair, from first choices of tokens routed at both: ``mi_bits`` =
    MI(top-1 here; top-1 next), ``u_next`` = MI / H(next) (share of the next choice's uncertainty this
    layer explains), ``predictability`` = accuracy of the best map expert → next expert (Σ_e max_e' n /
    N) against ``baseline`` = always guessing the most common next expert. [moelens], after Megatron
    ``tools/moe_routing`` "predictability" (peers.md §2.2)."""
    data = resolve(source, run, phase=phase)
    rows = []
    for li in range(data.n_layers - 1):
        counts = transition_counts(data, li, top1=True)
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
