"""Disable each domain's most specialised experts in the demo model and compare with random experts.

For every domain D of the demo corpus: record the routing of one half of the held-out documents, rank the
(layer, expert) pairs by nPMI with "token belongs to a D document",
disable the top N (reroute mode) and evaluate on the other half of the held-out documents with
`run_experiment`: D's loss change against N random experts in the same layers (several seeds) and against the
change in the other domains. Selecting and evaluating on different documents keeps the selection honest.

Writes benchmarks/results/steering_demo.md. Run: python benchmarks/steering_demo.py [--n 4] [--tokens 4000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from moelens.analysis import npmi
from moelens.demo import DEMO_MODEL_DIR, DOMAINS, load_corpus
from moelens.recording.inputs import Document
from moelens.recording.loading import load_model
from moelens.recording.record import record
from moelens.steering import run_experiment, spec_from_scores
from moelens.store import TraceStore

RESULTS = Path(__file__).parent / "results" / "steering_demo.md"


def split_heldout(tokenizer, tokens_per_domain: int) -> tuple[list[Document], list[Document]]:
    """(selection, evaluation) documents: alternate held-out documents of each domain, each side capped at
    ``tokens_per_domain`` tokens (the last document is cut)."""
    halves: tuple[list[Document], list[Document]] = ([], [])
    corpus = load_corpus("heldout")
    for domain in DOMAINS:
        docs = [d for d in corpus if d["domain"] == domain]
        for side, part in enumerate((docs[0::2], docs[1::2])):
            budget = tokens_per_domain
            for d in part:
                ids = tokenizer(d["text"]).input_ids[:budget]
                halves[side].append(Document(ids=tuple(ids), label=domain, source=d["id"]))
                budget -= len(ids)
                if budget <= 0:
                    break
    return halves


def domain_experiment(model, tokenizer, store: TraceStore, selection_run: int, domain: str, evaluation: list[Document],
                      *, n: int, n_random: int, seed: int = 0):
    """Disable the ``n`` experts with the highest nPMI for ``domain``; returns (spec, ExperimentResult)."""
    spec = spec_from_scores(npmi(store, selection_run, label=domain), n, score_col="npmi")
    return spec, run_experiment(model, tokenizer, spec, evaluation, n_random=n_random, seed=seed, seq_len=256)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4, help="experts disabled per domain")
    parser.add_argument("--tokens", type=int, default=4000, help="held-out tokens per domain on each side")
    parser.add_argument("--n-random", type=int, default=5, help="random-expert controls (seeds)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    started = time.perf_counter()
    model, tokenizer = load_model(DEMO_MODEL_DIR, dtype="float32")
    selection, evaluation = split_heldout(tokenizer, args.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        store = TraceStore(Path(tmp) / "select.duckdb")
        run = record(model, tokenizer, selection, store=store, seq_len=256, progress=False)
        rows, matrix = [], {}
        for domain in DOMAINS:
            spec, result = domain_experiment(model, tokenizer, store, run, domain, evaluation, n=args.n,
                                             n_random=args.n_random)
            control = result.control.set_index("label")
            loss = result.loss[result.loss["variant"] == "steered"].set_index("label")
            matrix[domain] = control["delta_loss"]
            others = control.drop(index=domain)["delta_loss"]
            own = control.loc[domain]
            rows.append({
                "domain": domain,
                "disabled (layer:expert)": spec.describe().removeprefix("disable "),
                "loss before": f"{loss.loc[domain, 'loss_base']:.4f}",
                "Δ loss, own domain": own["delta_loss"],
                "Δ loss, random (mean ± std)": f"{own['random_mean']:+.4f} ± {own['random_std']:.4f}",
                "z vs random": own["z"],
                "Δ loss, other domains (mean / max)": f"{others.mean():+.4f} / {others.max():+.4f}",
                "own > random mean": own["delta_loss"] > own["random_mean"],
                "own > every other domain": own["delta_loss"] > others.max(),
            })
            print(f"{domain}: {rows[-1]}", flush=True)
    elapsed = time.perf_counter() - started
    write_report(pd.DataFrame(rows), pd.DataFrame(matrix).T.loc[list(DOMAINS), list(DOMAINS)], args, evaluation, elapsed)


def write_report(summary: pd.DataFrame, matrix: pd.DataFrame, args: argparse.Namespace, evaluation: list[Document],
                 elapsed: float) -> None:
    n_eval = sum(len(d.ids) for d in evaluation)
    lines = [
        "# Steering the demo model: disabling each domain's most specialised experts",
        "",
        f"Generated by `python benchmarks/steering_demo.py --n {args.n} --tokens {args.tokens} --n-random {args.n_random}` "
        f"({elapsed:.0f} s, CPU, 1 thread).",
        "",
        "Model: the bundled demo model (`moelens.demo.DEMO_MODEL_DIR`, OLMoE architecture, 4 layers × 16 experts, top-2), fp32.",
        f"Selection: routing of alternate held-out documents (≤ {args.tokens} tokens per domain); the {args.n} "
        "(layer, expert) pairs with the highest nPMI between the expert and \"token of a document of this domain\" "
        "(global ranking over all layers).",
        f"Evaluation: the other held-out documents ({n_eval} tokens, ≤ {args.tokens} per domain), teacher-forced, "
        "next-token loss in nats/token. Disable = logit −inf before the model's own top-k (reroute).",
        f"Control: {args.n_random} random specs with as many experts in the same layers (never the selected ones), "
        "seeds 0…; z = (Δ own − mean Δ random) / std Δ random.",
        "",
        "## Per domain",
        "",
        _markdown(summary),
        "",
        "## Δ loss by evaluated domain (rows: whose experts were disabled; columns: evaluated domain)",
        "",
        _markdown(matrix.reset_index(names="disabled for")),
        "",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {RESULTS}")


def _markdown(df: pd.DataFrame) -> str:
    def cell(value) -> str:
        if isinstance(value, (bool, np.bool_)):
            return "yes" if value else "no"
        if isinstance(value, float):
            return f"{value:+.4f}" if abs(value) < 100 else f"{value:.1f}"
        return str(value)

    header = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body])


if __name__ == "__main__":
    main()
