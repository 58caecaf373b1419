"""The multilingual domain: translated UI strings (``msgstr``) from Django's pinned wheel.

The wheel is the one offline-reproducible source of natural text in many languages: its bytes are the same
everywhere, pinned by sha256 below. Django is never imported: the ``.po`` files are read from the zip.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from moelens.demo.documents import Document, DomainDocs, chunk_text
from moelens.errors import InputError

DJANGO_VERSION = "5.2.19"
DJANGO_WHEEL = f"django-{DJANGO_VERSION}-py3-none-any.whl"
DJANGO_WHEEL_SHA256 = "5965d974a5218a2b68a11dd1276434707f23886525c23f0598eccedaf4f4ca00"
#: Ten languages with Latin, accented-Latin and Cyrillic scripts: enough variety for experts to split by
#: script, few enough that each language has real weight.
LANGUAGES = ("de", "fr", "es", "it", "pt_BR", "nl", "pl", "ru", "sv", "cs")
#: Django's core catalogue is ~30 K characters per language; pieces of ~2 K make the held-out split even.
CHUNK_CHARS = 2_000

_PO_PATH = re.compile(
    r"^django/(?:(?P<comp>contrib/\w+)/)?(?:conf/)?locale/(?P<lang>[\w@]+)/LC_MESSAGES/(?P<dom>\w+)\.po$"
)
_ESCAPES = {"n": "\n", "t": "\t", '"': '"', "\\": "\\", "r": "\r"}


def default_cache_dir() -> Path:
    """Where a downloaded wheel is kept, so that later (offline) rebuilds and tests find it."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moelens" / "demo-sources"


def _is_pinned_wheel(path: Path) -> bool:
    return path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == DJANGO_WHEEL_SHA256


def find_django_wheel(search_dirs: list[Path] | None = None, *, download: bool = False) -> Path | None:
    """The pinned Django wheel from ``search_dirs`` or the moelens cache, else (if asked) via ``pip download``.

    Returns None when it is not available; a file with the right name but other bytes is ignored.
    """
    dirs = [*(search_dirs or []), default_cache_dir()]
    for folder in dirs:
        candidate = Path(folder) / DJANGO_WHEEL
        if _is_pinned_wheel(candidate):
            return candidate
    if not download:
        return None
    cache = default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"django=={DJANGO_VERSION}", "-d", tmp]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True)
        fetched = Path(tmp) / DJANGO_WHEEL
        if done.returncode != 0 or not _is_pinned_wheel(fetched):
            return None
        target = cache / DJANGO_WHEEL
        fetched.replace(target)
    return target


def _unquote(literal: str) -> str:
    """Decode one C-style quoted ``.po`` string literal (without its quotes)."""
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), literal)


def po_msgstrs(po_text: str) -> list[str]:
    """The non-empty translations of a ``.po`` file, in file order; the header entry is skipped.

    Plural forms (``msgstr[n]``) each count as one translation. Obsolete (``#~``) entries are comments.
    """
    out: list[str] = []
    current: list[str] | None = None
    msgid_empty = False
    in_msgid = False

    def flush() -> None:
        if current is not None and not msgid_empty:
            text = "".join(current)
            if text.strip():
                out.append(text)

    for raw in po_text.splitlines():
        line = raw.strip()
        if line.startswith("msgid "):
            flush()
            current = None
            in_msgid = True
            msgid_empty = line == 'msgid ""'
        elif line.startswith("msgid_plural"):
            in_msgid = False
        elif line.startswith("msgstr"):
            flush()
            in_msgid = False
            current = [_unquote(line.split(" ", 1)[1][1:-1])]
        elif line.startswith('"'):
            if in_msgid:
                msgid_empty = msgid_empty and line == '""'
            elif current is not None:
                current.append(_unquote(line[1:-1]))
    flush()
    return out


def multilingual_docs(wheel: Path) -> DomainDocs:
    """The translations of each chosen language's ``.po`` files, one per line, in ~2 K-character documents."""
    if not _is_pinned_wheel(wheel):
        raise InputError(f"{wheel} is not the Django {DJANGO_VERSION} wheel (sha256 {DJANGO_WHEEL_SHA256[:12]}...)")
    docs: list[Document] = []
    with zipfile.ZipFile(wheel) as zf:
        for name in sorted(zf.namelist()):
            m = _PO_PATH.match(name)
            if not m or m["lang"] not in LANGUAGES:
                continue
            strings = po_msgstrs(zf.read(name).decode("utf-8"))
            component = m["comp"] or "conf"
            source = f"django-{DJANGO_VERSION} {name}"
            for i, chunk in enumerate(chunk_text("\n".join(strings), CHUNK_CHARS, sep="\n")):
                doc_id = f"{m['lang']}/{component}/{m['dom']}#{i:02d}"
                docs.append(Document(doc_id, "multilingual", source, "BSD-3-Clause", chunk + "\n", m["lang"]))
    return DomainDocs(
        "multilingual", f"Django {DJANGO_VERSION} wheel .po msgstr ({', '.join(LANGUAGES)})", DJANGO_WHEEL_SHA256, docs
    )
