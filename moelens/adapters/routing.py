"""Each architecture's own routing function, re-implemented with a free number of experts per token.

Steering needs two things the models do not offer: a top-k with another k where k is fixed by construction, and
dynamic top-p routing (Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models",
arXiv:2403.07652), where each token takes the smallest set of experts whose router probability mass reaches p.
`route` applies a router's rule — scores (softmax, sigmoid + correction bias, raw logits), group limits, and the
weights exactly as the model normalises them — to a chosen set size. `RoutingRule` is read once per router from the
router's own attributes (falling back to the config), so a checkpoint's ``norm_topk_prob`` or scaling is honoured.

Variable set sizes travel through the fixed ``[T, k_max]`` layout the experts modules take: a slot beyond a token's
chosen count repeats the token's first expert with weight exactly 0 (`padding_slots`). Such a slot adds nothing to
the output (0 x expert output) and is never stored as routing; no model's own top-k returns a repeated expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moelens.adapters.families import DBRX, JETMOE, LLAMA4, SWITCH

#: Kinds of scoring the re-implementations know (what ranks the experts and what their weights are).
SOFTMAX, SIGMOID_BIAS, SOFTMAX_BIAS, TOPK_SOFTMAX, TOPK_SIGMOID, PNORM = (
    "softmax", "sigmoid+bias", "softmax+bias", "top-k then softmax", "top-k then sigmoid", "softmax then p-norm")

_SOFTMAX_TYPES = {"mixtral", "qwen2_moe", "qwen3_moe", "qwen3_next", "olmoe", "deepseek_v2", "flex_olmo"}
_SIGMOID_TYPES = {"deepseek_v3", "glm4_moe", "glm4_moe_lite", "dots1", "deepseek_v32"}
_TOPK_SOFTMAX_TYPES = {"gpt_oss", "granitemoe", "granitemoeshared", "granitemoe_swa", "jetmoe"}


@dataclass(frozen=True)
class RoutingRule:
    """How one router turns logits into ``(weights, experts)``; ``kind`` is one of the module constants."""

    kind: str
    renormalise: bool = False  #: divide the selected weights by their sum (Mixtral always; Qwen if norm_topk_prob)
    scale: float = 1.0  #: routed_scaling_factor (DeepSeek, GLM)
    n_group: int = 1  #: group-limited routing: contiguous groups of E / n_group experts ...
    topk_group: int = 1  #: ... of which the best topk_group stay candidates
    group_score: str = "max"  #: DeepSeek-V2: max prob in a group; V3 family: sum of the top-2 biased scores
    norm_min: float = 0.0  #: Ernie 4.5: weights / max(sum, norm_min)
    p_norm: float | None = None  #: DBRX: weights / ||weights||_p (None = not normalised)
    weight_dtype: str = "float32"  #: "float32" | "logits" (cast back to the logits' dtype, Qwen) | "kept"


def fixed_top_k_reason(model_type: str, family: str, kind: str) -> str | None:
    """Why this router's number of experts per token cannot change, or None when it can."""
    if model_type == "phimoe":
        return "PhiMoE's sparsemixer selects exactly 2 experts by construction"
    if family == SWITCH:
        return "Switch Transformers routes each token to one expert under a per-expert capacity"
    if family == JETMOE and kind == "attention":
        return "JetMoE's attention experts are its attention heads (heads = k x kv heads)"
    return None


