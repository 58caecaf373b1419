"""Turn a `SteeringSpec` into per-router edit tensors for one model, and check it against that model.

The edits are architecture-independent vectors over a router's experts:

* ``offset`` — added to the router's logits before its own top-k: -inf disables (reroute), +1e4 forces (+inf
  would give NaN in softmax routers), boosts add their value (times the layer's logit std in ``std`` units);
* ``bias`` — added to a DeepSeek-V3-family ``e_score_correction_bias``: selection there uses ``score + bias``,
  so a -inf logit alone leaves a large-bias expert selected with weight 0; -inf / +1e4 like ``offset``;
* ``scale`` — multiplies the gate weights at the experts' inputs (gate_scale β, and 0 for ``mode="zero"``);
* ``top_k`` — the router's experts per token (its own routing function with another k);
* ``top_p`` / ``k_max`` — dynamic routing: the router's rule with a per-token set size (`moelens.adapters.routing`);
* ``only_rank`` — the router's rule with one expert per token, the one it ranks r-th.

Nested `steer` contexts combine their edits (`combine`): offsets and biases add (so -inf wins over a force),
scales multiply, the innermost experts-per-token setting (``top_k`` or ``top_p``) wins. Checks that depend on the combination (how many experts are
forced, whether a layer keeps an expert) run on the combined edits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from moelens.adapters import MoEInfo, RouterSite
from moelens.errors import SteeringError
from moelens.steering.spec import SteeringSpec

#: Logit (and bias) offset that puts an expert into every token's top-k without overflowing softmax.
FORCE = 1e4


@dataclass
class SiteEdit:
    """The edit of one router site; ``None`` means "leave this part alone" (and installs no hook for it)."""

    offset: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    top_k: int | None = None
    top_p: float | None = None  #: with top_p, ``top_k`` holds k_max (the slots every token's routing fills)
    only_rank: int | None = None  #: with only_rank, ``top_k`` is 1

    def reroute(self) -> dict | None:
        """Keyword arguments of `moelens.adapters.routing.route` when the router's decision is recomputed."""
        if self.top_p is not None:
            return {"top_p": self.top_p, "k_max": self.top_k}
        if self.only_rank is not None:
            return {"only_rank": self.only_rank}
        return None


def compile_spec(spec: SteeringSpec, info: MoEInfo) -> dict[int, SiteEdit]:
    """Per-layer edits of ``spec`` for the model described by ``info``; raises `SteeringError` for ids it lacks."""
    std = dict(spec.logit_std)
    edits: dict[int, SiteEdit] = {}

    def edit(layer: int, expert: int) -> tuple[RouterSite, SiteEdit]:
        site = _site(info, layer)
        if not 0 <= expert < site.n_experts:
            raise SteeringError(f"layer {layer} has experts 0..{site.n_experts - 1}; there is no expert {expert}")
        return site, edits.setdefault(layer, SiteEdit())

    def offset(site: RouterSite, e: SiteEdit, expert: int, value: float, *, bias: bool = False) -> None:
        """Logit offset; ``bias`` also moves a correction bias (disable and force must win selection there)."""
        if e.offset is None:  # as long as the logit op's output (routers with extra columns keep them at 0)
            e.offset = torch.zeros(site.logit_weight.shape[0])
        e.offset[expert] += value
        if bias and site.correction_bias is not None:
            if e.bias is None:
                e.bias = torch.zeros(site.n_experts)
            e.bias[expert] += value

    def scale(site: RouterSite, e: SiteEdit, expert: int, factor: float) -> None:
        if e.scale is None:
            e.scale = torch.ones(site.n_experts)
        e.scale[expert] *= factor

    for layer, expert in spec.disable:
        site, e = edit(layer, expert)
        if spec.mode == "zero":
            scale(site, e, expert, 0.0)
        else:
            offset(site, e, expert, -math.inf, bias=True)
    for layer, expert in spec.force:
        offset(*edit(layer, expert), expert, FORCE, bias=True)
    for (layer, expert), value in spec.boost:
        if spec.boost_unit == "std":
            if layer not in std:
                raise SteeringError(
                    f"boost_unit='std' needs the router-logit std of layer {layer}; calibrate first "
                    "(moelens.steering.calibrate_logit_std, or steer(..., calibration=input_ids))"
                )
            value *= std[layer]
        offset(*edit(layer, expert), expert, value)
    for (layer, expert), beta in spec.gate_scale:
        scale(*edit(layer, expert), expert, beta)
    for layer in {layer for layer, _ in (*spec.top_k, *spec.top_p, *spec.k_max, *spec.only_rank)} - {-1}:
        _site(info, layer)  # a per-layer value for a layer without a router
    explicit = {layer for layer, _ in (*spec.top_k, *spec.top_p, *spec.only_rank)}
    for site in info.sites:
        count = spec.experts_per_token(site.layer)
        if count is None or (site.fixed_k and site.layer not in explicit):
            continue  # an every-layer value skips routers whose k is fixed by construction
        how, value, k_max = count
        e = edits.setdefault(site.layer, SiteEdit())
        if how == "k":
            e.top_k = check_top_k(site, int(value))
        elif how == "p":
            e.top_k, e.top_p = check_rerouting(site, "top_p", k_max), float(value)
        else:
            check_rerouting(site, "only_rank", int(value))
            e.top_k, e.only_rank = 1, int(value)
    if (spec.top_k or spec.top_p or spec.only_rank) and not any(e.top_k for e in edits.values()):
        why = "; ".join(sorted({site.fixed_k for site in info.sites if site.fixed_k}))
        raise SteeringError(f"cannot change the experts per token of any layer of this model: {why}")
    return edits


