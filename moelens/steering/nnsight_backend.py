"""nnsight support: steer and record a model wrapped by nnsight (``NNsight(model)``, ``LanguageModel``, ...).

nnsight runs the wrapped torch module itself, and plain torch hooks on that module keep firing inside its
``trace`` and ``generate`` contexts (transformers-moe.md §9). So moelens applies the very same hooks to the
wrapped module: steering and recording through nnsight are the hook path, not a second implementation that
could drift from it. nnsight patches globals when imported, so it is imported only for objects whose class
comes from nnsight.
"""

from __future__ import annotations

from typing import Any

from moelens.errors import SteeringError


def is_nnsight(model: Any) -> bool:
    """Whether ``model`` is an nnsight object (decided without importing nnsight)."""
    return type(model).__module__.startswith("nnsight")


def unwrap(model: Any) -> Any:
    """The torch module an nnsight envoy wraps; any other model is returned as it is."""
    if not is_nnsight(model):
        return model
    from nnsight.intervention.envoy import Envoy

    if not isinstance(model, Envoy):
        raise SteeringError(f"{type(model).__name__} is an nnsight object but not a wrapped model (Envoy)")
    return model._module
