"""Which output layout a router has ("family"), and a short description of each model's routing function.

The family decides how a router's output is decoded into ``(experts [T, k], weights [T, k], logits [T, E])``. It is read from what transformers itself declares: the ``index`` of the router
logits in the router's output tuple (``_can_record_outputs``), plus one structural check for DBRX, whose router
returns bare logits and leaves top-k to the enclosing block.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

STANDARD, LLAMA4, JETMOE, SWITCH, DBRX = "standard", "llama4", "jetmoe", "switch", "dbrx"


def router_family(router: nn.Module, logits_index: int) -> str | None:
    """The decoder for ``router``'s output, or None when moelens does not know its layout.

    index 0: ``(logits, weights, index)`` — or bare logits when the router has no ``top_k`` (DBRX);
    index 1: ``(dense scores [T, E], logits)`` of an ``nn.Linear`` router (Llama4);
    index 2: ``(dispatch [B, S, E], max prob, logits)`` with a ``classifier`` (Switch);
    index 4: ``(sorted slots, batch index, gates, expert sizes, logits)`` (JetMoE gating).
    """
    if logits_index == 0:
        return STANDARD if hasattr(router, "top_k") else DBRX
    if logits_index == 1 and isinstance(router, nn.Linear):
        return LLAMA4
    if logits_index == 2 and isinstance(getattr(router, "classifier", None), nn.Linear):
        return SWITCH
    if logits_index == 4:
        return JETMOE
    return None


def _renorm(cfg: Any) -> str:
    return " -> renormalise" if getattr(cfg, "norm_topk_prob", False) else ""


def _scale(cfg: Any) -> str:
    factor = getattr(cfg, "routed_scaling_factor", 1.0)
    return f" x{factor:g}" if factor != 1.0 else ""


def _biased_sigmoid(cfg: Any) -> str:
    grouped = ", group-limited" if getattr(cfg, "n_group", 1) > 1 else ""
    renorm = ", renorm" if getattr(cfg, "norm_topk_prob", False) else ""
    return f"sigmoid + bias{grouped}, top-k{renorm}{_scale(cfg)}"


def _deepseek_v2(cfg: Any) -> str:
    method = "group-limited top-k" if cfg.topk_method == "group_limited_greedy" else "top-k"
    return f"softmax -> {method}{_scale(cfg)}"


def _switch(cfg: Any) -> str:
    return f"softmax -> top-1, capacity {cfg.expert_capacity} per expert and sequence"


def _dbrx(cfg: Any) -> str:
    p = cfg.ffn_config.moe_normalize_expert_weights
    return "softmax -> top-k" + (f" -> divide by {p:g}-norm" if p is not None else "")


_TOPK_SOFTMAX = "top-k on logits -> softmax over the k"
_DESCRIBE: dict[str, Callable[[Any], str]] = {
    "mixtral": lambda cfg: "softmax -> top-k -> renormalise",
    "qwen2_moe": lambda cfg: "softmax -> top-k" + _renorm(cfg),
    "qwen3_moe": lambda cfg: "softmax -> top-k" + _renorm(cfg),
    "qwen3_next": lambda cfg: "softmax -> top-k" + _renorm(cfg),
    "olmoe": lambda cfg: "softmax -> top-k" + _renorm(cfg),
    "deepseek_v2": _deepseek_v2,
    "deepseek_v3": _biased_sigmoid,
    "glm4_moe": _biased_sigmoid,
    "ernie4_5_moe": lambda cfg: "softmax + bias -> top-k -> renormalise",
    "gpt_oss": lambda cfg: "logits + bias -> " + _TOPK_SOFTMAX,
    "granitemoe": lambda cfg: _TOPK_SOFTMAX,
    "granitemoeshared": lambda cfg: _TOPK_SOFTMAX,
    "jetmoe": lambda cfg: _TOPK_SOFTMAX,
    "phimoe": lambda cfg: "sparsemixer top-2 (two masked softmaxes)",
    "llama4_text": lambda cfg: "top-k on logits -> sigmoid of the selected",
    "dbrx": _dbrx,
    "switch_transformers": _switch,
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_DESCRIBE)


def describe_routing(model_type: str, config: Any, router_class: str, top_k: int) -> str:
    """Short human text for the runs table; unknown types name the router class instead of guessing."""
    describe = _DESCRIBE.get(model_type)
    return describe(config) if describe else f"{router_class} (top-{top_k})"
