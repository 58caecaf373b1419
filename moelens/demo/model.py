"""The demo model's architecture (a 4-layer, 16-expert, top-2 OLMoE) and its load-balancing loss.

The random-init baselines of the quality benchmark are built here too, so that "the same architecture at
another seed" is the same code path as the model that was trained.
"""

from __future__ import annotations

import torch
from transformers import OlmoeConfig, OlmoeForCausalLM
from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

from moelens.demo.tokenizer import EOS_ID, MAX_LENGTH, PAD_ID, VOCAB_SIZE

#: Weight of the per-layer balance loss in the training objective (the config's own coefficient stays 0).
BALANCE_COEF = 0.01


def demo_config() -> OlmoeConfig:
    """4 layers, hidden 128, 16 experts of width 128, top-2 without renormalisation: 4.47 M parameters.

    Small enough to train in ~10 minutes on one CPU thread, large enough that experts specialise.
    ``experts_implementation="eager"`` is the fast kernel for training on CPU (``batched_mm`` is ~50x slower).
    """
    return OlmoeConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=16,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        max_position_embeddings=MAX_LENGTH,
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        router_aux_loss_coef=0.0,
        experts_implementation="eager",
    )


def new_model(seed: int) -> OlmoeForCausalLM:
    """A freshly initialised fp32 demo model; the same seed gives the same weights."""
    torch.manual_seed(seed)
    return OlmoeForCausalLM(demo_config())


def per_layer_balance_loss(router_logits: tuple[torch.Tensor, ...], n_experts: int, top_k: int) -> torch.Tensor:
    """Mean over layers of the Switch load-balancing loss computed on each layer alone (uniform routing = k).

    transformers' loss pools counts and probabilities over all layers before the product, so one layer
    can starve experts while the pooled value still looks balanced: in the measured recipe that left 2-5 of
    16 experts per layer dead. Computing it per layer and averaging gave no dead expert.
    """
    losses = [load_balancing_loss_func((logits,), n_experts, top_k) for logits in router_logits]
    return torch.stack(losses).mean()
