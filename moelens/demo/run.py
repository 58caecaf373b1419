"""The demo recording: the bundled model over its held-out corpus, and the summary `moelens demo --no-app` prints.

Three runs land in the store, each named so a second `moelens demo` reuses them instead of recording again:
the early checkpoint over the held-out corpus (a real pair for run-vs-run agreement and router saturation),
a few greedy generations from one prompt per domain, and the trained model over the held-out corpus
(labelled by domain). The last is recorded last so the workbench opens on it (it shows the newest run).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from moelens.store import TraceStore

RUN_HELDOUT = "demo: held-out corpus"
RUN_GENERATIONS = "demo: generations"
RUN_EARLY = "demo: early checkpoint, held-out corpus"

#: One prompt per domain for the generation run.
PROMPTS = {
    "python": "def fibonacci(n):\n    ",
    "c": "static int\nlist_append(PyListObject *self, PyObject *v)\n{\n    ",
    "english": "The Python Software Foundation is",
    "math": "12 + 35 = 47\n81 - 19 = ",
    "multilingual": "Veuillez saisir un nom d'utilisateur",
}

log = logging.getLogger(__name__)


def run_demo(db: str | Path, *, max_tokens: int | None = None, again: bool = False, seq_len: int = 256,
             progress: bool = True, maps: bool = True) -> dict[str, int]:
    """Record the demo runs (unless present, or ``again``), compute the Map page's expert maps (``maps``) and
    return ``{run name: run id}``; steps are logged."""
    from moelens.demo import DEMO_EARLY_DIR, DEMO_MODEL_DIR, load_corpus
    from moelens.recording.loading import load_model
    from moelens.recording.record import record

    store = TraceStore(db)
    existing = store.runs(status="complete")
    have = dict(zip(existing["name"], existing["run_id"])) if not again else {}
    docs = _interleaved(load_corpus("heldout"), head_chars=None if max_tokens is None else 4 * seq_len)
    runs: dict[str, int] = {}
    model, tok = load_model(DEMO_MODEL_DIR, dtype="float32")
    common = dict(store=store, seq_len=seq_len, batch_size=8, max_tokens=max_tokens, progress=progress)
    if RUN_EARLY in have:
        runs[RUN_EARLY] = int(have[RUN_EARLY])
    else:
        log.info("recording the early checkpoint over %d held-out documents ...", len(docs))
        early, early_tok = load_model(DEMO_EARLY_DIR, dtype="float32")
        runs[RUN_EARLY] = record(early, early_tok, docs, name=RUN_EARLY, model_name="moelens-demo (early checkpoint)",
                                 **common)
    if RUN_GENERATIONS in have:
        runs[RUN_GENERATIONS] = int(have[RUN_GENERATIONS])
    else:
        log.info("recording greedy generations ...")
        runs[RUN_GENERATIONS] = record(model, tok, list(PROMPTS.values()), labels=list(PROMPTS), generate=32,
                                       name=RUN_GENERATIONS, model_name="moelens-demo", store=store, progress=progress)
    if RUN_HELDOUT in have:
        runs[RUN_HELDOUT] = int(have[RUN_HELDOUT])
    else:
        log.info("recording the demo model over %d held-out documents ...", len(docs))
        runs[RUN_HELDOUT] = record(model, tok, docs, name=RUN_HELDOUT, model_name="moelens-demo", **common)
    from moelens.analysis.summaries import summarize  # recording never imports analysis; the demo does

    for name, run_id in runs.items():
        if name not in have:
            summarize(store, run_id)
    if maps:
        from moelens.analysis.map_cache import precompute

        log.info("computing the held-out run's expert maps for the Map page (UMAP, once) ...")
        precompute(store, [runs[RUN_HELDOUT]])
    return runs


def _interleaved(corpus: list[dict], head_chars: int | None = None) -> list[dict]:
    """Documents in round-robin domain order; with ``head_chars``, only the start of each document.

    A token budget (``--max-tokens``) then samples every domain instead of the first long documents.
    """
    seen: dict[str, int] = {}
    keyed = []
    for doc in corpus:
        turn = seen[doc["domain"]] = seen.get(doc["domain"], -1) + 1
        text = doc["text"] if head_chars is None else doc["text"][:head_chars]
        keyed.append((turn, doc["domain"], {"text": text, "label": doc["domain"], "id": doc["id"]}))
    return [doc for _, _, doc in sorted(keyed, key=lambda item: item[:2])]


def demo_summary(store: TraceStore, runs: dict[str, int]) -> dict[str, pd.DataFrame]:
    """``{title: table}``: the runs, the routing structure per layer and the early-vs-final agreement."""
    from moelens.analysis import domain_summary, run_agreement

    summary = domain_summary(store, runs[RUN_HELDOUT])
    agreement = run_agreement(store, runs[RUN_EARLY], runs[RUN_HELDOUT])
    return {
        str(store.path): store.runs()[["run_id", "name", "status", "n_sequences", "n_tokens"]],
        "routing structure per layer (held-out corpus; MI as a share of domain entropy)":
            summary[["layer", "mi_ratio", "js_bits", "purity", "max_spec", "dead_experts", "same_top1", "sum_sq_top1"]],
        "early checkpoint vs final: router saturation":
            agreement[["layer", "n_tokens", "top1_agreement", "topk_overlap", "baseline"]],
    }
