"""Steering: change which experts a MoE model routes to (disable, force, boost, gate-scale, top-k, top-p, one
ranked expert), measure it, and decode with SCMoE self-contrast (`contrastive_generate`).

``SteeringSpec`` and the spec builders are plain data and import no torch (the app reads specs stored with runs);
``steer``, ``calibrate_logit_std`` and ``run_experiment`` load torch on first use.

    with moelens.steer(model, disable=[(1, 3)], boost={(2, 5): 1.5}):
        out = model.generate(...)
"""

from __future__ import annotations

import importlib
from typing import Any

from moelens.steering.select import random_like, random_spec, spec_from_scores
from moelens.steering.spec import SteeringSpec, parse_pair, parse_pair_value

__all__ = [
    "ExperimentResult",
    "SteeringSpec",
    "calibrate_logit_std",
    "contrastive_generate",
    "parse_pair",
    "parse_pair_value",
    "random_like",
    "random_spec",
    "run_experiment",
    "spec_from_scores",
    "steer",
    "sweep_routing",
]

_LAZY = {
    "steer": "moelens.steering.context",
    "calibrate_logit_std": "moelens.steering.calibrate",
    "contrastive_generate": "moelens.steering.contrastive",
    "run_experiment": "moelens.steering.experiment",
    "ExperimentResult": "moelens.steering.experiment",
    "sweep_routing": "moelens.steering.sweep",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
