"""Capture the routing each router actually used, with read-only forward hooks.

The hooks decode the router's own output with a few tensor ops and keep detached
copies; they never recompute top-k from logits (DeepSeek-V3 biases, Switch capacity drops and ties make that
wrong) and never change a tensor the model uses, so outputs are bitwise identical with and without capture.
Copies stay on the model's device until ``pop`` so that a GPU forward is not synchronised once per layer;
``pop_async`` moves them with one copy per device and dtype, on a side stream into pinned memory on CUDA
(`moelens.adapters.capture_transfer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from moelens.adapters.capture_transfer import Pending, to_host
from moelens.adapters.contributions import ContributionCall, ContributionCapture, contribution_columns
from moelens.adapters.discovery import MoEInfo, RouterSite, find_routers
from moelens.adapters.families import DBRX, JETMOE, LLAMA4, STANDARD, SWITCH

Decoded = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (experts [T, k], weights [T, k], logits [T, E])


@dataclass
class RouterCall:
    """One router call, decoded. Rows are the call's tokens in row-major order (row = b * S + s)."""

    layer: int
    experts: torch.Tensor
    weights: torch.Tensor
    logits: torch.Tensor | None = None
    shared_gate: torch.Tensor | None = None

    TENSORS: ClassVar[tuple[str, ...]] = ("experts", "weights", "logits", "shared_gate")


class PendingCalls:
    """Router calls (and, when captured, contribution calls) of the last forward(s) on their way to the host, all
    in one `moelens.adapters.capture_transfer.to_host` transfer per device and dtype. On CUDA the copies run on a
    side stream, ordered after the forward that produced them, so the caller can start the next forward at once
    and build columns from these later (for example on a writer thread)."""

    def __init__(self, calls: list[RouterCall], contributions: list[ContributionCall] | None, pending: Pending) -> None:
        self._calls = calls
        self._contributions = contributions
        self._pending = pending

    def wait(self) -> list[RouterCall]:
        self._pending.wait()
        return self._calls

    def wait_contributions(self) -> list[ContributionCall] | None:
        """The contribution calls, on the CPU (None when the capture keeps none)."""
        self._pending.wait()
        return self._contributions


def _standard(out: tuple[torch.Tensor, ...], site: RouterSite) -> Decoded:
    """``(logits, weights, index)``; Inkling/Zaya append extra outputs. Flattened in case a router keeps [B, S]."""
    logits, weights, experts = out[:3]
    k = experts.shape[-1]
    return experts.reshape(-1, k), weights.reshape(-1, k), logits.reshape(-1, logits.shape[-1])


def _llama4(out: tuple[torch.Tensor, torch.Tensor], site: RouterSite) -> Decoded:
    """Dense sigmoid scores, > 0 exactly for the selected experts: their top-k are the slots.

    k is read from the router at call time (a steering context may change it); a slot whose expert got score 0
    received a zero input, so it is marked as padding (`moelens.adapters.routing.padding_slots`), not as routed.
    """
    scores, logits = out
    experts = torch.topk(scores, site.module.top_k, dim=1).indices
    weights = scores.gather(1, experts)
    unrouted = weights == 0
    unrouted[:, 0] = False
    return torch.where(unrouted, experts[:, :1], experts), weights, logits


def _jetmoe(out: tuple[Any, ...], site: RouterSite) -> Decoded:
    """Undo JetMoE's sort by expert: sorted entry i holds flat slot ``sorted_slots[i]`` (token = slot // k)."""
    sorted_slots, _, gates, expert_size, logits = out
    sizes = torch.as_tensor(expert_size, device=sorted_slots.device)
    # Expert e repeated expert_size[e] times; output_size spares a device sync to learn the length (T * k).
    sorted_ids = torch.repeat_interleave(sizes, output_size=len(sorted_slots))
    experts = torch.empty_like(sorted_slots).scatter_(0, sorted_slots, sorted_ids)
    weights = torch.empty_like(gates).scatter_(0, sorted_slots, gates)
    n_tokens = logits.shape[0]
    return experts.view(n_tokens, -1), weights.view(n_tokens, -1), logits


def _switch(out: tuple[torch.Tensor, torch.Tensor, torch.Tensor], site: RouterSite) -> Decoded:
    """One-hot dispatch [B, S, E] after capacity: its argmax, and -1 where the row is empty (dropped token)."""
    dispatch, max_prob, logits = out
    n_experts = dispatch.shape[-1]
    dispatch = dispatch.reshape(-1, n_experts)
    experts = dispatch.argmax(dim=-1, keepdim=True).masked_fill_(dispatch.sum(dim=-1, keepdim=True) == 0, -1)
    return experts, max_prob.reshape(-1, 1), logits.reshape(-1, n_experts)


_DECODERS: dict[str, Callable[[Any, RouterSite], Decoded]] = {
    STANDARD: _standard,
    LLAMA4: _llama4,
    JETMOE: _jetmoe,
    SWITCH: _switch,
}


