"""`moelens demo`: record the bundled model over its held-out corpus and open the workbench.

Three runs land in the store, each named so a second `moelens demo` reuses them instead of recording again:
the early checkpoint over the held-out corpus (a real pair for run-vs-run agreement and router saturation),
a few greedy generations from one prompt per domain, and the trained model over the held-out corpus
(labelled by domain). The last is recorded last so the workbench opens on it (it shows the newest run).
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

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

console = Console()


def run_demo(db: str | Path, *, open_app: bool = True, max_tokens: int | None = None, again: bool = False,
             seq_len: int = 256, progress: bool = True) -> dict[str, int]:
    """Record the demo runs (unless present) and open the app or print a summary; returns {run name: id}."""
    import torch

    from moelens.demo import DEMO_EARLY_DIR, DEMO_MODEL_DIR, load_corpus
    from moelens.recording.loading import load_model
    from moelens.recording.record import record

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
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
        console.print(f"recording the early checkpoint over {len(docs)} held-out documents ...")
        early, early_tok = load_model(DEMO_EARLY_DIR, dtype="float32")
        runs[RUN_EARLY] = record(early, early_tok, docs, name=RUN_EARLY, model_name="moelens-demo (early checkpoint)",
                                 **common)
    if RUN_GENERATIONS in have:
        runs[RUN_GENERATIONS] = int(have[RUN_GENERATIONS])
    else:
        console.print("recording greedy generations ...")
        runs[RUN_GENERATIONS] = record(model, tok, list(PROMPTS.values()), labels=list(PROMPTS), generate=32,
                                       name=RUN_GENERATIONS, model_name="moelens-demo", store=store, progress=progress)
    if RUN_HELDOUT in have:
        runs[RUN_HELDOUT] = int(have[RUN_HELDOUT])
    else:
        console.print(f"recording the demo model over {len(docs)} held-out documents ...")
        runs[RUN_HELDOUT] = record(model, tok, docs, name=RUN_HELDOUT, model_name="moelens-demo", **common)
    from moelens.analysis.summaries import summarize  # recording never imports analysis; the command does

    for name, run_id in runs.items():
        if name not in have:
            summarize(store, run_id)
    if open_app:
        from moelens.app_launcher import launch

        launch(Path(db))
    else:
        _summary(store, runs)
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


def _summary(store: TraceStore, runs: dict[str, int]) -> None:
    from moelens.analysis import domain_summary, run_agreement
    from moelens.cli import emit

    emit(store.runs()[["run_id", "name", "status", "n_sequences", "n_tokens"]], "table", title=str(store.path))
    summary = domain_summary(store, runs[RUN_HELDOUT])
    emit(summary[["layer", "mi_ratio", "js_bits", "purity", "max_spec", "dead_experts", "same_top1", "sum_sq_top1"]],
         "table", title="routing structure per layer (held-out corpus; MI as a share of domain entropy)")
    agreement = run_agreement(store, runs[RUN_EARLY], runs[RUN_HELDOUT])
    emit(agreement[["layer", "n_tokens", "top1_agreement", "topk_overlap", "baseline"]], "table",
         title="early checkpoint vs final: router saturation")
    console.print(f"Open the workbench with: moelens app --db {store.path}")
