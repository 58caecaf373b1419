"""Find every router of a transformers MoE model, generically, from what the model declares.

transformers 5.x models declare the modules that produce router logits in ``_can_record_outputs`` (for their own
``output_router_logits``). Reading those declarations, instead of hard-coding module paths, covers every
architecture that transformers can record router logits for. Layers are keyed by
the model's own block index, parsed from the router's module name, never by call order or list position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from transformers.utils.output_capturing import OutputRecorder

from moelens.adapters.families import (
    DBRX,
    JETMOE,
    SUPPORTED_MODEL_TYPES,
    SWITCH,
    describe_routing,
    router_family,
)
from moelens.adapters.routing import RoutingRule, fixed_top_k_reason, routing_rule
from moelens.errors import NotMoEError

_LOGIT_KEYS = ("router_logits", "encoder_router_logits", "decoder_router_logits")
_SHARED_EXPERT_ATTRS = ("shared_expert", "shared_experts", "shared_mlp")
_N_SHARED_KEYS = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts")


@dataclass
class RouterSite:
    """One router of the model: where it lives, how to decode it, and the parameters steering needs."""

    layer: int
    block: int
    name: str
    module: nn.Module
    kind: str
    family: str
    n_experts: int
    top_k: int
    experts: nn.Module | None
    logit_weight: nn.Parameter
    correction_bias: torch.Tensor | None = None
    shared_gate: nn.Module | None = None
    has_shared_expert: bool = False
    #: The router's own routing function, re-implementable with another k or top-p (None: moelens has none).
    rule: RoutingRule | None = None
    #: Why the number of experts per token is fixed by construction (None: it can change).
    fixed_k: str | None = None
    #: The module whose ``top_k`` attribute the routing reads at call time (the router; DBRX: its block).
    top_k_owner: nn.Module | None = None


@dataclass
class MoEInfo:
    """The MoE layout of one model: its router sites (sorted by layer) and model-level routing facts."""

    model_type: str
    sites: list[RouterSite]
    n_layers: int
    n_experts: int
    top_k: int
    n_shared_experts: int
    routing_function: str
    is_encoder_decoder: bool

    @property
    def layers(self) -> list[int]:
        """The routing keys of all sites, ascending."""
        return [site.layer for site in self.sites]

    def site(self, layer: int) -> RouterSite:
        """The site with routing key ``layer``; KeyError names the MoE layers that exist."""
        for site in self.sites:
            if site.layer == layer:
                return site
        raise KeyError(f"layer {layer} has no router; MoE layers are {self.layers}")


def _declared_recorders(model: nn.Module) -> Iterator[tuple[OutputRecorder | Any, int]]:
    """Router-logit declarations ``(spec, logits index)`` of the model and of every submodule class.

    Submodules matter: Switch declares them on its encoder/decoder stacks. A bare class (not an OutputRecorder)
    gets index 1, as transformers itself does for non-hidden-state keys.
    """
    for module in model.modules():
        declared = getattr(module, "_can_record_outputs", None)
        if not isinstance(declared, dict):
            continue
        for key in _LOGIT_KEYS:
            specs = declared.get(key)
            for spec in specs if isinstance(specs, list) else [specs] if specs is not None else []:
                yield spec, spec.index if isinstance(spec, OutputRecorder) else 1


def _matches(spec: OutputRecorder | Any, name: str, module: nn.Module) -> bool:
    """Same matching rule as transformers' output capturing (class, or class-name suffix, and layer_name)."""
    if not isinstance(spec, OutputRecorder):
        return isinstance(module, spec) if isinstance(spec, type) else name.endswith(spec)
    if not (
        (spec.target_class is not None and isinstance(module, spec.target_class))
        or (spec.class_name is not None and name.endswith(spec.class_name))
    ):
        return False
    return spec.layer_name is None or f".{spec.layer_name.strip('.')}." in f"{name}."


def _innermost_routers(model: nn.Module) -> dict[str, tuple[nn.Module, int]]:
    """``{qualified name: (router, logits index)}``, dropping matches that contain another match.

    JetMoE declares both its attention module (index 2) and the gating inside it (index 4): the gating is the
    router. Keyed by name because JetMoE calls routers in a different order than it registers them.
    """
    recorders = list(_declared_recorders(model))
    found: dict[str, tuple[nn.Module, int]] = {}
    for name, module in model.named_modules():
        for spec, index in recorders:
            if _matches(spec, name, module):
                found.setdefault(name, (module, index))
    return {
        name: hit for name, hit in found.items() if not any(other.startswith(f"{name}.") for other in found)
    }


def _parent(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rpartition(".")[0])


def _block_position(parts: list[str]) -> int:
    """Position of the model's own block index in a module path: its first integer component."""
    position = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    if position is None:
        raise NotMoEError(f"cannot tell which block router {'.'.join(parts)!r} belongs to (no index in its name)")
    return position


def _kind(model: nn.Module, parts: list[str], position: int, is_encoder_decoder: bool) -> str:
    """"encoder"/"decoder" by stack; "attention" for a router inside its block's attention (JetMoE MoA)."""
    if is_encoder_decoder:
        return "decoder" if "decoder" in parts else "encoder"
    inside_block = (model.get_submodule(".".join(parts[:depth])) for depth in range(position + 2, len(parts)))
    return "attention" if any("Attention" in type(m).__name__ for m in inside_block) else "mlp"


