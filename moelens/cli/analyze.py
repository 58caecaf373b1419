"""`moelens analyze SCORE`: compute a registered routing score over a recorded run; ``SCORE --help`` explains it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moelens.cli.common import app, console, db_option, emit, format_option
from moelens.errors import InputError, did_you_mean


@app.command(context_settings={"help_option_names": []})  # --help below also knows the score it follows
def analyze(
    ctx: typer.Context,
    score: Optional[str] = typer.Argument(None, help="Score name; run without it (or with --list) to see them all."),
    run: Optional[int] = typer.Option(None, "--run", "-r", help="Run id (default: the latest complete run)."),
    db: Path = db_option(),
    fmt: str = format_option(),
    param: list[str] = typer.Option(None, "--param", "-p", help="Score parameter key=value (repeatable), e.g. -p target=next; see moelens analyze SCORE --help."),
    limit: int = typer.Option(40, "--limit", help="Rows shown in table format (csv/json are complete)."),
    list_scores: bool = typer.Option(False, "--list", help="List the available scores."),
    show_help: bool = typer.Option(False, "--help", "-h", help="Show this message, or with SCORE, the score's parameters."),
    engine: str = typer.Option("local", "--engine", help="local (stream the run in this process) | ray (map the shards of a Parquet store on Ray)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address for --engine ray (default: start a local one)."),
    label: Optional[str] = typer.Option(None, "--label", "-l", help="Score only the sequences with this label, as if the run held nothing else (reads no other sequence)."),
) -> None:
    """Compute a routing score over a recorded run (load, specialization, SRP, nPMI, ...)."""
    import pandas as pd

    from moelens.analysis.registry import SCORES, run_score
    from moelens.store import TraceStore

    if show_help and score is None:
        console.print(ctx.get_help(), highlight=False)
        return
    if list_scores or score is None:
        emit(pd.DataFrame([{"score": name, "about": spec.help, "reference": spec.reference} for name, spec in SCORES.items()]),
             fmt, title="scores (moelens analyze SCORE --help for its parameters)")
        return
    if score not in SCORES:
        raise InputError(f"unknown score {score!r}{did_you_mean(score, SCORES)}; list them with: moelens analyze --list")
    spec = SCORES[score]
    if show_help:
        _score_help(spec)
        return
    params = spec.parse(_split_params(param))
    if missing := spec.missing(params):
        raise InputError(f"{score} needs {', '.join(f'-p {p.name}=... ({p.help})' for p in missing)}")
    store = TraceStore(db, read_only=True)
    if run is None:
        complete = store.runs(status="complete")
        if complete.empty:
            raise InputError(f"{db} has no complete run to analyse; record one first (moelens demo --no-app)")
        run = int(complete["run_id"].iloc[-1])
    if engine not in ("local", "ray"):
        raise InputError(f"--engine must be local or ray, not {engine!r}")
    how = {} if engine == "local" else {"engine": engine, "address": address}
    if label is not None:
        how["only_label"] = label
    df = run_score(store, run, score, **params, **how)
    title = f"{score} · run {run}" + ("" if label is None else f" · label {label}")
    emit(df.head(limit) if fmt == "table" else df, fmt, title=title)


def _split_params(params: list[str] | None) -> dict[str, str]:
    """``{key: value}`` from ``key=value`` strings (``-`` in a key reads as ``_``)."""
    out = {}
    for item in params or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"-p takes key=value, got {item!r}")
        out[key.strip().replace("-", "_")] = value
    return out


def _score_help(spec) -> None:
    """The score's purpose, reference, what it needs and every parameter with type, default and choices."""
    from rich.markup import escape

    console.print(f"[bold]{spec.name}[/]: {escape(spec.help)}", highlight=False)
    console.print(f"reference: {escape(spec.reference)}", highlight=False)
    if spec.needs:
        console.print(f"needs: {escape(spec.needs)}", highlight=False)
    required = "".join(f" -p {p.name}=..." for p in spec.params if p.required)
    console.print(escape(f"usage: moelens analyze {spec.name} [--run ID] [--db PATH]{required} [-p NAME=VALUE ...]"),
                  highlight=False, soft_wrap=True)
    if not spec.params:
        console.print("parameters: none")
        return
    console.print("parameters (-p NAME=VALUE; ints as 4,16):")
    width = max(len(p.name) for p in spec.params)
    for p in spec.params:
        facts = [p.kind, *(["required"] if p.required else [] if p.default is None else [f"default {_default(p)}"])]
        if p.choices:
            facts.append(f"one of {' | '.join(p.choices)}")
        console.print(escape(f"  {p.name:<{width}}  {p.help} ({', '.join(facts)})"), highlight=False, soft_wrap=True)


def _default(p) -> str:
    """A parameter's default as it would be typed after -p NAME=."""
    if isinstance(p.default, (tuple, list)):
        return ",".join(map(str, p.default))
    return str(p.default).lower() if isinstance(p.default, bool) else str(p.default)


@app.command()
def summarize(
    run: int = typer.Argument(..., help="Run id (list them with: moelens runs)."),
    db: Path = db_option(),
) -> None:
    """(Re)build a run's derived summaries (per-expert counts, co-activation, transitions, token counts) in
    one pass over its routing; `moelens record` and the demo do this when a run completes."""
    from moelens.analysis.summaries import summarize as build
    from moelens.store import TraceStore

    store = TraceStore(db)
    if store.run(run)["status"] != "complete":
        raise InputError(f"run {run} is not complete; only completed runs are summarised")
    tables = build(store, run)
    console.print(f"[green]run {run}[/]: {', '.join(f'{k} ({t.num_rows:,} rows)' for k, t in tables.items())} -> {db}")
