"""Write a pruned Hugging Face checkpoint: the kept experts' weights, router rows and config counts.

transformers 5 stores a layer's routed experts as fused parameters with the expert on axis 0
(``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``, GPT-OSS biases ``[E, ·]``, Llama4 ``[E, H, 2I]``), and
DBRX as ``[E·I, H]`` matrices; routers hold ``[E, H]`` logit rows plus, in some families, an ``[E]`` bias
(GPT-OSS) or ``e_score_correction_bias`` (DeepSeek-V3 family; Ernie's is ``[1, E]``). Pruning selects along
that expert axis in the state dict, renumbers the kept experts 0..n-1, sets the config's expert count, and
saves with ``save_pretrained`` (safetensors). Because the router simply has fewer rows, the pruned model routes
exactly like the original with the removed experts' logits at −inf — what ``steer(disable=..., mode="reroute")``
does — which the tests check per architecture.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from moelens.adapters import MoEInfo, RouterSite, find_routers
from moelens.adapters.families import DBRX, JETMOE, SWITCH
from moelens.errors import InputError
from moelens.pruning.plan import LayerLayout, PrunePlan

#: Config fields holding the number of routed experts, per naming family.
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
#: Families pruning refuses: JetMoE's experts include attention heads in a sorted layout; Switch is encoder-decoder
#: with per-expert modules (not loadable by AutoModelForCausalLM).
UNSUPPORTED = (JETMOE, SWITCH)


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_layout(model: nn.Module, info: MoEInfo | None = None) -> dict[int, LayerLayout]:
    """``{layer: LayerLayout}`` of a model, refusing architectures pruning does not handle."""
    info = info or find_routers(model)
    bad = [s for s in info.sites if s.family in UNSUPPORTED]
    if bad:
        raise InputError(f"pruning is not supported for {info.model_type!r} (its experts are not fused "
                         f"[E, ...] parameters of a decoder-only model)")
    cfg = _text_config(model.config)
    n_group, topk_group = int(getattr(cfg, "n_group", 1) or 1), int(getattr(cfg, "topk_group", 1) or 1)
    grouped = n_group > 1 and topk_group < n_group
    layout = {}
    for site in info.sites:
        per_group = 2 if site.correction_bias is not None else 1  # V3 scores a group by its top-2 sum
        layout[site.layer] = LayerLayout(site.n_experts, site.top_k, n_group if grouped else 1, per_group)
    return layout


def _slice_expert_axis(tensor: torch.Tensor, kept: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Keep rows of the expert axis: axis 0 when it has E entries, else the last axis of size E ([1, E] biases)."""
    if tensor.shape[0] == n_experts:
        return tensor.index_select(0, kept)
    dims = [d for d, size in enumerate(tensor.shape) if size == n_experts]
    if not dims:
        raise InputError(f"cannot find the expert axis (size {n_experts}) of a tensor of shape {tuple(tensor.shape)}")
    return tensor.index_select(dims[-1], kept)


def _fused(sd: dict, prefix: str, kept: torch.Tensor, site: RouterSite) -> None:
    for key in [k for k in sd if k.startswith(prefix)]:
        if sd[key].shape[0] != site.n_experts:
            raise InputError(f"{key} has shape {tuple(sd[key].shape)}: not a fused [E={site.n_experts}, ...] expert tensor")
        sd[key] = sd[key].index_select(0, kept)


def _dbrx(sd: dict, prefix: str, kept: torch.Tensor, site: RouterSite) -> None:
    """DBRX stores w1 / v1 / w2 as [E·I, H]: view as [E, I, H], select, flatten back."""
    for key in [k for k in sd if k.startswith(prefix)]:
        tensor = sd[key]
        sd[key] = tensor.view(site.n_experts, -1, tensor.shape[-1]).index_select(0, kept).reshape(-1, tensor.shape[-1])


_EXPERT_SLICERS: dict[str, Callable[[dict, str, torch.Tensor, RouterSite], None]] = {DBRX: _dbrx}


def pruned_state_dict(model: nn.Module, plan: PrunePlan, info: MoEInfo | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict with only the plan's experts (router rows and biases sliced to match)."""
    info = info or find_routers(model)
    sd = dict(model.state_dict())
    for site in info.sites:
        kept = torch.tensor(plan.kept[site.layer], dtype=torch.long)
        block = site.name.rpartition(".")[0]
        router = f"{block}.router." if site.family == DBRX else f"{site.name}."
        for key in [k for k in sd if k.startswith(router)]:
            sd[key] = _slice_expert_axis(sd[key], kept, site.n_experts)
        _EXPERT_SLICERS.get(site.family, _fused)(sd, f"{block}.experts.", kept, site)
    return sd


def pruned_config(config: Any, n_experts: int, old: int) -> Any:
    """A copy of ``config`` whose expert-count fields read ``n_experts`` (DBRX: ``ffn_config.moe_num_experts``)."""
    config = copy.deepcopy(config)
    owners = [_text_config(config), getattr(config, "ffn_config", None)]
    changed = False
    for owner in [o for o in owners if o is not None]:
        for key in EXPERT_COUNT_KEYS:
            if getattr(owner, key, None) == old:
                setattr(owner, key, n_experts)
                changed = True
    if not changed:
        raise InputError(f"the config has no expert-count field ({', '.join(EXPERT_COUNT_KEYS)}) equal to {old}")
    return config


def write_checkpoint(model: nn.Module, plan: PrunePlan, out: str | Path, *, tokenizer: Any = None,
                     info: MoEInfo | None = None, provenance: dict | None = None) -> Path:
    """Save the pruned model to ``out`` (safetensors, config, generation config, tokenizer, ``pruning.json``)."""
    from transformers import AutoModelForCausalLM

    info = info or find_routers(model)
    model_layout(model, info)  # refuses unsupported families
    counts = set(plan.counts.values())
    if len(counts) != 1:
        raise InputError(
            f"this plan keeps different numbers of experts per layer ({plan.counts}), which the {info.model_type!r} "
            "config (one expert count for all layers) cannot express; use --uniform, or evaluate the per-layer plan "
            "without --out (it is applied by steering)")
    olds = {site.n_experts for site in info.sites}
    if len(olds) != 1:
        raise InputError(f"layers have different expert counts {sorted(olds)}; pruning expects one count")
    config = pruned_config(model.config, counts.pop(), olds.pop())
    state = pruned_state_dict(model, plan, info)
    dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        pruned = AutoModelForCausalLM.from_config(config, dtype=dtype)
    pruned.load_state_dict(state, strict=True, assign=True)
    pruned.generation_config = copy.deepcopy(model.generation_config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pruned.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / "pruning.json").write_text(json.dumps({**(provenance or {}), **plan.to_dict()}, indent=1))
    return out