def _logit_weight(router: nn.Module) -> nn.Parameter:
    """The weight of the linear op producing the logits: own ``weight``, else the first inner ``nn.Linear``'s."""
    own = router._parameters.get("weight")
    if own is not None:
        return own
    for module in router.modules():
        if isinstance(module, nn.Linear):
            return module.weight
    raise NotMoEError(f"router {type(router).__name__} has no logit weight moelens can find")


def _correction_bias(router: nn.Module) -> torch.Tensor | None:
    """``e_score_correction_bias`` (DeepSeek-V3 family), a buffer or a frozen parameter depending on the model."""
    for name, tensor in [*router.named_buffers(), *router.named_parameters()]:
        if name.rpartition(".")[2] == "e_score_correction_bias":
            return tensor
    return None


def _n_experts(router: nn.Module, weight: nn.Parameter) -> int:
    for attr in ("num_experts", "num_local_experts"):
        value = getattr(router, attr, None)
        if isinstance(value, int):
            return value
    return weight.shape[0]


def _top_k(router: nn.Module, block: nn.Module, family: str, config: Any) -> int:
    if family == SWITCH:
        return 1
    for owner in (router, block):  # DBRX: the block does the top-k
        value = getattr(owner, "top_k", None)
        if isinstance(value, int):
            return value
    return int(config.num_experts_per_tok)


def _has_shared_expert(model: nn.Module, name: str) -> bool:
    """A shared expert on the MoE block or on its decoder layer (GraniteMoeShared's ``shared_mlp``)."""
    block_name = name.rpartition(".")[0]
    for owner in (model.get_submodule(block_name), _parent(model, block_name)):
        if any(getattr(owner, attr, None) is not None for attr in _SHARED_EXPERT_ATTRS):
            return True
    return False


def _stack_sizes(config: Any) -> tuple[int, int]:
    """(encoder blocks, decoder blocks) of an encoder-decoder config (T5/Switch or BART/NLLB naming)."""
    encoder = getattr(config, "num_layers", None) or config.encoder_layers
    decoder = getattr(config, "num_decoder_layers", None) or getattr(config, "decoder_layers", None) or encoder
    return encoder, decoder


def _unsupported(model_type: str, why: str) -> NotMoEError:
    return NotMoEError(
        f"{why} (model_type {model_type!r}). Supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}; "
        "other transformers MoE models whose routers return (logits, weights, index) work too."
    )


def find_routers(model: nn.Module) -> MoEInfo:
    """Discover every router of ``model`` and how to decode it; raises NotMoEError if there is none."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text_config, "model_type", type(model).__name__)
    is_enc_dec = bool(getattr(config, "is_encoder_decoder", False))
    if is_enc_dec:
        n_encoder, n_decoder = _stack_sizes(config)
        n_layers = n_encoder + n_decoder
    else:
        n_encoder, n_layers = 0, int(text_config.num_hidden_layers)

    routers = _innermost_routers(model)
    if not routers:
        raise _unsupported(model_type, "This model has no Mixture-of-Experts router moelens can find")

    sites = []
    for name, (router, index) in routers.items():
        family = router_family(router, index)
        block_module = _parent(model, name)
        experts = getattr(block_module, "input_linear" if family == JETMOE else "experts", None)
        if family is None or (family == DBRX and experts is None):
            raise _unsupported(model_type, f"Router {name!r} ({type(router).__name__}) has an unknown output layout")
        parts = name.split(".")
        position = _block_position(parts)
        block = int(parts[position])
        kind = _kind(model, parts, position, is_enc_dec)
        layer = block + {"attention": n_layers, "decoder": n_encoder}.get(kind, 0)
        weight = _logit_weight(router)
        owner = block_module if family == DBRX else router
        sites.append(
            RouterSite(
                layer=layer,
                block=block,
                name=name,
                module=experts if family == DBRX else router,
                kind=kind,
                family=family,
                n_experts=_n_experts(router, weight),
                top_k=_top_k(router, block_module, family, text_config),
                experts=experts,
                logit_weight=weight,
                correction_bias=_correction_bias(router),
                shared_gate=getattr(block_module, "shared_expert_gate", None),
                has_shared_expert=_has_shared_expert(model, name),
                rule=routing_rule(model_type, router, block_module, text_config, family, kind),
                fixed_k=fixed_top_k_reason(model_type, family, kind),
                top_k_owner=owner if isinstance(getattr(owner, "top_k", None), int) else None,
            )
        )
    sites.sort(key=lambda site: site.layer)

    top_k = max(site.top_k for site in sites)
    n_shared = 0
    if any(site.has_shared_expert for site in sites):
        n_shared = next((getattr(text_config, k) for k in _N_SHARED_KEYS if getattr(text_config, k, 0)), 1)
    return MoEInfo(
        model_type=model_type,
        sites=sites,
        n_layers=n_layers,
        n_experts=max(site.n_experts for site in sites),
        top_k=top_k,
        n_shared_experts=int(n_shared),
        routing_function=describe_routing(model_type, text_config, type(routers[sites[0].name][0]).__name__, top_k),
        is_encoder_decoder=is_enc_dec,
    )
