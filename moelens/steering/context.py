"""`steer`: apply a `SteeringSpec` to a model while a ``with`` block runs, and restore it exactly afterwards.

Mechanism: logit edits happen *inside* the router, before its own softmax/sigmoid,
grouping, top-k and renormalisation, so every architecture keeps its own routing rule. A forward pre-hook on the
router enters a `TorchFunctionMode` that adds the offset to the output of the router's logit linear op (matched
by its weight's shape, which also covers routers that cast a bf16 weight to fp32) and a forward hook leaves it.
Gate scales act on the router's decoded output (the experts module's inputs for DBRX) with hooks that run
before any capture hook, so recorded routing shows the weights the experts actually received.

All contexts on one model share one `_ModelSteering`: a stack of compiled edits whose combination is applied
whenever the stack changes. Leaving a context (also on an exception) removes its edits; leaving the last one
removes every hook, copies the saved correction biases back (bit-exact) and restores every ``top_k``.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from moelens.adapters import MoEInfo, RouterSite, find_routers, unwrap
from moelens.adapters.families import DBRX, JETMOE, LLAMA4, SWITCH
from moelens.adapters.routing import route, router_output
from moelens.steering.calibrate import calibrate_logit_std
from moelens.steering.edits import SiteEdit, check_combined, combine, compile_spec
from moelens.steering.spec import SteeringSpec


@contextlib.contextmanager
def steer(model: Any, spec: SteeringSpec | dict | str | None = None, *, calibration: Any = None,
          **kwargs: Any) -> Iterator[SteeringSpec]:
    """Steer ``model``'s routing inside the block; yields the spec in force (normalised, calibrated).

    ``spec`` is a `SteeringSpec`, its dict/JSON form, or None; keyword arguments (``disable=[(l, e)]``,
    ``force=...``, ``boost={(l, e): v}``, ``gate_scale={(l, e): beta}``, ``top_k={l: k}``, ``mode``,
    ``boost_unit``) set or override its fields. ``calibration`` (token ids ``[B, S]``) measures each layer's
    router-logit std for ``boost_unit="std"`` when the spec does not carry it yet. Works for forwards and
    ``generate``, on plain and nnsight-wrapped models, and nests (inner contexts add to outer ones).
    """
    module = unwrap(model)
    spec = SteeringSpec.build(spec, **kwargs)
    if spec.boost and spec.boost_unit == "std" and not spec.logit_std and calibration is not None:
        spec = replace(spec, logit_std=calibrate_logit_std(module, calibration))
    state = _ModelSteering.of(module)
    try:
        token = state.push(compile_spec(spec, state.info))
    except BaseException:
        state.release_if_idle()
        raise
    try:
        yield spec
    finally:
        state.pop(token)


def active_spec_count(model: Any) -> int:
    """How many `steer` contexts are active on ``model`` (0 when it runs unmodified)."""
    state = _ModelSteering.states.get(unwrap(model))
    return 0 if state is None else len(state.stack)


class _LogitOffset(TorchFunctionMode):
    """Adds ``offset`` to the first ``F.linear`` output with the router's logit-weight shape, once per router call."""

    def __init__(self, weight_shape: torch.Size, offset: torch.Tensor) -> None:
        super().__init__()
        self.weight_shape = weight_shape
        self.offset = offset
        self.done = False

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.done and func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            if weight.shape == self.weight_shape:
                self.done = True
                out = out + self.offset.to(device=out.device, dtype=out.dtype)
        return out


def _scale_router_output(family: str, output: Any, scale: torch.Tensor) -> Any:
    """The router's output with each selected expert's gate weight multiplied by ``scale[expert]``."""
    if family == LLAMA4:  # (dense scores [T, E], logits): unselected experts already score 0
        scores, logits = output
        return scores * scale.to(scores), logits
    if family == JETMOE:  # gates are sorted by expert: entry i belongs to expert repeat(arange(E), sizes)[i]
        sorted_slots, batch_index, gates, expert_size, logits = output
        sizes = torch.as_tensor(expert_size, device=gates.device)
        owner = torch.repeat_interleave(torch.arange(len(expert_size), device=gates.device), sizes)
        return sorted_slots, batch_index, gates * scale.to(gates)[owner], expert_size, logits
    if family == SWITCH:  # (one-hot dispatch [B, S, E], max prob [B, S, 1], logits); dropped rows keep theirs
        dispatch, max_prob, logits = output
        routed = dispatch.any(dim=-1, keepdim=True)
        factor = scale.to(max_prob)[dispatch.argmax(dim=-1, keepdim=True)]
        return dispatch, torch.where(routed, max_prob * factor, max_prob), logits
    logits, weights, experts, *rest = output  # standard (logits, weights, index[, extras])
    return (logits, weights * scale.to(weights)[experts], experts, *rest)


