"""The torch module behind a wrapped model (nnsight's ``NNsight(model)``, ``LanguageModel``, ...).

nnsight runs the wrapped torch module itself, and plain torch hooks on that module keep firing inside its
``trace`` and ``generate`` contexts. So moelens applies the very same hooks to the wrapped module: steering and
recording through nnsight are the hook path, not a second implementation that could drift from it. Every
public entry point that takes a model (``record``, ``steer``, ``run_experiment``, ``calibrate_logit_std``,
``expert_layout``) calls `unwrap` once, where the model enters; everything below works on the torch module.
nnsight patches globals when imported, so it is imported only for objects whose class comes from nnsight.
"""

from __future__ import annotations

from typing import Any

from moelens.errors import InputError


def unwrap(model: Any) -> Any:
    """The torch module an nnsight envoy wraps; any other model is returned as it is."""
    if not type(model).__module__.startswith("nnsight"):  # decided without importing nnsight
        return model
    from nnsight.intervention.envoy import Envoy

    if not isinstance(model, Envoy):
        raise InputError(f"{type(model).__name__} is an nnsight object but not a wrapped model (Envoy)")
    return model._module
