"""Tokenize documents into fixed-maximum-length sequences with the exact text of every token.

Token text comes from the tokenizer's character offsets, with each token owning the characters from the
end of the previous token to its own end. Concatenating a sequence's token texts therefore gives back the
sequence text exactly (spaces and multibyte characters included), which is what the token view shows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from moelens.recording.inputs import Document


@dataclass
class Chunk:
    """One sequence to record: at most ``seq_len`` tokens of one document."""

    ids: list[int]
    tokens: list[str | None]
    text: str | None
    label: str | None
    source: str | None


def chunk_documents(docs: Iterable[Document], tokenizer: Any, seq_len: int) -> Iterator[Chunk]:
    """Split each document into consecutive chunks of at most ``seq_len`` tokens."""
    if seq_len < 1:
        raise ValueError("seq_len must be at least 1")
    for doc in docs:
        if doc.ids is not None:
            ids = list(doc.ids)
            yield from _split(ids, _decode_each(tokenizer, ids), None, doc, seq_len)
            continue
        if tokenizer is None:
            raise ValueError("texts need a tokenizer; pass token ids instead when recording without one")
        if not doc.text:
            continue
        ids, tokens, spans = _encode(tokenizer, doc.text)
        yield from _split(ids, tokens, spans, doc, seq_len)


def _split(ids: list[int], tokens: list[str | None], spans: list[tuple[int, int]] | None, doc: Document,
           seq_len: int) -> Iterator[Chunk]:
    n_chunks = (len(ids) + seq_len - 1) // seq_len
    for c in range(n_chunks):
        a, b = c * seq_len, min((c + 1) * seq_len, len(ids))
        if spans is not None:
            text = doc.text[spans[a][0]:spans[b - 1][1]]
        else:  # pre-tokenized ids: the text is whatever the tokens decode to
            text = None if tokens[a] is None else "".join(tokens[a:b])
        source = doc.source if n_chunks == 1 else f"{doc.source}#{c}"
        yield Chunk(ids=ids[a:b], tokens=tokens[a:b], text=text, label=doc.label, source=source)


def _encode(tokenizer: Any, text: str) -> tuple[list[int], list[str | None], list[tuple[int, int]]]:
    """Token ids, exact token texts and the character span each token owns."""
    try:
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True, verbose=False)  # we chunk ourselves
    except NotImplementedError:  # slow tokenizers have no offsets
        ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
        tokens = _decode_each(tokenizer, ids)
        spans, cursor = [], 0
        for tok in tokens:
            spans.append((cursor, cursor + len(tok or "")))
            cursor += len(tok or "")
        return ids, tokens, spans
    ids = list(enc["input_ids"])
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    tokens: list[str | None] = []
    spans: list[tuple[int, int]] = []
    prev_end, last_text_token = 0, None
    for i, (tid, (start, end)) in enumerate(zip(ids, enc["offset_mapping"])):
        if tid in special and start == end:
            tokens.append(tokenizer.convert_ids_to_tokens(tid))
            spans.append((prev_end, prev_end))
            continue
        end = max(end, prev_end)
        tokens.append(text[prev_end:end])
        spans.append((prev_end, end))
        prev_end, last_text_token = end, i
    if last_text_token is not None and prev_end < len(text):  # trailing characters no token claimed
        tokens[last_text_token] += text[prev_end:]
        spans[last_text_token] = (spans[last_text_token][0], len(text))
    return ids, tokens, spans


def _decode_each(tokenizer: Any, ids: list[int]) -> list[str | None]:
    if tokenizer is None:
        return [None] * len(ids)
    return [tokenizer.decode([t]) for t in ids]
