"""Build the demo corpus: five labelled domains, a document-level held-out split, gzipped JSONL + manifest.

Run ``python -m moelens.demo.corpus`` to rebuild ``moelens/demo/data``. The output is deterministic: the same
inputs give byte-identical files (gzip with mtime 0, fixed key order, no timestamps in the manifest), and the
manifest records, per domain, the hash of the inputs read and of the records written, so a rebuild on
another machine can tell which domains it can reproduce.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import platform
import time
import zlib
from pathlib import Path

from moelens.demo import DATA_DIR, DOMAINS
from moelens.demo.documents import Document, DomainDocs
from moelens.demo.mathgen import math_docs
from moelens.demo.multilingual import DJANGO_WHEEL, find_django_wheel, multilingual_docs
from moelens.demo.stdlib_sources import c_docs, english_docs, python_docs
from moelens.errors import InputError

SPLITS = ("train", "heldout")
HELDOUT_FRACTION = 0.10
HELDOUT_RULE = (
    "int(sha1(f'{domain}:{id}')[:8], 16) / 0xFFFFFFFF < 0.10; "
    "a multilingual language with none gives its lowest-scoring document"
)
MANIFEST = "MANIFEST.json"


def heldout_score(domain: str, doc_id: str) -> float:
    """A stable pseudo-random number in [0, 1] per document: the split survives documents coming and going."""
    digest = hashlib.sha1(f"{domain}:{doc_id}".encode()).hexdigest()
    return int(digest[:8], 16) / 0xFFFFFFFF


def split_docs(docs: list[Document]) -> dict[str, list[Document]]:
    """Document-level split: held-out when the score is below 0.10.

    A (domain, group) left without held-out text (a language whose few documents all drew high scores)
    gives its lowest-scoring document, so every language can be evaluated. Order follows the source.
    """
    scores = {(d.domain, d.id): heldout_score(d.domain, d.id) for d in docs}
    heldout = {key for key, score in scores.items() if score < HELDOUT_FRACTION}
    groups: dict[tuple[str, str], list[Document]] = {}
    for doc in docs:
        groups.setdefault((doc.domain, doc.group), []).append(doc)
    for members in groups.values():
        keys = [(d.domain, d.id) for d in members]
        if not heldout.intersection(keys):
            heldout.add(min(keys, key=scores.__getitem__))
    out: dict[str, list[Document]] = {split: [] for split in SPLITS}
    for doc in docs:
        out["heldout" if (doc.domain, doc.id) in heldout else "train"].append(doc)
    return out


def jsonl_bytes(docs: list[Document]) -> bytes:
    """UTF-8 JSON Lines, compact and with a fixed key order."""
    lines = (json.dumps(d.as_record(), ensure_ascii=False, separators=(",", ":")) + "\n" for d in docs)
    return "".join(lines).encode("utf-8")


def collect_domain(domain: str, *, django_wheel: Path | None = None) -> DomainDocs:
    """Read one domain's sources. ``multilingual`` needs the pinned Django wheel."""
    if domain == "multilingual":
        if django_wheel is None:
            raise InputError("the multilingual domain needs the Django wheel: see find_django_wheel()")
        return multilingual_docs(django_wheel)
    builders = {"python": python_docs, "c": c_docs, "english": english_docs, "math": math_docs}
    if domain not in builders:
        raise InputError(f"unknown demo domain {domain!r}; expected one of {DOMAINS}")
    return builders[domain]()


def domain_entry(dd: DomainDocs) -> dict:
    """A domain's manifest entry: its input fingerprint and, per split, counts and the hash of its records."""
    entry: dict = {"description": dd.description, "inputs_sha256": dd.inputs_sha256}
    for split, docs in split_docs(dd.docs).items():
        entry[split] = {
            "docs": len(docs),
            "chars": sum(len(d.text) for d in docs),
            "records_sha256": hashlib.sha256(jsonl_bytes(docs)).hexdigest(),
        }
    return entry


def build_corpus(out_dir: Path = DATA_DIR, *, django_wheel: Path | None = None) -> dict:
    """Build all domains into ``out_dir`` (train/held-out ``.jsonl.gz`` and MANIFEST.json); returns the manifest.

    Without ``django_wheel`` the wheel is looked up in the moelens cache and downloaded with pip if missing.
    """
    wheel = django_wheel or find_django_wheel(download=True)
    if wheel is None:
        raise InputError(f"cannot find or download {DJANGO_WHEEL} (pip download --no-deps django==5.2.19)")
    return write_corpus([collect_domain(d, django_wheel=wheel) for d in DOMAINS], out_dir)


def write_corpus(collected: list[DomainDocs], out_dir: Path) -> dict:
    """Split, write the gzipped JSONL files and the manifest (no timestamps: rebuilds are byte-identical)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict = {
        "format": 1,
        "heldout_rule": HELDOUT_RULE,
        "built_with": {"python": platform.python_version(), "zlib": zlib.ZLIB_RUNTIME_VERSION},
        "files": {},
        "domains": {dd.domain: domain_entry(dd) for dd in collected},
    }
    for split in SPLITS:
        docs = [doc for dd in collected for doc in split_docs(dd.docs)[split]]
        raw = jsonl_bytes(docs)
        packed = gzip.compress(raw, compresslevel=9, mtime=0)
        name = f"{split}.jsonl.gz"
        (out_dir / name).write_bytes(packed)
        manifest["files"][name] = {
            "sha256": hashlib.sha256(packed).hexdigest(),
            "content_sha256": hashlib.sha256(raw).hexdigest(),
            "bytes": len(packed),
            "docs": len(docs),
            "chars": sum(len(d.text) for d in docs),
        }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Rebuild the moelens demo corpus.")
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="output folder (default: the shipped data)")
    parser.add_argument("--django-wheel", type=Path, help=f"path to {DJANGO_WHEEL}")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    manifest = build_corpus(args.out, django_wheel=args.django_wheel)
    for name, info in manifest["files"].items():
        print(f"{name}: {info['docs']} docs, {info['chars']:,} chars, {info['bytes']:,} bytes")
    for domain, entry in manifest["domains"].items():
        print(
            f"  {domain:13s} train {entry['train']['docs']:4d} docs {entry['train']['chars']:>9,} chars | "
            f"held-out {entry['heldout']['docs']:3d} docs {entry['heldout']['chars']:>7,} chars"
        )
    print(f"built in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
