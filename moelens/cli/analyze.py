"""`moelens analyze SCORE`: compute a registered routing score over a recorded run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from moelens.cli.common import app, db_option, emit, format_option
from moelens.errors import InputError


def _parse_params(params: list[str]) -> dict:
    """``key=value`` pairs; values are parsed as JSON when they can be (numbers, lists, true/false)."""
    out = {}
    for item in params or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"--param takes key=value, got {item!r}")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


@app.command()
def analyze(
    score: Optional[str] = typer.Argument(None, help="Score name; run without it (or with --list) to see them all."),
    run: Optional[int] = typer.Option(None, "--run", "-r", help="Run id (default: the latest complete run)."),
    db: Path = db_option(),
    fmt: str = format_option(),
    param: list[str] = typer.Option(None, "--param", "-p", help="Score parameter key=value (repeatable), e.g. -p target=next."),
    limit: int = typer.Option(40, "--limit", help="Rows shown in table format (csv/json are complete)."),
    list_scores: bool = typer.Option(False, "--list", help="List the available scores."),
) -> None:
    """Compute a routing score over a recorded run (load, specialization, SRP, nPMI, ...)."""
    import pandas as pd

    from moelens.analysis.registry import SCORES, run_score
    from moelens.store import TraceStore

    if list_scores or score is None:
        emit(pd.DataFrame([{"score": name, "about": spec.help, "reference": spec.reference} for name, spec in SCORES.items()]),
             fmt, title="scores")
        return
    if score not in SCORES:
        raise InputError(f"unknown score {score!r}; choose one of: {', '.join(SCORES)}")
    store = TraceStore(db, read_only=True)
    if run is None:
        complete = store.runs(status="complete")
        if complete.empty:
            raise InputError(f"{db} has no complete run to analyse; record one first (moelens demo --no-app)")
        run = int(complete["run_id"].iloc[-1])
    df = run_score(store, run, score, **_parse_params(param))
    emit(df.head(limit) if fmt == "table" else df, fmt, title=f"{score} · run {run}")
