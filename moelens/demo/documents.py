"""The record every demo corpus source produces, and the fingerprint of what a source read.

Each domain's builder returns a :class:`DomainDocs`: its documents plus a sha256 over exactly the inputs
it consumed. The manifest stores that hash, so a rebuild on another machine can tell *before comparing
outputs* whether it read the same bytes (CPython's stdlib and headers differ between builds).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Document:
    """One labelled corpus document. ``id`` is unique within its domain and stable across rebuilds.

    ``group`` (the language, for multilingual) only steers the split: every group gets held-out text.
    """

    id: str
    domain: str
    source: str
    license: str
    text: str
    group: str = ""

    def as_record(self) -> dict[str, str]:
        """The JSONL record; the key order is fixed so that rebuilds are byte-identical."""
        return {
            "id": self.id,
            "domain": self.domain,
            "source": self.source,
            "license": self.license,
            "text": self.text,
        }


class InputHasher:
    """sha256 over ``(name, sha256(bytes))`` pairs in the order a source consumed them.

    Hashing names as well as bytes matters: the python domain takes files in a fixed order until a
    character budget is spent, so the same bytes under another path would yield a different corpus.
    """

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def add(self, name: str, data: bytes) -> None:
        self._h.update(f"{name}\0{hashlib.sha256(data).hexdigest()}\n".encode())

    def hexdigest(self) -> str:
        return self._h.hexdigest()


@dataclass
class DomainDocs:
    """A domain's documents and the fingerprint of the inputs they were made from."""

    domain: str
    description: str
    inputs_sha256: str
    docs: list[Document] = field(default_factory=list)


def chunk_text(text: str, size: int, sep: str = "\n\n") -> list[str]:
    """Cut text at ``sep`` boundaries (paragraphs by default) into pieces of about ``size`` characters.

    Several documents per long text make the document-level held-out split finer-grained. A piece longer
    than ``size`` stays whole: cutting mid-sentence would only add noise.
    """
    chunks: list[str] = []
    current: list[str] = []
    length = 0
    for piece in text.split(sep):
        if current and length + len(piece) > size:
            chunks.append(sep.join(current))
            current, length = [], 0
        current.append(piece)
        length += len(piece) + len(sep)
    if current:
        chunks.append(sep.join(current))
    return [c for c in chunks if c.strip()]
