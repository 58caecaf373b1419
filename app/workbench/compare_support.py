"""Run-vs-run helpers for one shown sequence: which tokens changed their expert set (cheap, from the two
sequences' routing rows already on the page, so the highlight is there at once on any size of run)."""

from __future__ import annotations

import pandas as pd


def expert_sets(routing: pd.DataFrame, layer: int) -> pd.Series:
    """``pos -> frozenset`` of the experts a token was routed to at ``layer`` (weight-0 and dropped slots left out)."""
    r = routing[(routing["layer"] == layer) & (routing["expert"] >= 0) & (routing["weight"] != 0)]
    return r.groupby("pos")["expert"].agg(frozenset)


def changed_expert_sets(routing_a: pd.DataFrame, routing_b: pd.DataFrame, layer: int) -> set[int]:
    """Positions whose routed expert set at ``layer`` differs between the two runs (or is in only one)."""
    a, b = expert_sets(routing_a, layer), expert_sets(routing_b, layer)
    both = a.index.union(b.index)
    a, b = a.reindex(both), b.reindex(both)
    return {int(p) for p, x, y in zip(both, a, b) if x != y}
