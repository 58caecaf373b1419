"""Tokenize documents into sequences of at most ``seq_len`` tokens, with the exact text of every token.

The convention, the same for forward and generation runs and for every tokenizer:

* A sequence's text is the concatenation of its token texts (``string_agg(token ORDER BY pos) = text``).
* **Special tokens** (BOS/EOS, chat control tokens, ``<pad>``...) spell no text: their ``token`` is ``""`` and
  their name (``<s>``) is in ``special``; ``special`` is ``None`` for every other token. A special token written
  literally in a document (a ``</s>`` in the text) is recorded the way the tokenizer read it: as that special token.
  An ``<unk>`` whose offsets cover characters of the text keeps them (it stands for text).
* **A character split over several tokens** (SentencePiece byte fallback, byte-level BPE pieces of an emoji) is
  carried whole by its first token; the other pieces have ``""``. A sequence cut between such pieces thus still
  spells whole characters.

Token text comes from the tokenizer's character offsets when it has them: each token owns the original
characters from the end of the previous token to its own end, so spaces, CRLF and un-normalised input (NFD
under an NFC normaliser) come back exactly. Tokenizers without offsets (transformers' Python SentencePiece
backend, ``MistralCommonBackend``), pre-tokenized ids, chat prompts and generated tokens use incremental
decoding with context instead: the text a token adds to the decoding of everything before it, which keeps
SentencePiece's leading spaces and multibyte characters whole. Where the decoding differs from the original
text (normalisation, lossy decoders), the decoded pieces are aligned onto the original text.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import Any

from moelens.errors import InputError
from moelens.recording.inputs import Document


@dataclass
class Chunk:
    """One sequence to record: at most ``seq_len`` tokens of one document.

    ``tokens[i]`` is the text of token ``i`` (``None`` without a tokenizer), ``special[i]`` the name of a
    special token (else ``None``); ``text`` is ``"".join(tokens)``.
    """

    ids: list[int]
    tokens: list[str | None]
    text: str | None
    label: str | None
    source: str | None
    special: list[str | None] | None = None


def chunk_documents(docs: Iterable[Document], tokenizer: Any, seq_len: int, *, chat: bool = False,
                    add_special_tokens: bool = True, add_generation_prompt: bool = False,
                    counts: Counter | None = None) -> Iterator[Chunk]:
    """Split each document into consecutive chunks of at most ``seq_len`` tokens.

    ``chat`` renders each document with the tokenizer's chat template (its ``messages``, or its text as one
    user turn); the template adds its own BOS, so none is added twice. ``add_special_tokens`` applies to plain
    text only. Documents that yield no token are skipped and counted in ``counts["empty_documents"]``.
    """
    if seq_len < 1:
        raise ValueError("seq_len must be at least 1")
    specials = _SpecialTokens(tokenizer)
    for doc in docs:
        ids, tokens, special = _tokenize(doc, tokenizer, specials, chat=chat, add_special_tokens=add_special_tokens,
                                         add_generation_prompt=add_generation_prompt)
        if not ids:
            if counts is not None:
                counts["empty_documents"] += 1
            continue
        yield from _split(ids, tokens, special, doc, seq_len)


def _tokenize(doc: Document, tokenizer: Any, specials: _SpecialTokens, *, chat: bool, add_special_tokens: bool,
              add_generation_prompt: bool) -> tuple[list[int], list[str | None], list[str | None]]:
    if doc.ids is not None:
        ids = list(doc.ids)
    elif tokenizer is None:
        raise InputError("texts need a tokenizer; pass token ids instead when recording without one")
    elif chat:
        if doc.messages is not None:
            messages = list(doc.messages)
        else:
            messages = [{"role": "user", "content": doc.text}] if doc.text else []
        if not messages:  # an empty document, not a lone BOS
            return [], [], []
        ids = _chat_ids(tokenizer, messages, add_generation_prompt=add_generation_prompt, source=doc.source)
    elif doc.text is None:
        raise InputError(f"document {doc.source} is a chat (it has 'messages' but no text): record it with chat=True "
                         "(moelens record --chat)")
    elif not doc.text:  # an empty document, not a lone BOS
        return [], [], []
    else:
        return encode_text(tokenizer, doc.text, add_special_tokens=add_special_tokens, specials=specials)
    if tokenizer is None:
        return ids, [None] * len(ids), [None] * len(ids)
    tokens, special = decoded_texts(tokenizer, ids, specials=specials)
    return ids, tokens, special


def _split(ids: list[int], tokens: list[str | None], special: list[str | None], doc: Document,
           seq_len: int) -> Iterator[Chunk]:
    n_chunks = (len(ids) + seq_len - 1) // seq_len
    for c in range(n_chunks):
        a, b = c * seq_len, min((c + 1) * seq_len, len(ids))
        source = doc.source if n_chunks == 1 else f"{doc.source}#{c}"
        yield make_chunk(ids[a:b], tokens[a:b], special[a:b], label=doc.label, source=source)


def make_chunk(ids: list[int], tokens: list[str | None], special: list[str | None], *, label: str | None,
               source: str | None) -> Chunk:
    """A chunk whose text is, by construction, the concatenation of its token texts."""
    text = None if any(t is None for t in tokens) else "".join(tokens)
    return Chunk(ids=ids, tokens=tokens, text=text, label=label, source=source, special=special)


def _chat_ids(tokenizer: Any, messages: list, *, add_generation_prompt: bool, source: str | None) -> list[int]:
    """The ids of ``apply_chat_template(tokenize=True)``: the template's own BOS, never a second one."""
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # no template (ValueError), a template's raise_exception (jinja2 TemplateError), ...
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"document {source}: the tokenizer's chat template failed ({reason}); "
                         "record without chat=True (--chat), or give messages the template accepts") from exc
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        out = out["input_ids"]
    out = out.tolist() if hasattr(out, "tolist") else list(out)
    if out and isinstance(out[0], list):
        out = out[0]
    return [int(t) for t in out]


