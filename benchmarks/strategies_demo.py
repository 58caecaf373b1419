"""Exact-match arithmetic on the bundled demo model: greedy vs SCMoE vs top-k vs dynamic top-p routing.

The demo's math domain is generated arithmetic (moelens.demo.mathgen) with known answers, so a routing strategy
can be scored by whether the model completes a problem correctly, not only by its loss. Problems are drawn from
the same templates with another seed (2026 instead of the corpus' 7) and every problem line that occurs anywhere in
the shipped corpus (train or held-out) is rejected, so no prompt was seen in training. A prompt is a short
worksheet: 4 solved problems, then the query cut after its last "=" (e.g. "417 + 36 =", "gcd(84, 126) =",
"Solve 3x + 4 = 19: x ="); the answer is the rest of the line, compared exactly (stripped) with the model's greedy
continuation up to its first newline.

Strategies: greedy (the trained top-2 routing); SCMoE (Shi et al. 2024, arXiv:2405.14507) with weak = each token's
rank-r expert only, for a few beta (alpha = 0.1); fixed top-k for k = 1..4; dynamic top-p (Huang et al. 2024,
arXiv:2403.07652) for a few p. "experts/token" is the mean number of routed experts per token and layer over the
generated tokens (SCMoE's weak forward adds one more per token: it is counted). Also reported: the 95 % Wilson
interval of each accuracy and, against greedy, how many prompts each strategy fixes and breaks.

Writes benchmarks/results/strategies_demo.md. Run: OMP_NUM_THREADS=1 python benchmarks/strategies_demo.py [--n 300]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from moelens.analysis.experts_per_token import experts_per_token
from moelens.demo import DEMO_MODEL_DIR, load_corpus
from moelens.demo.mathgen import TEMPLATES
from moelens.recording.loading import load_model
from moelens.steering import SteeringSpec, contrastive_generate
from moelens.store import TraceStore

RESULTS = Path(__file__).parent / "results" / "strategies_demo.md"
SEED = 2026
N_CONTEXT = 4


def corpus_lines() -> set[str]:
    """Every problem line of the shipped math corpus (both splits): the prompts must avoid all of them."""
    return {line.strip() for split in ("train", "heldout") for doc in load_corpus(split) if doc["domain"] == "math"
            for line in doc["text"].splitlines() if line.strip()}


def problems(n: int, seen: set[str], seed: int = SEED, templates: list[str] | None = None) -> pd.DataFrame:
    """``n`` prompts (4 solved unseen problems + an unseen query) with their answers and template names; the query
    comes from ``templates`` (default all), the solved context from any template."""
    rng = random.Random(seed)
    queries = [t for t in TEMPLATES if templates is None or t.__name__.lstrip("_") in templates]
    if not queries:
        raise SystemExit(f"no template among {templates}; templates are {[t.__name__.lstrip('_') for t in TEMPLATES]}")

    def fresh(pool=TEMPLATES) -> tuple[str, str]:
        while True:
            template = rng.choice(pool)
            line = template(rng)
            if line not in seen:
                return template.__name__.lstrip("_"), line

    rows = []
    for i in range(n):
        context = [fresh()[1] for _ in range(N_CONTEXT)]
        name, query = fresh(queries)
        head, _, answer = query.rpartition("= ")
        rows.append({"id": i, "template": name, "prompt": "\n".join(context) + "\n" + head + "=", "answer": answer.strip()})
    return pd.DataFrame(rows)


def strategies() -> dict[str, dict]:
    """Name -> keyword arguments of `contrastive_generate` (strong spec, weak routing, beta)."""
    out: dict[str, dict] = {"greedy (top-2, as trained)": {}}
    for k in (1, 2, 3, 4):
        out[f"top-k {k}"] = {"strong": SteeringSpec(top_k=k)}
    for p in (0.3, 0.5, 0.7, 0.9):
        out[f"top-p {p:g}"] = {"strong": SteeringSpec(top_p=p, k_max=8)}
    for rank in (2, 3):
        for beta in (0.1, 0.5, 1.0):
            out[f"SCMoE weak=rank-{rank} beta={beta:g}"] = {"weak": rank, "beta": beta}
    return out


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return math.nan, math.nan
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def evaluate(model, tokenizer, prompts: pd.DataFrame, name: str, kwargs: dict, store: TraceStore,
             max_new_tokens: int) -> tuple[pd.DataFrame, float, float]:
    """Per-prompt correctness, the mean experts per generated token and layer, and seconds taken."""
    start = time.perf_counter()
    kwargs = {"beta": 0.0, **kwargs}
    out = contrastive_generate(model, tokenizer, prompts["prompt"].tolist(), max_new_tokens=max_new_tokens,
                               alpha=0.1, stop_at_eos=True, store=store, name=name, **kwargs)
    seconds = time.perf_counter() - start
    said = out["completion"].str.split("\n").str[0].str.strip()
    per_prompt = prompts.assign(strategy=name, said=said.to_numpy(), correct=(said == prompts["answer"]).to_numpy())
    ept = experts_per_token(store, int(out["run_id"].iloc[0]), phase="generated")
    compute = float((ept["n_experts"] * ept["count"]).sum() / ept["count"].sum())
    if kwargs["beta"] > 0:
        compute += 1.0  # the weak forward routes every token to one expert
    return per_prompt, compute, seconds


def table(results: pd.DataFrame, compute: dict[str, float], seconds: dict[str, float]) -> pd.DataFrame:
    greedy = results[results["strategy"] == next(iter(compute))].set_index("id")["correct"]
    rows = []
    for name, group in results.groupby("strategy", sort=False):
        correct = group.set_index("id")["correct"]
        lo, hi = wilson(int(correct.sum()), len(correct))
        rows.append({"strategy": name, "accuracy": correct.mean(), "95% CI": f"{lo:.3f}–{hi:.3f}",
                     "fixed vs greedy": int((correct & ~greedy).sum()), "broken vs greedy": int((~correct & greedy).sum()),
                     "experts/token": compute[name], "seconds": seconds[name]})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="number of prompts")
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--templates", default=None, help="comma list of query templates (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model(DEMO_MODEL_DIR)
    templates = args.templates.split(",") if args.templates else None
    prompts = problems(args.n, corpus_lines(), args.seed, templates)
    parts, compute, seconds = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        store = TraceStore(Path(tmp) / "strategies.duckdb")
        for name, kwargs in strategies().items():
            per_prompt, compute[name], seconds[name] = evaluate(model, tokenizer, prompts, name, kwargs, store,
                                                                args.max_new_tokens)
            parts.append(per_prompt)
            print(f"{name:38s} acc {per_prompt['correct'].mean():.3f}  experts/token {compute[name]:.2f}  "
                  f"{seconds[name]:.0f} s", flush=True)
    results = pd.concat(parts)
    summary = table(results, compute, seconds)
    by_template = (results.pivot_table(index="template", columns="strategy", values="correct", aggfunc="mean", sort=False)
                   [[summary["strategy"].iloc[0], *[s for s in summary["strategy"] if s.startswith("SCMoE")][:1]]])
    counts = prompts["template"].value_counts().rename("prompts")
    by_template = by_template.join(counts)
    write(args, summary, by_template, results)


def write(args, summary: pd.DataFrame, by_template: pd.DataFrame, results: pd.DataFrame) -> None:
    greedy = summary.iloc[0]
    best = summary.iloc[summary["accuracy"].to_numpy().argmax()]
    examples = results[(results["strategy"] == greedy["strategy"])].head(3)
    lines = [
        "# Routing strategies on the demo model: exact-match arithmetic",
        "",
        f"`python benchmarks/strategies_demo.py --n {args.n} --max-new-tokens {args.max_new_tokens} --seed {args.seed}"
        + (f" --templates {args.templates}`" if args.templates else "`")
        + " "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')}, torch threads 1, CPU, float32; "
        f"machine shared with other jobs, so seconds are indicative only).",
        "",
        f"{args.n} prompts from the demo's arithmetic templates with seed {args.seed}"
        + (f" (queries from {args.templates} only)" if args.templates else "")
        + "; every problem line that occurs in the "
        "shipped corpus (train or held-out) is rejected. Each prompt is 4 solved problems followed by the query cut after "
        "its last `=`; the answer must match the continuation up to the first newline exactly.",
        "",
        markdown(summary),
        "",
        f"Greedy decoding gets {greedy['accuracy']:.1%} right; the best strategy here is **{best['strategy']}** "
        f"at {best['accuracy']:.1%}. Differences smaller than the confidence intervals are not evidence either way.",
        "",
        "Accuracy per template (greedy and the first SCMoE setting):",
        "",
        markdown(by_template.reset_index()),
        "",
        "Example prompts (greedy):",
        "",
        *[f"- `{r.prompt.splitlines()[-1]}` → expected `{r.answer}`, said `{r.said}`" for r in examples.itertuples()],
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.out}")


def markdown(df: pd.DataFrame) -> str:
    """A GitHub table; floats with 3 decimals (seconds with none)."""
    def cell(column: str, value) -> str:
        if isinstance(value, float):
            return f"{value:.0f}" if column == "seconds" else f"{value:.3f}"
        return str(value)

    header = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(c, v) for c, v in zip(df.columns, row)) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body])


if __name__ == "__main__":
    main()