def routing_rule(model_type: str, router: Any, block: Any, config: Any, family: str, kind: str) -> RoutingRule | None:
    """The rule of one router, or None when moelens has no re-implementation of it (top-p then refuses)."""
    def attr(name: str, default: Any) -> Any:
        for owner in (router, block, config):
            value = getattr(owner, name, None)
            if value is not None:
                return value
        return default

    if fixed_top_k_reason(model_type, family, kind):
        return None
    if family == LLAMA4:
        return RoutingRule(TOPK_SIGMOID, weight_dtype="kept")
    if family == DBRX:
        return RoutingRule(PNORM, p_norm=config.ffn_config.moe_normalize_expert_weights, weight_dtype="logits")
    if model_type in _TOPK_SOFTMAX_TYPES:
        return RoutingRule(TOPK_SOFTMAX, weight_dtype="kept")
    if model_type == "ernie4_5_moe":
        return RoutingRule(SOFTMAX_BIAS, renormalise=True, norm_min=float(attr("norm_min", 1e-12)), weight_dtype="kept")
    if model_type in _SIGMOID_TYPES:
        n_group = int(attr("num_group", None) or attr("n_group", 1))
        return RoutingRule(SIGMOID_BIAS, renormalise=bool(attr("norm_topk_prob", False)),
                           scale=float(attr("routed_scaling_factor", 1.0)), n_group=n_group,
                           topk_group=int(attr("topk_group", n_group)), group_score="top2")
    if model_type in _SOFTMAX_TYPES:
        if model_type == "deepseek_v2":
            grouped = attr("topk_method", "greedy") == "group_limited_greedy"
            n_group = int(attr("num_group", None) or attr("n_group", 1)) if grouped else 1
            return RoutingRule(SOFTMAX, scale=float(attr("routed_scaling_factor", 1.0)), n_group=n_group,
                               topk_group=int(attr("topk_group", n_group)) if grouped else 1)
        renorm = model_type == "mixtral" or bool(attr("norm_topk_prob", False))
        return RoutingRule(SOFTMAX, renormalise=renorm, weight_dtype="float32" if model_type == "mixtral" else "logits")
    return None


