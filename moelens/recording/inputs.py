"""Turn what users have (texts, token ids, files, folders, datasets) into labelled `Document`s.

Everything is streamed: a folder of files or a large JSONL is read one document at a time, so the
recorder's memory stays bounded by its batch and flush sizes, not by the corpus.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moelens.errors import InputError

TEXT_SUFFIXES = {".txt", ".md", ".py", ".c", ".h", ".rst", ".text"}


@dataclass(frozen=True)
class Document:
    """One input document: text, pre-tokenized ids or chat ``messages``, with an optional label and a source name.

    ``messages`` (``[{"role": ..., "content": ...}, ...]``) is rendered with the tokenizer's chat template when
    recording with ``chat=True``; plain text then becomes one user turn.
    """

    text: str | None = None
    ids: tuple[int, ...] | None = None
    label: str | None = None
    source: str | None = None
    messages: tuple[dict, ...] | None = None

    def __post_init__(self) -> None:
        if self.text is None and self.ids is None and self.messages is None:
            raise InputError("a document needs text, token ids or chat messages")


def documents(inputs: Any, labels: Sequence[str | None] | str | None = None, *, text_field: str = "text",
              label_field: str | None = "label") -> Iterator[Document]:
    """Normalise the accepted input forms into documents.

    Accepted: a string; a list of strings; a list of token-id lists (or 1-D tensors/arrays, or the
    ``{"input_ids": ...}`` that ``apply_chat_template(tokenize=True)`` returns); dicts with ``text_field`` /
    ``label_field`` (or a chat ``messages`` list); `Document`s; a Hugging Face ``datasets.Dataset``. ``labels``
    is one label for all documents or one per document.
    """
    if isinstance(inputs, (str, Document, Mapping)) or _is_id_sequence(inputs):  # one document
        inputs = [inputs]
    per_doc = labels if labels is not None and not isinstance(labels, str) else None
    for i, item in enumerate(inputs):
        label = per_doc[i] if per_doc is not None else labels
        doc = _document(item, label, text_field=text_field, label_field=label_field, index=i)
        yield doc


def _document(item: Any, label: str | None, *, text_field: str, label_field: str | None, index: int) -> Document:
    if isinstance(item, Document):
        return item if label is None else dataclasses.replace(item, label=label)
    if isinstance(item, str):
        return Document(text=item, label=label, source=f"text[{index}]")
    if isinstance(item, Mapping) and text_field not in item and "input_ids" in item:  # apply_chat_template output
        return Document(ids=tuple(int(t) for t in _flat_ids(item["input_ids"])), label=label, source=f"ids[{index}]")
    if isinstance(item, dict):
        messages = item.get("messages")
        if text_field not in item and messages is None:
            raise InputError(f"record {index} has no field {text_field!r} (fields: {sorted(item)}); set --text-field")
        if messages is not None and not (isinstance(messages, list) and all(isinstance(m, dict) for m in messages)):
            raise InputError(f"record {index}: 'messages' must be a list of {{\"role\": ..., \"content\": ...}} objects")
        item_label = item.get(label_field) if label_field else None
        return Document(
            text=None if text_field not in item else str(item[text_field]),
            label=label if label is not None else (None if item_label is None else str(item_label)),
            source=str(item.get("id", item.get("source", f"record[{index}]"))),
            messages=None if messages is None else tuple(messages),
        )
    if _is_id_sequence(item):
        return Document(ids=tuple(int(t) for t in _flat_ids(item)), label=label, source=f"ids[{index}]")
    raise InputError(f"cannot record input {index} of type {type(item).__name__}; give text, token ids or dicts")


def _flat_ids(item: Any) -> list[int]:
    if hasattr(item, "tolist"):
        item = item.tolist()
    if item and isinstance(item[0], list):  # a [1, T] tensor
        if len(item) != 1:
            raise InputError("pass a list of 1-D token-id sequences, not a 2-D batch")
        item = item[0]
    return list(item)


def _is_id_sequence(item: Any) -> bool:
    if hasattr(item, "dtype") and hasattr(item, "ndim"):
        return item.ndim in (1, 2) and "int" in str(item.dtype)
    return isinstance(item, (list, tuple)) and len(item) > 0 and all(isinstance(t, int) for t in item)


# -- files -------------------------------------------------------------------------------------------


def read_paths(paths: Iterable[str | Path], *, text_field: str = "text", label_field: str | None = None,
               label: str | None = None) -> Iterator[Document]:
    """Documents from files and folders.

    * ``.txt`` (and other plain-text suffixes): one document per file.
    * ``.jsonl``: one document per line, text in ``text_field``, label in ``label_field``.
    * ``.csv`` / ``.parquet``: one document per row, same field names as columns.
    * a folder: every readable file below it, labelled by its first sub-folder's name (``data/code/a.py`` → ``code``).
    * ``hf:NAME[:SPLIT]``: a Hugging Face dataset (needs the ``datasets`` package and its cache or the hub).
    """
    paths = check_paths(paths)
    for raw in paths:
        spec = str(raw)
        if spec.startswith("hf:"):
            yield from _hf_dataset(spec[3:], text_field=text_field, label_field=label_field, label=label)
            continue
        path = Path(spec)
        if path.is_dir():
            yield from _folder(path, text_field=text_field, label_field=label_field, label=label)
        else:
            yield from _file(path, text_field=text_field, label_field=label_field, label=label)


def check_paths(paths: Iterable[str | Path]) -> list[str | Path]:
    """Fail before any model is loaded if an input path is missing."""
    paths = list(paths)
    if not paths:
        raise InputError("no input given: pass files, folders, --text strings or hf:DATASET")
    for raw in paths:
        if not str(raw).startswith("hf:") and not Path(raw).exists():
            raise InputError(f"input {raw} does not exist (check the path; hub datasets are written hf:NAME)")
    return paths


def _folder(root: Path, *, text_field: str, label_field: str | None, label: str | None) -> Iterator[Document]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise InputError(f"folder {root} has no files to record")
    for path in files:
        rel = path.relative_to(root)
        folder_label = rel.parts[0] if len(rel.parts) > 1 else None
        yield from _file(path, text_field=text_field, label_field=label_field, label=label or folder_label)


def _file(path: Path, *, text_field: str, label_field: str | None, label: str | None) -> Iterator[Document]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or suffix == ".ndjson":
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{path}:{n + 1} is not valid JSON ({exc.msg})") from exc
                doc = _document(record, label, text_field=text_field, label_field=label_field or "label", index=n)
                yield dataclasses.replace(doc, source=f"{path.name}:{n + 1}")
    elif suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as fh:
            for n, row in enumerate(csv.DictReader(fh)):
                doc = _document(row, label, text_field=text_field, label_field=label_field or "label", index=n)
                yield dataclasses.replace(doc, source=f"{path.name}:{n + 2}")
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise InputError(f"{path} has no column {text_field!r} (columns: {table.column_names}); set --text-field")
        for n, row in enumerate(table.to_pylist()):
            doc = _document(row, label, text_field=text_field, label_field=label_field or "label", index=n)
            yield dataclasses.replace(doc, source=f"{path.name}:{n}")
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{path} is not UTF-8 text; convert it or pass a .jsonl/.csv/.parquet file") from exc
        yield Document(text=text, label=label, source=str(path))


def _hf_dataset(spec: str, *, text_field: str, label_field: str | None, label: str | None) -> Iterator[Document]:
    try:
        import datasets
    except ImportError as exc:
        raise InputError("hf: inputs need the 'datasets' package: pip install 'moelens[datasets]'") from exc
    name, _, split = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # datasets raises many types (offline, missing split, ...)
        raise InputError(f"could not load dataset {name!r} split {split or 'train'!r}: {exc}") from exc
    yield from documents(ds, label, text_field=text_field, label_field=label_field)
