"""The demo tokenizer: a 4096-entry byte-level BPE trained on the demo corpus's training split.

Byte-level means every string round-trips (multilingual text, code, odd bytes) with no unknown token.
4096 entries keep the embedding and output layers small; 8192 cost ~35 % training throughput.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 4096
EOS = "<|endoftext|>"
PAD = "<|pad|>"
#: Special ids fixed by the order of ``special_tokens``: the model config refers to them.
EOS_ID, PAD_ID = 0, 1
MAX_LENGTH = 256


def train_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """Train the BPE (deterministic for the same texts) and wrap it for ``save_pretrained``.

    No BOS is added automatically: recorded token positions then match the text exactly. The same token
    serves as BOS and EOS (document separator in training).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    assert tok.token_to_id(EOS) == EOS_ID and tok.token_to_id(PAD) == PAD_ID
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=MAX_LENGTH,
    )