def _group_candidates(scores: torch.Tensor, rule: RoutingRule) -> torch.Tensor:
    """bool[T, E]: experts in the token's ``topk_group`` best groups (all True without groups)."""
    if rule.n_group <= 1:
        return torch.ones_like(scores, dtype=torch.bool)
    n_tokens, n_experts = scores.shape
    grouped = scores.view(n_tokens, rule.n_group, n_experts // rule.n_group)
    group_scores = grouped.max(dim=-1).values if rule.group_score == "max" else grouped.topk(2, dim=-1)[0].sum(dim=-1)
    best = torch.topk(group_scores, k=rule.topk_group, dim=-1, sorted=False)[1]
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    return mask.unsqueeze(-1).expand(-1, -1, n_experts // rule.n_group).reshape(n_tokens, n_experts)


def _scores(logits: torch.Tensor, rule: RoutingRule,
            bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(choice, value, mass, candidates)``, all [T, E]: what ranks the experts, what their weights are made of,
    the distribution top-p accumulates (summing to 1 over the candidates), and which experts group limits allow."""
    z = logits.float()
    bias = None if bias is None else bias.reshape(-1).to(z)
    if rule.kind in (TOPK_SOFTMAX, TOPK_SIGMOID):
        return z, z, torch.softmax(z, dim=-1), torch.ones_like(z, dtype=torch.bool)
    if rule.kind == SIGMOID_BIAS:
        value = z.sigmoid()
        choice = value + bias if bias is not None else value
        candidates = _group_candidates(choice, rule)
        mass = value.masked_fill(~candidates, 0.0)
        return choice.masked_fill(~candidates, float("-inf")), value, mass / mass.sum(-1, keepdim=True), candidates
    if rule.kind == PNORM:  # DBRX's softmax runs in the logits' dtype
        probs = torch.softmax(logits, dim=-1, dtype=logits.dtype)
    else:
        probs = torch.softmax(z, dim=-1, dtype=torch.float)
    if rule.kind == SOFTMAX_BIAS:
        return probs + bias if bias is not None else probs, probs, probs.float(), torch.ones_like(z, dtype=torch.bool)
    candidates = _group_candidates(probs, rule)
    probs = probs.masked_fill(~candidates, 0.0)
    return probs, probs, probs.float() / probs.float().sum(-1, keepdim=True), candidates


def route(logits: torch.Tensor, rule: RoutingRule, *, k: int | None = None, top_p: float | None = None,
          k_max: int | None = None, only_rank: int | None = None, bias: torch.Tensor | None = None,
          weight_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [T, n], experts [T, n])`` of ``rule`` applied to router ``logits`` [T, E].

    One of ``k`` (top-k, ``n = k``); ``top_p`` (``n = k_max``, default E): each token keeps the smallest prefix of
    its experts, in the rule's own selection order, whose ``mass`` reaches ``top_p``, slots beyond it are padding
    (`padding_slots`); ``only_rank`` (``n = 1``): the expert ranked r-th (1 = first), weighted as a one-expert
    selection. ``bias`` is the router's ``e_score_correction_bias``; ``weight_dtype`` the dtype the model's own
    weights have (the rule says whether it casts).
    """
    choice, value, mass, candidates = _scores(logits, rule, bias)
    n_experts = logits.shape[-1]
    width = k if top_p is None else min(k_max or n_experts, n_experts)
    if only_rank is not None:
        width = only_rank
    order = torch.topk(choice, k=width, dim=-1).indices  # descending; ties as the models' own topk breaks them
    if only_rank is not None:
        order = order[:, -1:]
    if top_p is None:
        chosen = torch.ones_like(order, dtype=torch.bool)
    else:
        ranked = mass.gather(1, order)
        chosen = ranked.cumsum(-1) - ranked < top_p if top_p < 1.0 else torch.ones_like(order, dtype=torch.bool)
        chosen[:, 0] = True  # mass of the experts ranked above is 0 < p
        chosen &= candidates.gather(1, order)  # never an expert outside the token's groups
    weights = _weights(rule, value.gather(1, order), chosen)
    if rule.weight_dtype == "logits" or (rule.weight_dtype == "kept" and weight_dtype is not None):
        weights = weights.to(logits.dtype if rule.weight_dtype == "logits" else weight_dtype)
    experts = torch.where(chosen, order, order[:, :1])
    return weights.masked_fill(~chosen, 0.0), experts


def _weights(rule: RoutingRule, value: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The selected experts' weights, normalised over the chosen ones exactly as the model does."""
    if rule.kind == TOPK_SOFTMAX:
        return torch.softmax(value.masked_fill(~chosen, float("-inf")), dim=-1)
    if rule.kind == TOPK_SIGMOID:
        return value.sigmoid()
    kept = value.masked_fill(~chosen, 0.0)
    if rule.kind == PNORM:
        return kept if rule.p_norm is None else kept / torch.norm(kept, p=rule.p_norm, dim=-1, keepdim=True)
    if rule.kind == SOFTMAX_BIAS:
        return kept / torch.clamp(kept.sum(-1, keepdim=True), min=rule.norm_min)
    if rule.renormalise:
        kept = kept / (kept.sum(-1, keepdim=True) + (1e-20 if rule.kind == SIGMOID_BIAS else 0.0))
    return kept * rule.scale if rule.scale != 1.0 else kept


def padding_slots(experts: Any, weights: Any) -> Any:
    """bool[T, k]: slots that are padding of a variable-size routing (weight 0, repeating the first expert).

    Works on torch tensors and numpy arrays alike. Slot 0 is never padding.
    """
    pad = (weights == 0) & (experts == experts[:, :1])
    pad[:, 0] = False
    return pad


def router_output(family: str, output: Any, weights: torch.Tensor, experts: torch.Tensor) -> Any:
    """``output`` (the router's own) with its decision replaced by ``(weights, experts)``, in the family's layout."""
    if family == LLAMA4:  # dense scores, 0 for experts that are not selected (they get a zero input)
        scores, logits = output
        dense = torch.zeros_like(scores).scatter_add_(1, experts, weights.to(scores.dtype))
        return dense, logits
    if family == JETMOE:  # flat slots sorted by expert; expert_size counts slots (padding repeats included)
        *_, logits = output
        n_slots = experts.shape[1]
        flat = experts.reshape(-1)
        _, sorted_slots = flat.sort(0)
        sizes = torch.bincount(flat, minlength=logits.shape[-1]).tolist()
        return sorted_slots, sorted_slots.div(n_slots, rounding_mode="trunc"), weights.reshape(-1)[sorted_slots], sizes, logits
    logits, _, _, *rest = output
    return (logits, weights, experts, *rest)
