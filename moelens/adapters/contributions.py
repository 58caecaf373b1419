"""Capture how much each routed expert contributed: ‖f_j(x)‖₂ per routed slot and cos(x, x + r) per token.

Importance scores beyond frequency (REAP, arXiv 2510.13999; EAN/MAN; EASY-EP, arXiv 2504.06792) need the norm of
each selected expert's output *before* gating, and EASY-EP also the angle between the residual stream entering
the MoE block (``x``) and the stream after the routed experts are added (``x + r``; shared experts excluded).

transformers 5 fuses experts into one module called as ``experts(hidden, top_k_index, top_k_weights)`` and sums
the gated outputs inside it, so per-expert outputs are never materialised. A forward hook on that module
recomputes them from the module's own ``forward`` (the same weights and kernel) on a copy of the routed rows,
one slot per row with gate 1, and keeps only norms. ``forward`` is called directly, so no hook (ours or the
routing capture's) fires twice, and nothing the model uses is touched: outputs stay bitwise identical.
``x`` is the input of the last sibling norm called before the MoE block (the pre-FFN norm of a pre-norm layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from moelens.adapters.capture_transfer import to_host
from moelens.adapters.discovery import MoEInfo, RouterSite
from moelens.adapters.families import DBRX, LLAMA4, STANDARD, SWITCH
from moelens.errors import InputError

#: Families whose per-expert outputs moelens can recompute (JetMoE's experts are attention heads and a sorted
#: ``expert_size`` layout; its contributions are not captured).
CONTRIBUTION_FAMILIES = (STANDARD, DBRX, LLAMA4, SWITCH)


@dataclass
class ContributionCall:
    """One MoE block call: rows in the router call's order (row = b * S + s)."""

    layer: int
    weights: torch.Tensor  # [T, k] as the experts received them (only used to order slots like the routing table)
    norms: torch.Tensor  # [T, k] ‖f_j(x)‖₂ of each slot's expert, NaN where the slot has no expert (capacity drop)
    cos: torch.Tensor  # [T] cos(x, x + r)

    TENSORS: ClassVar[tuple[str, ...]] = ("weights", "norms", "cos")  # what `capture_transfer.to_host` moves


def check_supported(info: MoEInfo) -> None:
    """Refuse, in one line, models whose experts moelens cannot recompute one by one."""
    bad = [s for s in info.sites if s.family not in CONTRIBUTION_FAMILIES or s.kind == "attention"]
    if bad:
        raise InputError(
            f"expert contributions are not supported for {info.model_type!r} (router {bad[0].name!r}: its experts "
            "do not receive (hidden, top_k_index, top_k_weights)); record without --contributions"
        )


#: Copied rows per recompute call: bounds the extra memory to a few such blocks of [rows, H] activations.
SLOT_CHUNK = 16_384


