"""The bundled demo: a labelled five-domain corpus and a small trained OLMoE-style model, both offline.

Everything here is shipped inside the package so that ``moelens`` can be tried on a fresh machine with no
network: the corpus is stored already built (its stdlib sources differ between CPython builds), and the
model folders are standard Hugging Face folders. Importing this module is cheap: no torch.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

__all__ = ["DATA_DIR", "DEMO_EARLY_DIR", "DEMO_MODEL_DIR", "DOMAINS", "load_corpus", "model_path"]

_HERE = Path(__file__).resolve().parent

#: The domain labels, in the order used everywhere (tables, manifest, corpus files).
DOMAINS: tuple[str, ...] = ("python", "c", "english", "math", "multilingual")
#: The built corpus: ``train.jsonl.gz``, ``heldout.jsonl.gz`` and ``MANIFEST.json``.
DATA_DIR = _HERE / "data"
#: The trained model (bf16 safetensors + tokenizer); load with ``AutoModelForCausalLM.from_pretrained``.
DEMO_MODEL_DIR = _HERE / "model"
#: A checkpoint of the same run early in training (about 15 % of the steps), for before/after comparisons.
DEMO_EARLY_DIR = _HERE / "checkpoints" / "early"


def model_path(spec: str) -> str:
    """The folder a model spec names: ``demo`` / ``demo:early`` are the bundled model and its early checkpoint;
    anything else (a folder, a hub id, ``tiny:TYPE``) is returned as it is."""
    return {"demo": str(DEMO_MODEL_DIR), "demo:early": str(DEMO_EARLY_DIR)}.get(spec, spec)


def load_corpus(split: str = "heldout") -> list[dict]:
    """The shipped corpus documents of one split (``"heldout"`` or ``"train"``).

    Each record has ``id``, ``domain`` (one of :data:`DOMAINS`), ``source``, ``license`` and ``text``.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    with gzip.open(DATA_DIR / f"{split}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]