def combine(stack: Iterable[dict[int, SiteEdit]]) -> dict[int, SiteEdit]:
    """The edits of nested contexts, outermost first, as one edit per layer."""
    out: dict[int, SiteEdit] = {}
    for edits in stack:
        for layer, e in edits.items():
            c = out.setdefault(layer, SiteEdit())
            c.offset = _join(c.offset, e.offset, torch.add)
            c.bias = _join(c.bias, e.bias, torch.add)
            c.scale = _join(c.scale, e.scale, torch.mul)
            if e.top_k is not None:
                c.top_k, c.top_p, c.only_rank = e.top_k, e.top_p, e.only_rank
    return out


def check_combined(info: MoEInfo, edits: dict[int, SiteEdit]) -> None:
    """Checks that need every active edit: forced experts fit in k, and every layer keeps an expert."""
    for layer, e in edits.items():
        site = info.site(layer)
        k = e.top_k if e.top_k is not None else site.top_k
        if e.offset is not None:
            offset = e.offset[: site.n_experts]
            n_forced = int((offset >= FORCE / 2).sum())
            if n_forced > k:
                raise SteeringError(f"layer {layer} routes {k} experts per token; cannot force {n_forced}")
            if bool(torch.isneginf(offset).all()):
                raise SteeringError(f"every expert of layer {layer} would be disabled; keep at least one")


def check_top_k(site: RouterSite, k: int) -> int:
    """``k`` if this router's number of experts per token can change and ``1 <= k <= E``."""
    if site.fixed_k or site.top_k_owner is None:
        why = site.fixed_k or f"its router {type(site.module).__name__} has no top_k moelens can set"
        raise SteeringError(f"cannot change top_k of layer {site.layer}: {why}")
    if not 1 <= k <= site.n_experts:
        raise SteeringError(f"top_k of layer {site.layer} must be between 1 and {site.n_experts}, got {k}")
    return k


def check_rerouting(site: RouterSite, what: str, k: int | None) -> int:
    """``k`` (default E, at most E) if moelens can re-run this router's rule with another selection."""
    if site.fixed_k or site.rule is None:
        why = site.fixed_k or "moelens has no re-implementation of its routing function"
        raise SteeringError(f"cannot route layer {site.layer} with {what}: {why}")
    if what == "only_rank":
        return check_top_k(site, k)
    return check_top_k(site, site.n_experts if k is None else min(k, site.n_experts))


def _join(a: torch.Tensor | None, b: torch.Tensor | None, op) -> torch.Tensor | None:
    if a is None or b is None:
        return b if a is None else a
    return op(a, b)


def _site(info: MoEInfo, layer: int) -> RouterSite:
    try:
        return info.site(layer)
    except KeyError:
        raise SteeringError(f"layer {layer} has no MoE router in this model; MoE layers are {info.layers}") from None