# -- text with offsets ------------------------------------------------------------------------------------


def encode_text(tokenizer: Any, text: str, *, add_special_tokens: bool = True, specials: _SpecialTokens | None = None
                ) -> tuple[list[int], list[str | None], list[str | None]]:
    """Token ids, exact token texts and special-token names for one text (the whole document: we chunk ourselves)."""
    specials = specials or _SpecialTokens(tokenizer)
    try:
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True, verbose=False)
        offsets = enc.get("offset_mapping")  # transformers' Python SentencePiece backend silently omits it
    except (NotImplementedError, ValueError, TypeError):  # slow tokenizers raise; MistralCommonBackend: ValueError
        enc, offsets = None, None
    if offsets is None:
        ids = [int(t) for t in (enc or tokenizer(text, add_special_tokens=add_special_tokens))["input_ids"]]
        pieces, special = decoded_texts(tokenizer, ids, specials=specials, target=text)
        return ids, pieces, special
    ids = [int(t) for t in enc["input_ids"]]
    tokens, special = _texts_from_offsets(ids, offsets, text, specials, tokenizer.convert_ids_to_tokens(ids))
    return ids, tokens, special


def _texts_from_offsets(ids: list[int], offsets: list[tuple[int, int]], text: str, specials: _SpecialTokens,
                        pieces: list[str]) -> tuple[list[str | None], list[str | None]]:
    """Each text token owns the characters from the previous token's end to its own end.

    Tokens sharing one character's span (byte pieces) leave it to the first; characters no token claims
    (trailing whitespace a pre-tokenizer dropped) go to the last text token. A special token spells nothing,
    even where its offsets cover the literal ``<s>`` it was parsed from, and so does SentencePiece's
    synthetic word-start ``▁`` (its offsets are the next character's: ``▁`` + ``中`` for a text starting "中").
    """
    tokens: list[str | None] = []
    special: list[str | None] = []
    prev_end, last_text, carry = 0, None, ""
    for i, (tid, (start, end)) in enumerate(zip(ids, offsets)):
        if (pieces[i] == "\u2581" and i + 1 < len(ids) and tuple(offsets[i + 1]) == (start, end) and start < end
                and not text[start].isspace()):
            tokens.append("")
            special.append(None)
            continue
        name = specials.name(tid)
        if name is not None and (start == end or text[start:end].strip() == name.strip()):
            unclaimed = text[prev_end:start] if start > prev_end else ""
            if last_text is None:
                carry += unclaimed
            else:
                tokens[last_text] += unclaimed
            prev_end = max(prev_end, end)
            tokens.append("")
            special.append(name)
            continue
        end = max(end, prev_end)
        tokens.append(carry + text[prev_end:end])
        special.append(None)
        prev_end, last_text, carry = end, i, ""
    if last_text is not None and prev_end < len(text):
        tokens[last_text] += text[prev_end:]
    return tokens, special


# -- text by decoding -------------------------------------------------------------------------------------


def decoded_texts(tokenizer: Any, ids: list[int], *, start: int = 0, target: str | None = None,
                  specials: _SpecialTokens | None = None) -> tuple[list[str], list[str | None]]:
    """Texts and special names of ``ids[start:]``, decoded in the context of everything before them.

    Without ``target``, the texts concatenate to exactly what ``ids[start:]`` add to
    ``tokenizer.decode(ids)`` (special tokens skipped); with it, they are aligned onto ``target`` (the original
    text) and concatenate to it exactly.
    """
    specials = specials or _SpecialTokens(tokenizer)
    names = [specials.name(t) for t in ids]
    text_ids = [t for t, n in zip(ids, names) if n is None]
    first = sum(n is None for n in names[:start])
    pieces = _context_pieces(specials.decode, text_ids, first)
    if target is None:
        whole, before = specials.decode(text_ids), specials.decode(text_ids[:first])
        target = whole[len(os.path.commonprefix([before, whole])):]
    pieces = aligned(pieces, target)
    it = iter(pieces)
    texts = ["" if n is not None else next(it) for n in names[start:]]
    return texts, names[start:]


