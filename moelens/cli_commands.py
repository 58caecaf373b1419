"""CLI commands for analysis, the bundled demo and steering, registered on the main `moelens` app."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from moelens.errors import MoelensError
from moelens.store import DEFAULT_DB


def register(app: typer.Typer) -> None:
    app.command("analyze")(analyze)
    app.command("summarize")(summarize)
    demo_app = typer.Typer(help="The bundled demo: record it and open the workbench, or rebuild it.",
                           invoke_without_command=True, no_args_is_help=False)
    demo_app.callback(invoke_without_command=True)(demo)
    demo_app.command("train")(demo_train)
    demo_app.command("corpus")(demo_corpus)
    app.add_typer(demo_app, name="demo")
    from moelens.steering.cli import steer

    app.command("steer")(steer)


def _parse_params(params: list[str]) -> dict:
    """``key=value`` pairs; values are parsed as JSON when they can be (numbers, lists, true/false)."""
    out = {}
    for item in params or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise MoelensError(f"--param takes key=value, got {item!r}")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


def analyze(
    score: Optional[str] = typer.Argument(None, help="Score name; run without it (or with --list) to see them all."),
    run: Optional[int] = typer.Option(None, "--run", "-r", help="Run id (default: the latest complete run)."),
    db: Path = typer.Option(DEFAULT_DB, "--db", help="Trace store (DuckDB file)."),
    fmt: str = typer.Option("table", "--format", "-f", help="table | csv | json"),
    param: list[str] = typer.Option(None, "--param", "-p", help="Score parameter key=value (repeatable), e.g. -p target=next."),
    limit: int = typer.Option(40, "--limit", help="Rows shown in table format (csv/json are complete)."),
    list_scores: bool = typer.Option(False, "--list", help="List the available scores."),
    engine: str = typer.Option("local", "--engine", help="local (stream the run in this process) | ray (map the shards of a Parquet store on Ray)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address for --engine ray (default: start a local one)."),
) -> None:
    """Compute a routing score over a recorded run (load, specialization, SRP, nPMI, ...)."""
    import pandas as pd

    from moelens.analysis.registry import SCORES, run_score
    from moelens.cli import emit
    from moelens.store import TraceStore

    if list_scores or score is None:
        emit(pd.DataFrame([{"score": name, "about": spec.help, "reference": spec.reference} for name, spec in SCORES.items()]),
             "table" if fmt == "table" else fmt, title="scores")
        return
    if score not in SCORES:
        raise MoelensError(f"unknown score {score!r}; choose one of: {', '.join(SCORES)}")
    store = TraceStore(db, read_only=True)
    if run is None:
        complete = store.runs(status="complete")
        if complete.empty:
            raise MoelensError(f"{db} has no complete run to analyse; record one first (moelens demo --no-app)")
        run = int(complete["run_id"].iloc[-1])
    how = {} if engine == "local" else {"engine": engine, "address": address}
    df = run_score(store, run, score, **_parse_params(param), **how)
    emit(df.head(limit) if fmt == "table" else df, fmt, title=f"{score} · run {run}")


def summarize(
    run: int = typer.Argument(..., help="Run id (list them with: moelens runs)."),
    db: Path = typer.Option(DEFAULT_DB, "--db", help="Trace store (DuckDB file)."),
) -> None:
    """(Re)build a run's derived summaries (per-expert counts, co-activation, transitions, token counts) in
    one pass over its routing; `moelens record` and the demo do this when a run completes."""
    from moelens.analysis.summaries import summarize as build
    from moelens.cli import console
    from moelens.store import TraceStore

    store = TraceStore(db)
    if store.run(run)["status"] != "complete":
        raise MoelensError(f"run {run} is not complete; only completed runs are summarised")
    tables = build(store, run)
    console.print(f"[green]run {run}[/]: {', '.join(f'{k} ({t.num_rows:,} rows)' for k, t in tables.items())} -> {db}")


def demo(
    ctx: typer.Context,
    db: Path = typer.Option(DEFAULT_DB, "--db", help="Trace store to record into."),
    no_app: bool = typer.Option(False, "--no-app", help="Print a summary instead of opening the workbench."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Quick try: record this many held-out tokens, sampled from the start of every domain's documents."),
    again: bool = typer.Option(False, "--again", help="Record again even if the store already has the demo runs."),
) -> None:
    """Record the bundled demo model over its held-out corpus (plus generations and the early checkpoint), then open the workbench."""
    if ctx.invoked_subcommand is not None:
        return
    from moelens.demo.run import run_demo

    run_demo(db, open_app=not no_app, max_tokens=max_tokens, again=again)


def demo_train(
    out: Path = typer.Option(Path("demo-model"), "--out", help="Folder for the trained model and its early checkpoint."),
    steps: int = typer.Option(600, "--steps"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Re-train the demo MoE from its seed (about 10 minutes on 2 CPU cores)."""
    from moelens.demo.train import train_demo

    train_demo(out, steps=steps, seed=seed)


def demo_corpus(out: Path = typer.Option(Path("demo-corpus"), "--out", help="Folder for the rebuilt corpus.")) -> None:
    """Rebuild the demo corpus from this machine's offline sources and compare it with the shipped manifest."""
    from moelens.cli import console
    from moelens.demo import DATA_DIR
    from moelens.demo.corpus import build_corpus

    built = build_corpus(out)
    shipped = json.loads((DATA_DIR / "MANIFEST.json").read_text(encoding="utf-8"))
    for name, info in built["files"].items():
        same = info["sha256"] == shipped["files"].get(name, {}).get("sha256")
        verdict = "[green]identical to the shipped file[/]" if same else "[yellow]differs from the shipped file[/]"
        console.print(f"{out / name}: {info['docs']} documents, {info['bytes']:,} bytes, {verdict}")
    for domain, entry in built["domains"].items():
        if entry != shipped["domains"].get(domain):
            console.print(f"[yellow]{domain}[/]: this machine's sources differ from the shipped build (see MANIFEST.json)")