class _ModelSteering:
    """The active steering of one model: a stack of compiled edits and the hooks/tensor edits applying them."""

    states: weakref.WeakKeyDictionary[nn.Module, _ModelSteering] = weakref.WeakKeyDictionary()

    def __init__(self, model: nn.Module, info: MoEInfo) -> None:
        self.model = model
        self.info = info
        self.stack: list[tuple[object, dict[int, SiteEdit]]] = []
        self._handles: list[RemovableHandle] = []
        self._saved_bias: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._saved_top_k: list[tuple[nn.Module, int]] = []

    @classmethod
    def of(cls, model: nn.Module) -> _ModelSteering:
        state = cls.states.get(model)
        if state is None:
            state = cls.states[model] = cls(model, find_routers(model))
        return state

    def push(self, edits: dict[int, SiteEdit]) -> object:
        token = object()
        self.stack.append((token, edits))
        try:
            self._apply()
        except BaseException:
            self.pop(token)
            raise
        return token

    def pop(self, token: object) -> None:
        self.stack = [(t, e) for t, e in self.stack if t is not token]
        self._apply()
        self.release_if_idle()

    def release_if_idle(self) -> None:
        if not self.stack:
            self.states.pop(self.model, None)

    # -- applying ------------------------------------------------------------------------------------------

    def _apply(self) -> None:
        """Undo everything, then apply the combination of the stack (checked first, so a bad one changes nothing)."""
        edits = combine(e for _, e in self.stack)
        check_combined(self.info, edits)
        self._restore()
        try:
            for layer, edit in edits.items():
                self._apply_site(self.info.site(layer), edit)
        except BaseException:
            self._restore()
            raise

    def _restore(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        with torch.no_grad():
            for tensor, saved in self._saved_bias:
                tensor.copy_(saved)
        self._saved_bias.clear()
        for owner, k in self._saved_top_k:
            owner.top_k = k
        self._saved_top_k.clear()

    def _apply_site(self, site: RouterSite, edit: SiteEdit) -> None:
        router = self.model.get_submodule(site.name)
        device = site.logit_weight.device  # moved once here, not on every router call
        if edit.scale is not None:  # before the logit hooks: prepended later, leaving the logit mode runs first
            self._hook_scale(site, router, edit.scale.to(device))
        if edit.reroute() is not None:  # after the scale hook: prepended later, it re-routes before scales apply
            self._hook_reroute(site, router, edit.reroute())
        if edit.offset is not None:
            self._hook_logits(router, site.logit_weight.shape, edit.offset.to(device))
        if edit.bias is not None and site.correction_bias is not None:
            bias = site.correction_bias
            self._saved_bias.append((bias, bias.detach().clone()))
            with torch.no_grad():
                bias.add_(edit.bias.to(bias))
        if edit.top_k is not None:  # the router's own function with another k (with top_p: k_max slots)
            owner = site.top_k_owner
            self._saved_top_k.append((owner, owner.top_k))
            owner.top_k = edit.top_k

    def _hook_logits(self, router: nn.Module, weight_shape: torch.Size, offset: torch.Tensor) -> None:
        active: list[_LogitOffset] = []

        def enter(module: nn.Module, args: Any) -> None:
            mode = _LogitOffset(weight_shape, offset)
            mode.__enter__()
            active.append(mode)

        def leave(module: nn.Module, args: Any, output: Any) -> None:
            if active:
                active.pop().__exit__(None, None, None)

        self._handles.append(router.register_forward_pre_hook(enter))
        self._handles.append(router.register_forward_hook(leave, prepend=True, always_call=True))

    def _hook_scale(self, site: RouterSite, router: nn.Module, scale: torch.Tensor) -> None:
        """Scale gate weights where both the experts and any capture see them (before capture hooks: prepend)."""
        if site.family == DBRX:  # the router returns logits only; the block hands (hidden, index, weights) on

            def scale_inputs(module: nn.Module, args: tuple) -> tuple:
                hidden, experts, weights, *rest = args
                return (hidden, experts, weights * scale.to(weights)[experts], *rest)

            self._handles.append(site.experts.register_forward_pre_hook(scale_inputs, prepend=True))
            return

        def scale_output(module: nn.Module, args: Any, output: Any) -> Any:
            return _scale_router_output(site.family, output, scale)

        self._handles.append(router.register_forward_hook(scale_output, prepend=True))

    def _hook_reroute(self, site: RouterSite, router: nn.Module, how: dict) -> None:
        """Re-route every call with the router's own rule and another selection (top-p: padding slots weigh 0)."""
        bias = site.correction_bias

        def decision(logits: torch.Tensor, weights_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
            return route(logits.reshape(-1, logits.shape[-1]), site.rule, bias=bias, weight_dtype=weights_dtype, **how)

        if site.family == DBRX:  # logits come from the router; the block's top-k result reaches the experts
            seen: list[torch.Tensor] = []

            def keep_logits(module: nn.Module, args: Any, output: torch.Tensor) -> None:
                seen[:] = [output]

            def replace_inputs(module: nn.Module, args: tuple) -> tuple:
                hidden, _, weights, *rest = args
                new_weights, experts = decision(seen.pop(), weights.dtype)
                return (hidden, experts, new_weights, *rest)

            self._handles.append(router.register_forward_hook(keep_logits))
            self._handles.append(site.experts.register_forward_pre_hook(replace_inputs, prepend=True))
            return

        def reroute(module: nn.Module, args: Any, output: Any) -> Any:
            logits = output[-1] if site.family in (LLAMA4, JETMOE) else output[0]
            weights_dtype = output[{LLAMA4: 0, JETMOE: 2}.get(site.family, 1)].dtype
            weights, experts = decision(logits, weights_dtype)
            return router_output(site.family, output, weights, experts)

        self._handles.append(router.register_forward_hook(reroute, prepend=True))
