"""Shared plumbing of the scores: resolving a source to `RoutingData`, tagging results with their
parameters, and the one counting kernel (bincount over ``group × expert`` keys) most scores reduce to."""

from __future__ import annotations

from typing import Any, Union

import numpy as np
import pandas as pd

from moelens.analysis.data import PHASES, RoutingData
from moelens.errors import InputError
from moelens.store import TraceStore

#: What every score may be given: a trace store plus a run id, or routing already in memory.
Source = Union[TraceStore, RoutingData]

#: Stated in every result: how slots without an expert are treated.
NOT_ROUTED = "capacity-dropped (-1) and weight-0 slots select nothing; their tokens still count in token totals"


def resolve(source: Source, run: int | None = None, *, phase: str | None = None) -> RoutingData:
    """The `RoutingData` a score works on: a store's run (cached load) or the data itself, optionally
    restricted to one phase ('prompt' or 'generated'; None pools both)."""
    if phase is not None and phase not in PHASES:
        raise InputError(f"phase must be one of {PHASES} or None, not {phase!r}")
    if isinstance(source, RoutingData):
        if phase is None or source.phase_filter == phase:
            return source
        if source.phase_filter is not None:
            raise InputError(f"this data holds only {source.phase_filter!r} tokens; cannot select {phase!r}")
        return source.select(source.phase == PHASES.index(phase), phase_filter=phase)
    if isinstance(source, TraceStore):
        if run is None:
            raise InputError("give the run id: score(store, run, ...)")
        return RoutingData.from_store(source, int(run), phase=phase)
    raise TypeError(f"source must be a TraceStore or a RoutingData, not {type(source).__name__}")


def result(df: pd.DataFrame, data: RoutingData, score: str, **params: Any) -> pd.DataFrame:
    """Attach the score name, run, phase and parameters to ``df.attrs['params']`` and return it."""
    df = df.reset_index(drop=True)
    df.attrs["params"] = {
        "score": score,
        "run": None if data.origin is None else data.origin.run_id,
        "phase": data.phase_filter or "all (prompt and generated pooled)",
        "not_routed": NOT_ROUTED,
        **params,
    }
    return df


def group_expert_counts(
    experts: np.ndarray,
    n_experts: int,
    group: np.ndarray | None = None,
    n_groups: int = 1,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """``[n_groups, E]`` number (or, with ``weights``, gate mass) of routed slots per group and expert.

    ``experts`` is one layer's ``[T, K]`` slice (use ``[:, :1]`` for first choices); ``group`` gives each
    token a group code, -1 = leave the token out. One compiled pass over the slots (a bincount over
    combined keys would build three temporaries of the layer's size per call).
    """
    from moelens.analysis._kernels import jit, slot_totals

    g = np.zeros(0, np.int64) if group is None else np.asarray(group)
    if group is not None and len(g) != len(experts):
        raise ValueError(f"group has {len(g)} entries for {len(experts)} tokens")
    out = np.zeros(n_groups * n_experts, np.int64 if weights is None else np.float64)
    w = np.zeros((0, 0), np.float32) if weights is None else weights
    bad = jit(slot_totals)(experts, w, g, n_groups, n_experts, out)
    if bad:
        raise ValueError(f"{bad} slots or tokens name an expert >= n_experts ({n_experts}) or a group >= n_groups ({n_groups})")
    return out.reshape(n_groups, n_experts)


def label_groups(data: RoutingData, by_label: bool) -> tuple[np.ndarray, int]:
    """Each token's group and the number of groups: its label code with unlabelled tokens last (group D),
    or one group of every token."""
    if not by_label:
        return np.zeros(data.n_tokens, np.int64), 1
    D = len(data.label_names)
    return np.where(data.label >= 0, data.label, D).astype(np.int64), D + 1


def consecutive_pairs(data: RoutingData) -> np.ndarray:
    """Indices t of the consecutive token pairs (t, t+1) inside one sequence (never across
    sequences; with all phases pooled the prompt→generation pair is included)."""
    return np.flatnonzero(data.next_is_consecutive)


def entropy(p: np.ndarray, axis: int = -1, base: float = np.e) -> np.ndarray:
    """Shannon entropy of distributions along ``axis`` with 0·log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return -terms.sum(axis=axis) / np.log(base)
