"""One result and one plot of every registered score, on the bundled demo model's held-out trace.

Why: issue #3 asks that every score be shown working end to end on a real trace — recorded by moelens,
computed by ``moelens.analysis``, drawn by ``moelens.viz`` — so a reader sees what each score returns and
looks like before installing anything. This script regenerates that gallery: it records the demo runs
into a store if they are missing, runs each score in `SCORES` on the held-out run, renders the matching
figure to PNG with headless chromium (the same plotly HTML the app and notebooks show), and writes
``docs/gallery.md`` with a short table, the figure's one-line finding and the image.

    python benchmarks/demo_gallery.py [--db traces/gallery.duckdb] [--max-tokens N]

``--max-tokens`` only applies when the runs are recorded; an existing store is reused as it is, and
``docs/gallery.md`` states the token count actually used.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from playwright.sync_api import Page, sync_playwright

from moelens import TraceStore, viz
from moelens.analysis.registry import SCORES, run_score
from moelens.demo.run import RUN_EARLY, RUN_HELDOUT, run_demo

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
IMAGES = DOCS / "gallery"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]  # fmt: skip
VIEWPORT = {"width": 900, "height": 500}
TABLE_ROWS = 5
SCH_LOOKAHEAD = 16

#: A figure from a score's result and the parameters it was computed with.
Builder = Callable[[pd.DataFrame, dict[str, Any]], go.Figure]

#: The `moelens.viz` builder for each score (the one the app uses for it). Scores missing here have none.
FIGURES: dict[str, Builder] = {
    "expert_load": lambda df, p: viz.load_heatmap(df, "share"),
    "layer_balance": lambda df, p: viz.entropy_chart(df),
    "shared_expert_stats": lambda df, p: viz.layer_score_chart(
        df, "mean_gate", title="Shared-expert gate", what="mean shared-expert gate", name="shared_expert_stats"),
    "domain_specialization": lambda df, p: viz.specialization_heatmap(df),
    "domain_summary": lambda df, p: viz.domain_summary_chart(df),
    "vocabulary_specialization": lambda df, p: viz.layer_score_chart(
        df, "score", title="Vocabulary specialization (input token)", what="vocabulary specialization",
        name="vocabulary_specialization"),
    "vocabulary_by_expert": lambda df, p: viz.layer_expert_heatmap(
        df, "score", title="Vocabulary specialization of the token ids each expert owns", what="mean p_x",
        name="vocabulary_by_expert"),
    "expert_top_tokens": lambda df, p: viz.top_tokens_bar(df, layer=p["layer"], expert=p["expert"]),
    "coactivation": lambda df, p: viz.coactivation_heatmap(df, baseline=float(df["baseline"].iloc[0])),
    "cross_layer_transitions": lambda df, p: viz.transition_heatmap(df),
    "cross_layer_consistency": lambda df, p: viz.layer_score_chart(
        df, "predictability", title="Cross-layer consistency: next layer's first choice predicted from this one",
        what="predictability", baseline="baseline", name="cross_layer_consistency"),
    "repetition": lambda df, p: viz.repetition_chart(df),
    "srp": lambda df, p: viz.srp_chart(df),
    "sch": lambda df, p: viz.sch_chart(df, lookahead=SCH_LOOKAHEAD),
    "run_agreement": lambda df, p: viz.agreement_chart(df),
    "standing_committee": lambda df, p: viz.committee_chart(df),
    "npmi": lambda df, p: viz.npmi_bar(df, what="label 'math'"),
    "npmi_combined": lambda df, p: viz.ranked_experts_bar(
        df, value="score", what="'math' minus 'english'", name="npmi_combined_bar"),
    "risk_difference": lambda df, p: viz.ranked_experts_bar(
        df, value="risk_diff", what="'math' vs 'english'", name="risk_difference_bar",
        title="Risk difference 'math' vs 'english'"),
    "expert_map": lambda df, p: viz.expert_map_scatter(df, color_by="dominant_label"),
}  # fmt: skip

#: Columns shown in each score's table (all columns when a score is missing here).
COLUMNS: dict[str, list[str]] = {
    "expert_load": ["layer", "expert", "count", "activation_rate", "share", "gate_share"],
    "layer_balance": ["layer", "norm_entropy", "effective_experts", "max_mean", "cv", "dead_experts"],
    "domain_specialization": ["layer", "expert", "label", "spec", "baseline", "lift"],
    "domain_summary": ["layer", "mi_ratio", "js_bits", "purity", "chance_purity", "max_spec", "same_top1"],
    "expert_top_tokens": ["token", "count", "share", "token_rate"],
    "coactivation": ["layer", "expert_i", "expert_j", "p_j_given_i", "jaccard", "npmi", "baseline"],
    "cross_layer_transitions": ["layer", "next_layer", "expert", "next_expert", "count", "p"],
    "repetition": ["layer", "first_choice", "perm_first", "any_overlap", "perm_overlap"],
    "srp": ["layer", "m", "srp", "theta", "f1_theta0"],
    "sch": ["layer", "policy", "m", "cache_size", "cache_ratio", "hit_rate"],
    "run_agreement": ["layer", "n_tokens", "top1_agreement", "topk_overlap", "baseline"],
    "standing_committee": ["layer", "committee", "size", "coverage", "ratio"],
    "committee_share": ["layer", "label", "committee", "count_share", "mass_share"],
    "npmi": ["layer", "expert", "n_x", "n_xe", "npmi"],
    "npmi_combined": ["layer", "expert", "score", "npmi_0", "npmi_1"],
    "risk_difference": ["layer", "expert", "a1_n", "a2_n", "risk_diff"],
    "expert_map": ["layer", "expert", "x", "y", "dominant_label", "share"],
}


@dataclass
class Entry:
    """One score's gallery entry: its result, or why it has none, and its figure if one was drawn."""

    score: str
    params: dict[str, Any]
    result: pd.DataFrame | None = None
    figure: go.Figure | None = None
    note: str = ""
    seconds: float = 0.0


