"""Tiny random-weight MoE models and a local tokenizer, for tests, benchmarks and notebooks.

Nothing here touches the network: models are built from configs (``AutoConfig.for_model``) and the tokenizer
is a character-level ``tokenizers`` model built in memory. The per-architecture recipes are hand-checked ones
(each builds and routes under transformers 5); every other ``model_type`` goes through a generic shrinker, which only
overrides keywords the default config already has (so the architecture's own defaults stay meaningful).
"""

from __future__ import annotations

import string
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

_COMMON: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
_MLA: dict[str, Any] = dict(  # DeepSeek multi-head latent attention: needs kv heads == attention heads
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    moe_intermediate_size=32,
    first_k_dense_replace=0,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    head_dim=8,
    n_group=4,
    topk_group=2,
    num_key_value_heads=4,
)

# Verified recipes. DBRX and Switch name their keywords differently, so they do not take _COMMON.
_RECIPES: dict[str, dict[str, Any]] = {
    "mixtral": {**_COMMON, "num_local_experts": 8, "num_experts_per_tok": 2},
    "qwen2_moe": {
        **_COMMON,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
        "norm_topk_prob": False,
    },
    "qwen3_moe": {
        **_COMMON,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "head_dim": 16,
        "norm_topk_prob": True,
    },
    # OLMoE's default eos id (50279) is outside a 128-token vocabulary and makes generate() warn.
    "olmoe": {**_COMMON, "num_experts": 8, "num_experts_per_tok": 2, "eos_token_id": 2},
    "deepseek_v2": {**_COMMON, **_MLA, "q_lora_rank": None, "topk_method": "group_limited_greedy"},
    "deepseek_v3": {**_COMMON, **_MLA, "q_lora_rank": 16},
    "gpt_oss": {
        **_COMMON,
        # Its YaRN rope scaling (factor 32 over 4096) expects the default context; 512 only triggers a warning.
        "max_position_embeddings": 131072,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "head_dim": 16,
        "sliding_window": 32,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "granitemoe": {**_COMMON, "num_local_experts": 8, "num_experts_per_tok": 2},
    "phimoe": {**_COMMON, "num_local_experts": 8, "num_experts_per_tok": 2},
    "jetmoe": {**_COMMON, "num_local_experts": 8, "num_experts_per_tok": 2, "kv_channels": 16},
    "llama4_text": {
        **_COMMON,
        "num_local_experts": 8,
        "num_experts_per_tok": 1,
        "head_dim": 16,
        "intermediate_size_mlp": 64,
        "interleave_moe_layer_step": 1,
        "attention_chunk_size": 128,
    },
    "dbrx": dict(
        d_model=64,
        n_heads=4,
        n_layers=2,
        max_seq_len=512,
        vocab_size=128,
        # 5.23 bugs: attention reads rope_theta (not a config field) and clamps with clip_qkv (None crashes).
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=64, moe_num_experts=8, moe_top_k=2),
    ),
    "switch_transformers": dict(
        vocab_size=128,
        d_model=64,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        num_experts=8,
        expert_capacity=64,
        encoder_sparse_step=1,
        decoder_sparse_step=1,
        num_sparse_encoder_layers=2,
        num_sparse_decoder_layers=2,
    ),
}

# Generic shrinker: applied only to keywords the default config already has.
_SHRINK: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "pad_token_id": 0,
    "sliding_window": 64,
    "ffn_hidden_size": 64,
    "moe_intermediate_size": 32,
    "expert_intermediate_size": 32,
    "first_k_dense_replace": 0,
    "first_k_dense": 0,
    "decoder_sparse_step": 1,
    "moe_layer_freq": 1,
    "mlp_only_layers": [],
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "n_group": 1,
    "topk_group": 1,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "index_n_heads": 2,
    "index_head_dim": 16,
    "index_topk": 16,
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 8),
    **dict.fromkeys(("num_experts_per_tok", "moe_k", "moe_topk"), 2),
    **dict.fromkeys(
        (
            "shared_expert_intermediate_size",
            "moe_intermediate_size_shared",
            "moe_shared_expert_intermediate_size",
            "shared_intermediate_size",
        ),
        64,
    ),
}

TINY_MODEL_TYPES: tuple[str, ...] = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "gpt_oss",
    "granitemoe",
    "granitemoeshared",
    "phimoe",
    "jetmoe",
    "llama4_text",
    "dbrx",
    "switch_transformers",
    "glm4_moe",
    "ernie4_5_moe",
    "qwen3_next",
)


def _shrink(defaults: dict[str, Any]) -> dict[str, Any]:
    """Shrinker keywords for a default config: only keys it has, plus the two list-cutting rules below."""
    kw = {key: value for key, value in _SHRINK.items() if key in defaults}
    if "num_key_value_heads" in defaults:
        kw["num_key_value_heads"] = 4 if "kv_lora_rank" in defaults else 2  # MLA needs kv heads == heads
    layer_types = defaults.get("layer_types")
    if isinstance(layer_types, list) and layer_types:
        other = [t for t in layer_types if t != layer_types[0]]
        kw["layer_types"] = [layer_types[0], other[0] if other else layer_types[0]]
    for key, value in defaults.items():
        if key in kw or not isinstance(value, list) or len(value) <= 4:
            continue
        if any(part in key for part in ("layer", "mlp", "moe")) and all(isinstance(v, (int, bool)) for v in value):
            kw[key] = value[:2]
    return kw


def tiny_config(model_type: str, **overrides: Any) -> PretrainedConfig:
    """The config ``tiny_model`` builds from: a verified recipe or the generic shrinker, then ``overrides``."""
    if model_type in _RECIPES:
        kw = dict(_RECIPES[model_type])
    else:
        kw = _shrink(AutoConfig.for_model(model_type).to_dict())
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(
    model_type: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> tuple[PreTrainedModel, PretrainedConfig]:
    """Build a seeded random-weight model of ``model_type`` (≈ 0.1–0.5 M parameters) in eval mode.

    ``overrides`` replace recipe keywords (e.g. ``num_hidden_layers=3, first_k_dense_replace=1`` for a model with
    dense layers). Eval mode matters: several routers add jitter noise only in training mode.
    """
    config = tiny_config(model_type, **overrides)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    torch.manual_seed(seed)
    model = auto.from_config(config, dtype=dtype)
    return model.eval(), model.config


_SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


def tiny_tokenizer(vocab_size: int = 128) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII, built locally (no download).

    Ids 0–3 are ``<pad> <bos> <eos> <unk>``; every other character maps to ``<unk>`` with its exact offsets, so
    token spans stay exact for multibyte text. No special tokens are added automatically. The vocabulary is cut
    to ``vocab_size`` so ids always fit the tiny models' embedding.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    if vocab_size <= len(_SPECIALS):
        raise ValueError(f"vocab_size must exceed {len(_SPECIALS)} (the special tokens), got {vocab_size}")
    symbols = [*_SPECIALS, *string.printable][:vocab_size]
    backend = Tokenizer(models.WordLevel({s: i for i, s in enumerate(symbols)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
