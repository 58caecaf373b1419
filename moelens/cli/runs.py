"""`moelens runs | show | export | delete`: list, inspect, export and delete the runs of a trace store."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from moelens.cli.common import app, check_format, console, db_option, emit, err_console, format_option
from moelens.errors import InputError


@app.command()
def runs(db: Path = db_option(), fmt: str = format_option()) -> None:
    """List the runs in the trace store."""
    from moelens.store import TraceStore

    df = TraceStore(db, read_only=True).runs()
    cols = ["run_id", "name", "model", "model_type", "status", "n_experts", "top_k", "n_sequences", "n_tokens", "labels",
            "parent_run_id", "created_at"]
    emit(df[cols], fmt, title=str(db))


@app.command()
def show(run: int = typer.Argument(..., help="Run id."), db: Path = db_option(), fmt: str = format_option()) -> None:
    """Show one run: its settings, layers and sequences."""
    from moelens.store import TraceStore

    check_format(fmt)
    store = TraceStore(db, read_only=True)
    info = store.run(run)
    if fmt == "json":
        out = {"run": info, "layers": store.layers(run).to_dict("records")}
        sys.stdout.write(json.dumps(out, default=str, indent=2) + "\n")
        return
    for key, value in info.items():
        console.print(f"[bold]{key}[/]: {value}", highlight=False)
    if info["status"] != "complete":
        err_console.print(f"[yellow]run {run} is {info['status']}[/]: its rows are partial ({info.get('error') or 'interrupted'})")
    emit(store.layers(run), fmt, title="layers")
    seqs = store.sequences(run)
    emit(seqs.drop(columns=["text"]).head(20), fmt, title=f"sequences (first 20 of {len(seqs)})")


@app.command()
def export(run: int = typer.Argument(...), parquet: Path = typer.Option(..., "--parquet", help="Output folder."),
           db: Path = db_option()) -> None:
    """Export one run's tables as Parquet files (one per table)."""
    from moelens.store import TraceStore

    if parquet.exists() and not parquet.is_dir():
        raise InputError(f"--parquet {parquet} is a file; give a folder to write the Parquet files into")
    paths = TraceStore(db, read_only=True).export_parquet(run, parquet)
    console.print(f"wrote {len(paths)} files to {parquet}")


@app.command()
def delete(run: int = typer.Argument(...), db: Path = db_option(),
           yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation.")) -> None:
    """Delete a run and all its rows."""
    from moelens.store import TraceStore

    store = TraceStore(db)
    info = store.run(run)
    if not yes and not typer.confirm(f"Delete run {run} ({info['model']}, {info['status']})?"):
        raise typer.Exit(1)
    store.delete_run(run)
    console.print(f"deleted run {run}")