def score_params(store: TraceStore, run: int, early: int) -> dict[str, dict[str, Any]]:
    """Parameters for the scores that need some: the comparisons the demo corpus supports, and its top math expert."""
    top = run_score(store, run, "npmi", label="math").iloc[0]
    return {
        "run_agreement": {"run_b": early},
        "risk_difference": {"label_a": "math", "label_b": "english"},
        "npmi": {"label": "math"},
        "npmi_combined": {"targets": [[1, {"label": "math"}], [-1, {"label": "english"}]]},
        "expert_top_tokens": {"layer": int(top["layer"]), "expert": int(top["expert"])},
        "sch": {"lookahead": (4, SCH_LOOKAHEAD, 64)},
        "token_map": {"layer": 0},
    }


def compute(store: TraceStore, run: int, early: int) -> list[Entry]:
    """Every registered score on ``run`` with its figure, or a note saying why there is none."""
    params = score_params(store, run, early)
    has_logits = bool((store.run(run).get("metadata") or {}).get("logits"))
    entries = []
    for name, spec in SCORES.items():
        entry = Entry(name, params.get(name, {}))
        entries.append(entry)
        if spec.needs == "router logits" and not has_logits:
            entry.note = "Skipped: the demo runs are recorded without router logits, which this score needs."
            continue
        start = time.perf_counter()
        entry.result = run_score(store, run, name, **dict(entry.params))  # a copy: run_score pops run_b
        entry.seconds = time.perf_counter() - start
        if entry.result.empty:
            entry.note = f"Empty on the demo trace (this score needs {spec.needs or 'data the trace lacks'})."
        elif name not in FIGURES:
            entry.note = "No plot: `moelens.viz` has no builder for this result; the table is the result."
        else:
            entry.figure = FIGURES[name](entry.result, entry.params)
        print(f"{name:28s} {len(entry.result):6d} rows  {entry.seconds:6.1f} s", flush=True)
    return entries


def screenshot(page: Page, fig: go.Figure, html: Path, png: Path) -> None:
    """Render ``fig``'s standalone HTML in ``page`` and save the plot element as ``png``."""
    html.write_text(viz.figure_html(fig), encoding="utf-8")
    page.goto(html.as_uri())
    page.wait_for_selector(".plotly-graph-div .main-svg")
    page.locator(".plotly-graph-div").first.screenshot(path=str(png))


