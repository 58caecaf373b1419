"""Expert pruning: plans from importance scores (no torch), checkpoints and evaluations (torch, loaded lazily).

    plan = moelens.prune(model, "traces.duckdb", run, score="reap", keep=0.5, out="pruned/", tokenizer=tok)
"""

from __future__ import annotations

import importlib
from typing import Any

from moelens.pruning.plan import LayerLayout, PrunePlan, plan_from_scores, random_plan

__all__ = ["LayerLayout", "PrunePlan", "evaluate_pruning", "plan_from_scores", "prune", "random_plan", "write_checkpoint"]

_LAZY = {
    "prune": "moelens.pruning.prune",
    "write_checkpoint": "moelens.pruning.checkpoint",
    "evaluate_pruning": "moelens.pruning.evaluate",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
