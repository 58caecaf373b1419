"""Which experts a pruning keeps: a plain-data plan built from an importance table (no torch).

``keep`` is the fraction of routed experts kept. ``uniform`` keeps the same number in every layer (the best by
score); ``per_layer`` ranks all (layer, expert) pairs globally on scores normalised by their layer's total (so
layers with different score scales compete fairly) and keeps the best ``keep × ΣE``, never fewer than top-k
in a layer. Group-limited routers (DeepSeek ``n_group``) keep the same number in every group, so the groups
the router compares stay the same size. Ties are broken by expert id, so a plan is reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from moelens.errors import InputError


@dataclass(frozen=True)
class LayerLayout:
    """What a plan must respect in one MoE layer."""

    n_experts: int
    top_k: int
    n_group: int = 1
    min_per_group: int = 1  #: DeepSeek-V3 scores a group by the sum of its top-2 experts


@dataclass(frozen=True)
class PrunePlan:
    """``kept[layer]`` = the expert ids that stay (ascending); they are renumbered 0..n-1 in the checkpoint."""

    kept: dict[int, tuple[int, ...]]
    layout: dict[int, LayerLayout]
    score: str = ""

    @property
    def removed(self) -> list[tuple[int, int]]:
        """(layer, expert) pairs the plan drops: the ``disable=`` list of the equivalent steering."""
        return [(layer, e) for layer, kept in sorted(self.kept.items())
                for e in range(self.layout[layer].n_experts) if e not in set(kept)]

    @property
    def counts(self) -> dict[int, int]:
        return {layer: len(kept) for layer, kept in self.kept.items()}

    @property
    def uniform(self) -> bool:
        return len(set(self.counts.values())) <= 1

    def to_dict(self) -> dict:
        return {"score": self.score, "kept": {str(layer): list(kept) for layer, kept in self.kept.items()}}


def _n_keep(keep: float, n_experts: int) -> int:
    if not 0 < keep <= 1:
        raise InputError(f"--keep must be a fraction in (0, 1], not {keep}")
    return int(round(keep * n_experts))


def _check(layer: int, n: int, lay: LayerLayout) -> None:
    if n < lay.top_k:
        raise InputError(f"layer {layer} would keep {n} experts, fewer than its top-k ({lay.top_k}); "
                         "raise --keep")
    if lay.n_group > 1 and (n % lay.n_group or n // lay.n_group < lay.min_per_group):
        raise InputError(f"layer {layer} routes within {lay.n_group} expert groups: the kept count ({n}) must be a "
                         f"multiple of {lay.n_group} with at least {lay.min_per_group} per group")


def _best(scores: np.ndarray, candidates: list[int], n: int) -> list[int]:
    return sorted(candidates, key=lambda e: (-scores[e], e))[:n]


def _layer_scores(df: pd.DataFrame, layer: int, n_experts: int, column: str) -> np.ndarray:
    rows = df[df["layer"] == layer]
    values = np.zeros(n_experts)
    values[rows["expert"].to_numpy()] = np.nan_to_num(rows[column].to_numpy(np.float64), nan=0.0)
    return values


def plan_from_scores(scores: pd.DataFrame, layout: Mapping[int, LayerLayout], keep: float, *,
                     per_layer: bool = False, column: str = "score") -> PrunePlan:
    """The plan keeping the highest-``column`` experts (see the module docstring for the two modes)."""
    by_layer = {layer: _layer_scores(scores, layer, lay.n_experts, column) for layer, lay in layout.items()}
    kept: dict[int, list[int]] = {}
    if not per_layer:
        for layer, lay in layout.items():
            n = _n_keep(keep, lay.n_experts)
            _check(layer, n, lay)
            size = lay.n_experts // lay.n_group
            kept[layer] = [e for g in range(lay.n_group)
                           for e in _best(by_layer[layer], list(range(g * size, (g + 1) * size)), n // lay.n_group)]
    else:
        if any(lay.n_group > 1 for lay in layout.values()):
            raise InputError("--per-layer cannot keep group-limited routing balanced; use --uniform")
        total = _n_keep(keep, sum(lay.n_experts for lay in layout.values()))
        for layer, lay in layout.items():
            kept[layer] = _best(by_layer[layer], list(range(lay.n_experts)), lay.top_k)
        pool = []
        for layer, values in by_layer.items():
            norm = values / values.sum() if values.sum() > 0 else values
            pool += [(-norm[e], layer, e) for e in range(len(values)) if e not in kept[layer]]
        room = total - sum(len(v) for v in kept.values())
        for _, layer, e in sorted(pool)[: max(room, 0)]:
            kept[layer].append(e)
    return PrunePlan({layer: tuple(sorted(v)) for layer, v in sorted(kept.items())}, dict(layout),
                     scores.attrs.get("params", {}).get("score", column))


def random_plan(layout: Mapping[int, LayerLayout], counts: Mapping[int, int], seed: int) -> PrunePlan:
    """A control: the same number of kept experts per layer (and per group), drawn uniformly at random."""
    rng = random.Random(seed)
    kept = {}
    for layer, lay in sorted(layout.items()):
        size = lay.n_experts // lay.n_group
        per_group = counts[layer] // lay.n_group
        kept[layer] = tuple(sorted(e for g in range(lay.n_group)
                                   for e in rng.sample(range(g * size, (g + 1) * size), per_group)))
    return PrunePlan(kept, dict(layout), f"random(seed={seed})")