def _keep(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A detached copy (never a view: the model may later write into its own tensor in place)."""
    return t.detach().to(dtype=dtype, copy=True)


class _Pairing:
    """Joins a router call with a value produced by another module of the same block, in either order.

    Used for Qwen2-MoE's ``shared_expert_gate`` (runs after the router) and DBRX's logits (the router runs before
    the experts pre-hook that carries the decision).
    """

    def __init__(self, attr: str) -> None:
        self.attr = attr
        self.call: RouterCall | None = None
        self.value: torch.Tensor | None = None

    def give_call(self, call: RouterCall) -> None:
        if self.value is not None:
            setattr(call, self.attr, self.value)
            self.value = None
        else:
            self.call = call

    def give_value(self, value: torch.Tensor) -> None:
        if self.call is not None:
            setattr(self.call, self.attr, value)
            self.call = None
        else:
            self.value = value


class RoutingCapture:
    """Context manager recording every router call of ``model`` while active; ``pop`` drains them in call order.

    ``logits=True`` also keeps the [T, E] pre-softmax logits (off by default: they cost E floats per token).
    Hooks are always removed on exit, also when the forward raised.
    """

    def __init__(self, model: nn.Module, info: MoEInfo | None = None, *, logits: bool = False,
                 contributions: bool = False) -> None:
        self.model = model
        self.info = info if info is not None else find_routers(model)
        self.logits = logits
        self.contributions = ContributionCapture(model, self.info) if contributions else None
        self._calls: list[RouterCall] = []
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> RoutingCapture:
        try:
            for site in self.info.sites:
                self._hook_site(site)
            if self.contributions is not None:
                self.contributions.__enter__()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()
        if self.contributions is not None:
            self.contributions.__exit__()

    def contribution_columns(self, rows: Any) -> dict[str, dict]:
        """``expert_contributions`` / ``block_residuals`` columns for the rows of ``rows`` (a RowMap); {} when off."""
        if self.contributions is None:
            return {}
        return contribution_columns(self.contributions.pop(), rows.seq_id, rows.pos, rows.keep)

    def pop(self) -> list[RouterCall]:
        """The router calls recorded since the last pop, in call order, on the CPU (contributions stay for
        ``contributions.pop``)."""
        calls, self._calls = self._calls, []
        return to_host(calls, non_blocking=False).wait()

    def pop_async(self, *, non_blocking: bool = True) -> PendingCalls:
        """The router calls and contribution calls recorded since the last pop, with one host transfer per
        device and dtype for all of them started (asynchronous on CUDA)."""
        calls, self._calls = self._calls, []
        contributions = self.contributions.take() if self.contributions is not None else None
        return PendingCalls(calls, contributions, to_host([*calls, *(contributions or [])], non_blocking=non_blocking))

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _record(
        self, site: RouterSite, experts: torch.Tensor, weights: torch.Tensor, logits: torch.Tensor | None
    ) -> RouterCall:
        # Always-on shared experts get gate 1.0; a gated one (Qwen2-MoE) is filled in by its gate's hook.
        always_on = site.has_shared_expert and site.shared_gate is None
        shared = torch.ones(experts.shape[0], device=experts.device) if always_on else None
        call = RouterCall(
            layer=site.layer,
            experts=_keep(experts, torch.int64),
            weights=_keep(weights, torch.float32),
            logits=_keep(logits, torch.float32) if self.logits and logits is not None else None,
            shared_gate=shared,
        )
        self._calls.append(call)
        return call

    def _hook_site(self, site: RouterSite) -> None:
        gate_pairing = _Pairing("shared_gate") if site.shared_gate is not None else None

        def on_call(call: RouterCall) -> None:
            if gate_pairing is not None:
                gate_pairing.give_call(call)

        if site.family == DBRX:
            self._hook_dbrx(site, on_call)
        else:
            decode = _DECODERS[site.family]

            def router_hook(module: nn.Module, args: Any, output: Any) -> None:
                on_call(self._record(site, *decode(output, site)))

            self._handles.append(site.module.register_forward_hook(router_hook))

        if gate_pairing is not None:

            def gate_hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
                # The block applies sigmoid(gate(h)) in the model dtype; keep that value, as float32.
                gate_pairing.give_value(torch.sigmoid(output.detach()).reshape(-1).float())

            self._handles.append(site.shared_gate.register_forward_hook(gate_hook))

    def _hook_dbrx(self, site: RouterSite, on_call: Callable[[RouterCall], None]) -> None:
        """DBRX's router returns logits only; the decision is what the experts module receives."""
        logits_pairing = _Pairing("logits") if self.logits else None

        def experts_pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            call = self._record(site, args[1], args[2], None)
            if logits_pairing is not None:
                logits_pairing.give_call(call)
            on_call(call)

        self._handles.append(site.module.register_forward_pre_hook(experts_pre_hook))
        if logits_pairing is not None:

            def router_hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
                logits_pairing.give_value(_keep(output, torch.float32))

            self._handles.append(self.model.get_submodule(site.name).register_forward_hook(router_hook))
