"""Demo domains read from the running CPython and the Debian base system: python, c and english.

These bytes differ between CPython builds (Debian's system Python vs pyenv) and releases, which is why the
built corpus is shipped and each domain records the hash of what it read.
"""

from __future__ import annotations

import hashlib
import platform
import sysconfig
from pathlib import Path

from moelens.demo.documents import Document, DomainDocs, InputHasher, chunk_text

#: Top-level stdlib folders left out: tests, generated data (encodings tables, pydoc topics, which feed the
#: english domain), GUI code and deprecated or vendored packages that would dominate by sheer size.
EXCLUDED_TOP_DIRS = frozenset(
    {
        "test",
        "encodings",
        "pydoc_data",
        "idlelib",
        "tkinter",
        "turtledemo",
        "lib2to3",
        "distutils",
        "ensurepip",
        "site-packages",
    }
)
#: Test folders nested inside packages (``unittest/test``, ``ctypes/test``...) are boilerplate too.
EXCLUDED_ANY_DIRS = frozenset({"test", "tests", "__pycache__"})

PYTHON_FILE_CHARS = 30_000
PYTHON_TOTAL_CHARS = 1_500_000
ENGLISH_CHUNK_CHARS = 8_000
COMMON_LICENSES = Path("/usr/share/common-licenses")

PSF = "PSF-2.0"
CPYTHON = f"cpython-{platform.python_version()}"


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _python_candidates(root: Path) -> list[tuple[str, Path]]:
    """Stdlib ``.py`` files as (posix relative path, path), ordered by sha1 of the relative path.

    Hash order spreads the budget over the whole stdlib instead of taking packages alphabetically.
    """
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        parts = rel.parts
        if parts[0] in EXCLUDED_TOP_DIRS or EXCLUDED_ANY_DIRS.intersection(parts[:-1]):
            continue
        found.append((rel.as_posix(), path))
    return sorted(found, key=lambda item: hashlib.sha1(item[0].encode()).hexdigest())


def python_docs() -> DomainDocs:
    """Stdlib modules, each cut to 30,000 characters, taken in hash order until 1.5 M characters."""
    hasher = InputHasher()
    docs: list[Document] = []
    total = 0
    for rel, path in _python_candidates(_stdlib()):
        if total >= PYTHON_TOTAL_CHARS:
            break
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")[:PYTHON_FILE_CHARS]
        except UnicodeDecodeError:
            continue
        if not text.strip():
            continue
        hasher.add(rel, data)
        docs.append(Document(rel, "python", f"{CPYTHON} Lib/{rel}", PSF, text))
        total += len(text)
    return DomainDocs("python", f"{CPYTHON} standard library *.py", hasher.hexdigest(), docs)


def c_docs() -> DomainDocs:
    """CPython's public and internal C headers, one document per header."""
    root = Path(sysconfig.get_paths()["include"])
    hasher = InputHasher()
    docs: list[Document] = []
    for path in sorted(root.rglob("*.h"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root).as_posix()
        data = path.read_bytes()
        text = data.decode("utf-8", errors="replace")
        hasher.add(rel, data)
        docs.append(Document(rel, "c", f"{CPYTHON} Include/{rel}", PSF, text))
    return DomainDocs("c", f"{CPYTHON} C headers", hasher.hexdigest(), docs)


def _english_inputs() -> list[tuple[str, str, str, bytes, str]]:
    """(name, source, licence, raw bytes, text) for every English input, in a fixed order."""
    import pydoc_data.topics

    topics_file = Path(pydoc_data.topics.__file__)
    topics = pydoc_data.topics.topics
    topics_text = "\n\n".join(topics[key].strip() for key in sorted(topics))
    inputs = [("pydoc_topics", f"{CPYTHON} pydoc_data/topics.py", PSF, topics_file.read_bytes(), topics_text)]
    if COMMON_LICENSES.is_dir():
        # Symlinks (GPL -> GPL-3 ...) would duplicate texts.
        for path in sorted(p for p in COMMON_LICENSES.iterdir() if p.is_file() and not p.is_symlink()):
            data = path.read_bytes()
            inputs.append(
                (
                    f"common-licenses/{path.name}",
                    f"debian {path}",
                    "verbatim copying permitted",
                    data,
                    data.decode("utf-8", errors="replace"),
                )
            )
    licence = _stdlib() / "LICENSE.txt"
    if licence.is_file():
        data = licence.read_bytes()
        inputs.append(("LICENSE.txt", f"{CPYTHON} LICENSE.txt", PSF, data, data.decode("utf-8")))
    return inputs


def english_docs() -> DomainDocs:
    """Python's pydoc topic help, Debian's common licences and CPython's LICENSE, in ~8 K-char chunks."""
    hasher = InputHasher()
    docs: list[Document] = []
    for name, source, licence, data, text in _english_inputs():
        hasher.add(name, data)
        for i, chunk in enumerate(chunk_text(text, ENGLISH_CHUNK_CHARS)):
            docs.append(Document(f"{name}#{i:03d}", "english", source, licence, chunk))
    return DomainDocs(
        "english", f"{CPYTHON} pydoc topics + LICENSE.txt, Debian common-licenses", hasher.hexdigest(), docs
    )