def _slot_norms(experts: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``‖f_j(x)‖₂`` for every (row, slot) from the fused module's own forward: one slot per copied row, gate 1,
    in chunks of `SLOT_CHUNK` copied rows so long batches never hold all T·k expert outputs at once."""
    n, k = index.shape
    rows = hidden.reshape(n, -1).repeat_interleave(k, dim=0)
    slots, ones = index.reshape(-1, 1), torch.ones_like(weights).reshape(-1, 1)
    norms = [experts.forward(rows[i:i + SLOT_CHUNK], slots[i:i + SLOT_CHUNK], ones[i:i + SLOT_CHUNK])
             .reshape(-1, rows.shape[-1]).float().norm(dim=-1) for i in range(0, n * k, SLOT_CHUNK)]
    return torch.cat(norms).view(n, k)


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    value = args[0] if args else kwargs.get("hidden_states")
    return value if isinstance(value, torch.Tensor) else None


class ContributionCapture:
    """Context manager recording one `ContributionCall` per MoE block call; ``pop`` drains them in call order."""

    def __init__(self, model: nn.Module, info: MoEInfo) -> None:
        check_supported(info)
        self.model = model
        self.info = info
        self._calls: list[ContributionCall] = []
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> ContributionCapture:
        try:
            for site in self.info.sites:
                self._hook_site(site)
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()

    def pop(self) -> list[ContributionCall]:
        """The calls recorded since the last pop, on the CPU (one blocking transfer per device and dtype)."""
        return to_host(self.take(), non_blocking=False).wait()

    def take(self) -> list[ContributionCall]:
        """The calls recorded since the last pop, where they were computed (`RoutingCapture.pop_async` moves
        them together with the routing, without blocking)."""
        calls, self._calls = self._calls, []
        return calls

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- hooks ---------------------------------------------------------------------------------------------

    def _hook_site(self, site: RouterSite) -> None:
        block_name = site.name.rpartition(".")[0]
        block = self.model.get_submodule(block_name)
        layer_module = self.model.get_submodule(block_name.rpartition(".")[0])
        state: dict[str, Any] = {}
        self._hook_residual(site, block, layer_module, state)
        # GraniteMoE adds residual_multiplier · (MoE output) to the stream: r is what is added.
        config = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        scale = float(getattr(config, "residual_multiplier", 1.0) or 1.0)

        def finish(weights: torch.Tensor, norms: torch.Tensor, routed: torch.Tensor) -> None:
            x = state.pop("x", None)
            if x is None or x.numel() != routed.numel():
                raise RuntimeError(f"layer {site.layer}: the residual entering the MoE block was not seen")
            x = x.detach().reshape(routed.shape).float()
            cos = F.cosine_similarity(x, x + scale * routed.detach().float(), dim=-1)
            self._calls.append(ContributionCall(site.layer, weights.detach().float(), norms.detach().float(), cos))

        experts = block.experts
        self._handles.append(experts.register_forward_hook(_EXPERT_HOOKS[site.family](site, block, state, finish,
                                                                                      self._handles)))

    def _hook_residual(self, site: RouterSite, block: nn.Module, layer_module: nn.Module, state: dict) -> None:
        """Keep ``x``: DBRX's ``norm_attn_norm`` returns it; otherwise it is the pre-FFN norm's input."""
        if site.family == DBRX:
            def dbrx_hook(module: nn.Module, args: Any, output: Any) -> None:
                state["x"] = output[0]

            self._handles.append(layer_module.norm_attn_norm.register_forward_hook(dbrx_hook))
            return

        def sibling_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            state["last"] = (module, _first_tensor(args, kwargs))

        def block_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            sibling, x = state.pop("last", (None, None))
            if sibling is None or "norm" not in type(sibling).__name__.lower():
                raise RuntimeError(
                    f"layer {site.layer}: the module run before the MoE block is not a norm "
                    f"({type(sibling).__name__}); cannot locate the residual stream"
                )
            state["x"], state["u"] = x, _first_tensor(args, kwargs)

        for child in layer_module.children():
            if child is not block:
                self._handles.append(child.register_forward_pre_hook(sibling_hook, with_kwargs=True))
        self._handles.append(block.register_forward_pre_hook(block_hook, with_kwargs=True))


Finish = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


def _fused_hook(site: RouterSite, block: nn.Module, state: dict, finish: Finish, handles: list) -> Callable:
    """Standard fused experts (and DBRX): ``(hidden, top_k_index, top_k_weights)`` in, gated sum out."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        hidden, index, weights = args[:3]
        norms = _slot_norms(module, hidden, index, weights)
        finish(weights, norms, output.reshape(index.shape[0], -1))

    return hook


def _llama4_hook(site: RouterSite, block: nn.Module, state: dict, finish: Finish, handles: list) -> Callable:
    """Llama4 scales the experts' *input* by the gate and runs all E experts densely: recompute on the unscaled
    block input, then keep the selected experts exactly as the routing capture decodes them."""
    from moelens.adapters.capture import _llama4  # capture imports this module: bind at hook time

    def router_hook(module: nn.Module, args: Any, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        state["scores"], state["logits"] = output

    handles.append(block.router.register_forward_hook(router_hook))

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        u = state.pop("u").reshape(-1, output.shape[-1])
        scores, logits = state.pop("scores"), state.pop("logits")
        n_experts = scores.shape[1]
        index, weights, _ = _llama4((scores, logits), site)  # the slots exactly as the routing capture decodes them
        every = module.forward(u.repeat(n_experts, 1)).view(n_experts, u.shape[0], -1).float().norm(dim=-1)
        routed = output.view(n_experts, u.shape[0], -1).sum(dim=0)
        finish(weights, every.T.gather(1, index), routed)

    return hook


def _switch_hook(site: RouterSite, block: nn.Module, state: dict, finish: Finish, handles: list) -> Callable:
    """Switch keeps experts in a ModuleDict and passes the one-hot dispatch: run each used expert on its rows."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        hidden, dispatch, weights = args[:3]
        dispatch = dispatch.reshape(hidden.shape[0], -1)
        index = dispatch.argmax(dim=-1).masked_fill(dispatch.sum(dim=-1) == 0, -1)
        norms = torch.full((hidden.shape[0], 1), float("nan"), device=hidden.device)
        for expert in index.unique().tolist():
            if expert >= 0:
                rows = index == expert
                norms[rows, 0] = module[f"expert_{expert}"](hidden[rows]).float().norm(dim=-1)
        finish(weights.reshape(-1, 1), norms, output)

    return hook


_EXPERT_HOOKS: dict[str, Callable[..., Callable]] = {
    STANDARD: _fused_hook,
    DBRX: _fused_hook,
    LLAMA4: _llama4_hook,
    SWITCH: _switch_hook,
}


def contribution_columns(calls: list[ContributionCall], seq_id: np.ndarray, pos: np.ndarray,
                         keep: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """``expert_contributions`` and ``block_residuals`` columns, padding dropped, slots in the routing table's
    rank order (descending gate weight, stable), so ``(seq_id, pos, layer, rank)`` joins ``routing``."""
    offsets: dict[int, int] = {}
    norm_cols: dict[str, list[np.ndarray]] = {k: [] for k in ("seq_id", "pos", "layer", "rank", "norm")}
    cos_cols: dict[str, list[np.ndarray]] = {k: [] for k in ("seq_id", "pos", "layer", "cos")}
    for call in calls:
        n, k = call.norms.shape
        start = offsets.get(call.layer, 0)
        offsets[call.layer] = start + n
        sl = slice(start, start + n)
        kept = keep[sl]
        seq, p = seq_id[sl][kept], pos[sl][kept]
        weights, norms = call.weights.numpy()[kept], call.norms.numpy()[kept]
        order = np.argsort(-weights, axis=1, kind="stable")
        norms = np.take_along_axis(norms, order, axis=1)
        has = ~np.isnan(norms)
        ranks = np.broadcast_to(np.arange(k, dtype=np.uint8), norms.shape)
        norm_cols["seq_id"].append(np.repeat(seq, k)[has.reshape(-1)])
        norm_cols["pos"].append(np.repeat(p, k)[has.reshape(-1)])
        norm_cols["layer"].append(np.full(int(has.sum()), call.layer, dtype=np.int16))
        norm_cols["rank"].append(ranks[has])
        norm_cols["norm"].append(norms[has].astype(np.float32))
        cos_cols["seq_id"].append(seq)
        cos_cols["pos"].append(p)
        cos_cols["layer"].append(np.full(len(seq), call.layer, dtype=np.int16))
        cos_cols["cos"].append(call.cos.numpy()[kept].astype(np.float32))
    if not calls:
        return {}
    return {
        "expert_contributions": {name: np.concatenate(parts) for name, parts in norm_cols.items()},
        "block_residuals": {name: np.concatenate(parts) for name, parts in cos_cols.items()},
    }