def _context_pieces(decode: Callable[[list[int]], str], ids: list[int], start: int) -> list[str]:
    """What each of ``ids[start:]`` adds to the decoding, from short windows (cost linear in the length).

    The window begins at the previous token group, so decoder artefacts at its start (SentencePiece drops a
    leading space) cancel out. A token that leaves an incomplete character (the decoding ends in U+FFFD)
    waits for the tokens that complete it; the character then goes to the group's first token.
    """
    pieces: list[str] = []
    prefix, read = max(0, start - 4), start
    before = decode(ids[prefix:read])
    group: list[int] = []
    for i in range(start, len(ids)):
        pieces.append("")
        group.append(len(pieces) - 1)
        after = decode(ids[prefix:i + 1])
        if after.endswith("\ufffd") and i + 1 < len(ids):
            continue
        if len(after) > len(before):
            pieces[group[0]] = after[len(before):]
        group = []
        prefix, read = read, i + 1
        before = decode(ids[prefix:read])
    return pieces


def aligned(pieces: list[str], target: str) -> list[str]:
    """Re-cut ``target`` into ``len(pieces)`` consecutive spans that follow ``pieces`` as closely as possible.

    Used where the decoded pieces differ from the original text (normalised characters, ``<0x09>`` for a tab
    from a lossy decoder, a stripped space): matching stretches map one to one, a differing stretch goes to
    the tokens that decoded it, the first of them taking the first characters. The spans always concatenate to
    ``target``.
    """
    source = "".join(pieces)
    if source == target or not pieces:
        return pieces
    segments = _alignment(source, target)
    out: list[str] = []
    prev, at, seg = 0, 0, 0
    for k, piece in enumerate(pieces):
        at += len(piece)
        if k == len(pieces) - 1:
            end = len(target)
        else:
            while seg < len(segments) - 1 and segments[seg][1] < at:
                seg += 1
            end = max(prev, _map_position(segments, seg, at))
        out.append(target[prev:end])
        prev = end
    return out


def _map_position(segments: list[tuple[int, int, int, int, bool]], seg: int, j: int) -> int:
    """Target position of source position ``j`` (the furthest segment containing it wins, so insertions
    attach to the token before them)."""
    best = 0
    for a1, a2, b1, b2, equal in segments[seg:]:
        if a1 > j:
            break
        if equal:
            best = max(best, b1 + (j - a1))
        elif j == a2:
            best = max(best, b2)
        else:
            best = max(best, b1 + min(j - a1, b2 - b1))
    return best


_BAND = 256


def _alignment(source: str, target: str) -> list[tuple[int, int, int, int, bool]]:
    """``(a1, a2, b1, b2, equal)`` segments covering both strings, in order.

    Equal stretches are found by direct comparison; only around a difference does `difflib` run, on a band
    of a few hundred characters, so long documents with scattered differences stay linear.
    """
    segments: list[tuple[int, int, int, int, bool]] = []
    i = j = 0
    n, m = len(source), len(target)
    while i < n and j < m:
        k = _common_length(source, i, target, j)
        if k:
            segments.append((i, i + k, j, j + k, True))
            i, j = i + k, j + k
            continue
        # the strings differ at (i, j): the band's first opcode is the differing stretch
        _, _, a2, _, b2 = SequenceMatcher(None, source[i:i + _BAND], target[j:j + _BAND], autojunk=False).get_opcodes()[0]
        segments.append((i, i + a2, j, j + b2, False))
        i, j = i + a2, j + b2
    if i < n or j < m:
        segments.append((i, n, j, m, False))
    return segments


def _common_length(a: str, i: int, b: str, j: int, step: int = 4096) -> int:
    k = 0
    while True:
        same = len(os.path.commonprefix([a[i + k:i + k + step], b[j + k:j + k + step]]))
        k += same
        if same < step:
            return k


class _SpecialTokens:
    """Which ids are special tokens (they spell no text), their names, and a plain ``decode``.

    transformers' Python SentencePiece backend decodes byte-fallback pieces as ``<0x09>`` and strips
    trailing spaces; its own SentencePiece model decodes them right, so that is used for ids it knows.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._names: dict[int, str] = {}
        self._sp_model = None
        if tokenizer is None:
            return
        if getattr(tokenizer, "backend", None) == "sentencepiece" and hasattr(getattr(tokenizer, "sp_model", None), "decode"):
            self._sp_model = tokenizer.sp_model
        ids = set(getattr(tokenizer, "all_special_ids", None) or [])
        try:
            added = getattr(tokenizer, "added_tokens_decoder", None) or {}
            ids |= {int(i) for i, tok in added.items() if getattr(tok, "special", False)}
        except (NotImplementedError, AttributeError, TypeError):  # MistralCommonBackend has no added tokens
            pass
        for tid in ids:
            self._names[int(tid)] = str(tokenizer.convert_ids_to_tokens(int(tid)))

    def name(self, token_id: int) -> str | None:
        return self._names.get(token_id)

    def decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self._sp_model is not None and max(ids) < self._sp_model.get_piece_size():
            return self._sp_model.decode(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