def render(entries: list[Entry]) -> None:
    """PNG of every entry's figure under `IMAGES`, one headless chromium for all."""
    IMAGES.mkdir(parents=True, exist_ok=True)
    for stale in IMAGES.glob("*.png"):
        stale.unlink()
    with sync_playwright() as pw, tempfile.TemporaryDirectory() as tmp:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=VIEWPORT)
        for e in entries:
            if e.figure is not None:
                screenshot(page, e.figure, Path(tmp) / f"{e.score}.html", IMAGES / f"{e.score}.png")
        browser.close()


def _cell(v: Any, column: str) -> str:
    if column == "token":  # quoted, in code, so leading spaces and markdown characters show as they are
        return f"`` {str(v)!r} ``".replace("|", "\\|")
    if isinstance(v, (float, np.floating)):
        text = f"{v:.3f}"
    elif isinstance(v, (list, tuple, np.ndarray)):
        text = ", ".join(str(x) for x in v)
    else:
        text = str(v)
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("|", "\\|")


def markdown_table(df: pd.DataFrame, columns: list[str] | None) -> str:
    """The first `TABLE_ROWS` rows of ``df`` (only ``columns`` where given and present) as a markdown table."""
    cols = [c for c in columns if c in df.columns] if columns else list(df.columns)
    rows = df[cols].head(TABLE_ROWS).itertuples(index=False)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(v, c) for v, c in zip(row, cols)) + " |" for row in rows]
    return "\n".join(lines)


def _param_text(params: dict[str, Any]) -> str:
    return ", ".join(f"`{k}={v!r}`" for k, v in params.items()) or "defaults"


def write_markdown(entries: list[Entry], store: TraceStore, run: int, early: int, seconds: float) -> Path:
    """``docs/gallery.md``: per score a heading, what it shows, a table, the finding and the image."""
    runs = store.runs().set_index("run_id")
    info = runs.loc[run]
    out = [
        "# Score gallery: the demo model's held-out trace",
        "",
        f"Generated by `python benchmarks/demo_gallery.py` (issue #3): every score of `moelens analyze` run on "
        f"run #{run} *{info['name']}* — the bundled demo model ({info['n_layers']} MoE layers, "
        f"{info['n_experts']} experts, top-{info['top_k']}) over **{int(info['n_tokens']):,} held-out tokens** in "
        f"{int(info['n_sequences']):,} sequences labelled {info['labels']}. `run_agreement` compares it with run "
        f"#{early} *{runs.loc[early, 'name']}*. Computing the scores and rendering the figures took {seconds:.0f} s. "
        f"Tables show the first {TABLE_ROWS} rows of each result, a few columns, rounded to 3 decimals.",
        "",
    ]
    for e in entries:
        spec = SCORES[e.score]
        what = f"{spec.help} (Reference: {spec.reference}.) Parameters: {_param_text(e.params)}."
        out += [f"## {e.score}", "", what, ""]
        if e.result is not None and not e.result.empty:
            out += [markdown_table(e.result, COLUMNS.get(e.score)), ""]
        if e.figure is not None and viz.finding_of(e.figure):
            out += [f"**Finding:** {viz.finding_of(e.figure)}", ""]
        if e.note:
            out += [f"*{e.note}*", ""]
        if e.figure is not None:
            out += [f"![{e.score}](gallery/{e.score}.png)", ""]
    path = DOCS / "gallery.md"
    path.write_text("\n".join(out), encoding="utf-8")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", default=str(ROOT / "traces" / "gallery.duckdb"), help="store holding the demo runs")
    ap.add_argument("--max-tokens", type=int, default=None, help="tokens per run when recording (default: all)")
    args = ap.parse_args()

    runs = run_demo(args.db, max_tokens=args.max_tokens, progress=False)
    store = TraceStore(args.db, read_only=True)
    run, early = runs[RUN_HELDOUT], runs[RUN_EARLY]
    start = time.perf_counter()
    entries = compute(store, run, early)
    render(entries)
    path = write_markdown(entries, store, run, early, time.perf_counter() - start)
    pngs = sorted(IMAGES.glob("*.png"))
    print(f"wrote {path} and {len(pngs)} PNGs ({sum(p.stat().st_size for p in pngs) / 1e6:.2f} MB) in {IMAGES}")


if __name__ == "__main__":
    main()
