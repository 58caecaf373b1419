"""`prune()`: score a recorded run, choose the experts to keep, optionally write the pruned checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moelens.adapters import find_routers
from moelens.analysis.registry import SCORES, run_score
from moelens.errors import InputError
from moelens.pruning.checkpoint import model_layout, write_checkpoint
from moelens.pruning.plan import PrunePlan, plan_from_scores
from moelens.recording.record import run_fields
from moelens.store import TraceStore

#: Scores a pruning may rank by (higher = more important).
PRUNE_SCORES = ("reap", "ean", "man", "frequency", "easy_ep", "esft")


def check_run_matches(store: TraceStore, run: int, model: Any) -> None:
    """Refuse scores recorded from another model: model type, expert layout and revision (the commit hash, or
    a hash of the router weights) must match this model's."""
    recorded = store.run(run)
    info = find_routers(model)
    here = run_fields(model, info)
    for field in ("model_type", "revision", "n_experts", "top_k"):
        if recorded.get(field) != here[field]:
            raise InputError(
                f"run {run} was recorded from {recorded['model']!r} ({field} {recorded.get(field)!r}), not from this "
                f"model ({field} {here[field]!r}); record a run of this model with --contributions first")


def prune(model: Any, store: TraceStore | str | Path, run: int, *, score: str = "reap", keep: float = 0.5,
          per_layer: bool = False, out: str | Path | None = None, tokenizer: Any = None,
          score_params: dict | None = None) -> PrunePlan:
    """Rank experts by ``score`` on ``run`` (recorded from this ``model``), keep the best ``keep`` fraction
    (same count per layer, or ``per_layer`` counts) and, with ``out``, write the pruned Hugging Face folder.

    The plan's ``removed`` pairs are the ``disable=`` list of the equivalent steering, so an unsaved plan can be
    evaluated on the original model with ``moelens.steer(model, disable=plan.removed)``.
    """
    if score not in PRUNE_SCORES:
        raise InputError(f"score must be one of {PRUNE_SCORES}, not {score!r}")
    store = store if isinstance(store, TraceStore) else TraceStore(store, read_only=True)
    check_run_matches(store, run, model)
    scores = run_score(store, run, score, **(score_params or {}))
    plan = plan_from_scores(scores, model_layout(model), keep, per_layer=per_layer)
    if out is not None:
        write_checkpoint(model, plan, out, tokenizer=tokenizer,
                         provenance={"run": run, "store": str(store.path), "keep": keep, "per_layer": per_layer,
                                     "score_params": score_params or {}, "reference": SCORES[score].reference})
    return plan
