"""Offline hub-style checkpoints built from the real tokenizer files that the `mistral-common` package ships.

* `mixtral_folder`: Mixtral-8x7B's SentencePiece model (``tokenizer.model.v1``: 32,000 ids, byte fallback, BOS
  ``<s>``) with Mixtral-8x7B-Instruct-v0.1's ``tokenizer_config.json`` (``add_bos_token``, no pad token, legacy
  SentencePiece behaviour, its chat template), saved by transformers next to ``tokenizer.json`` as on the hub,
  plus tiny random ``MixtralForCausalLM`` weights with the real vocabulary size (safetensors).
* `tekken_folder`: the usual Mistral hub layout, ``tekken.json`` (131k byte-level BPE) and ``tokenizer.json``
  side by side, with tiny Mixtral weights of 131,072 ids; with mistral-common installed transformers loads
  its tokenizer as ``MistralCommonBackend``, which has no character offsets.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

# Mixtral-8x7B-Instruct-v0.1's chat template, as published in its tokenizer_config.json.
MIXTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

MIXTRAL_TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": None,
    "additional_special_tokens": [],
    "chat_template": MIXTRAL_CHAT_TEMPLATE,
    "clean_up_tokenization_spaces": False,
    "legacy": True,
    "model_max_length": 1000000000000000019884624838656,
    "sp_model_kwargs": {},
    "spaces_between_special_tokens": False,
    "tokenizer_class": "LlamaTokenizer",
    "use_default_system_prompt": False,
}


def mistral_data(name: str) -> Path:
    """A file of ``mistral_common/data`` (the real tokenizers the package ships)."""
    import mistral_common

    return Path(os.path.dirname(mistral_common.__file__)) / "data" / name


def tiny_mixtral_weights(folder: Path, vocab_size: int, *, seed: int = 0) -> None:
    """Tiny random Mixtral weights (hidden 16, 2 layers, 4 experts, top-2) saved like a hub checkpoint."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    MixtralForCausalLM(config).eval().save_pretrained(folder, safe_serialization=True)


def mixtral_folder(folder: Path) -> Path:
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(mistral_data("tokenizer.model.v1"), folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(MIXTRAL_TOKENIZER_CONFIG, indent=2))
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)  # adds tokenizer.json, as on the hub
    tiny_mixtral_weights(folder, 32000)
    return folder


def tekken_folder(folder: Path) -> Path:
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tekken = mistral_data("tekken_240911.json")
    convert_tekken_tokenizer(str(tekken)).save_pretrained(folder)
    shutil.copy(tekken, folder / "tekken.json")
    tiny_mixtral_weights(folder, 131072)
    return folder
