"""moelens: record, store, analyse and steer the routing of Mixture-of-Experts language models.

Importing ``moelens`` is cheap and never imports torch: the store, the analyses and the app work on a
machine without a model. ``load``, ``record`` and ``steer`` import torch/transformers on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from moelens.store import TraceStore  # noqa: E402  (no torch on this path)
from moelens.threads import set_threads  # noqa: E402  (imports torch only when called)

__all__ = ["TraceStore", "__version__", "analysis", "demo", "load", "prune", "pruning", "record", "set_threads", "steer", "steering", "viz"]


def load(name_or_path: str, **kwargs: Any):
    """Load a transformers MoE model and its tokenizer: ``load(name_or_path, dtype=..., device_map=..., **kwargs)``.

    ``dtype`` takes a ``torch.dtype`` or ``"auto"``/``"bf16"``/``"fp16"``/``"fp32"`` (and the long names),
    ``device_map`` what transformers takes; other keyword arguments (``revision``, ``attn_implementation``, ...)
    go to ``from_pretrained``. Weights come only from safetensors, ``trust_remote_code`` stays off unless asked,
    and a checkpoint whose router weights are missing is refused unless ``allow_missing_router_weights=True``.
    """
    from moelens.recording.loading import load_model

    return load_model(name_or_path, **kwargs)


def record(model: Any, tokenizer: Any, inputs: Any, **kwargs: Any):
    """Record the routing of ``model`` over ``inputs`` into a trace store; returns the run id."""
    from moelens.recording.record import record as _record
    from moelens.threads import apply_thread_policy

    apply_thread_policy()
    return _record(model, tokenizer, inputs, **kwargs)


def steer(model: Any, spec: Any = None, **kwargs: Any):
    """Context manager that disables/forces/boosts/scales experts while it is active."""
    from moelens.steering import steer as _steer
    from moelens.threads import apply_thread_policy

    apply_thread_policy()
    return _steer(model, spec, **kwargs)


def prune(model: Any, store: Any, run: int, **kwargs: Any):
    """Choose experts to keep by an importance score of a recorded run; with ``out=`` write the pruned checkpoint."""
    from moelens.pruning.prune import prune as _prune

    return _prune(model, store, run, **kwargs)


#: Sub-packages loaded on first attribute access (``ml.viz``, ``ml.steering``, ...), so ``import moelens`` stays light.
_LAZY = ("analysis", "viz", "steering", "demo", "recording", "adapters", "pruning")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"moelens.{name}")
    raise AttributeError(f"module 'moelens' has no attribute {name!r}")
