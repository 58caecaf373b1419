"""`moelens runs | show | export | delete`: list, inspect, export and delete the runs of a trace store."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from moelens.cli.common import MISSING, app, check_format, console, db_option, emit, err_console, format_option
from moelens.errors import InputError


@app.command()
def runs(db: Path = db_option(), fmt: str = format_option()) -> None:
    """List the runs in the trace store."""
    import pandas as pd

    from moelens.store import TraceStore

    check_format(fmt)
    df = TraceStore(db, read_only=True).runs()
    cols = ["run_id", "name", "model", "model_type", "status", "n_experts", "top_k", "n_sequences", "n_tokens", "labels",
            "parent_run_id", "created_at"]
    if fmt != "table":
        emit(df[cols], fmt, title=str(db))
        return
    # An 80-column terminal: the columns that tell runs apart (csv/json keep every column).
    narrow = pd.DataFrame({
        "run": df["run_id"], "name": df["name"].fillna(df["model"]).astype(str).map(lambda t: t if len(t) <= 24 else t[:23] + "…"),
        "status": df["status"], "experts": [f"{e}/top-{k}" if pd.notna(e) else MISSING for e, k in zip(df["n_experts"], df["top_k"])],
        "seqs": df["n_sequences"], "tokens": df["n_tokens"], "parent": df["parent_run_id"],
    })  # fmt: skip
    emit(narrow, fmt, title=str(db))


@app.command()
def show(run: int = typer.Argument(..., help="Run id."), db: Path = db_option(), fmt: str = format_option()) -> None:
    """Show one run: its settings, layers and sequences."""
    from moelens.store import TraceStore

    check_format(fmt)
    store = TraceStore(db, read_only=True)
    info = store.run(run)
    if fmt == "json":
        out = {"run": info, "layers": store.layers(run).to_dict("records"), "summaries": sorted(store.summary_names(run))}
        sys.stdout.write(json.dumps(out, default=str, indent=2) + "\n")
        return
    for key, value in info.items():
        console.print(f"[bold]{key}[/]: {value}", highlight=False)
    if info["status"] != "complete":
        err_console.print(f"[yellow]run {run} is {info['status']}[/]: its rows are partial ({info.get('error') or 'interrupted'})")
    emit(store.layers(run), fmt, title="layers")
    console.print(f"[bold]summaries[/]: {', '.join(sorted(store.summary_names(run))) or 'none'}", highlight=False)
    seqs = store.sequences(run)
    emit(seqs.drop(columns=["text"]).head(20), fmt, title=f"sequences (first 20 of {len(seqs)})")


@app.command()
def export(run: int = typer.Argument(...),
           parquet: Path = typer.Option(..., "--parquet", help="Dataset folder (new, empty, or a moelens dataset: its other runs are kept)."),
           db: Path = db_option(),
           shards: int = typer.Option(1, "--shards", min=1, help="Split the run by whole sequences into N shards (units of distributed work)."),
           overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run if the dataset already holds its id.")) -> None:
    """Export one run into a partitioned Parquet dataset (DIR/<table>/run_id=R/shard=S/part-N.parquet)."""
    from moelens.store import TraceStore

    if parquet.exists() and not parquet.is_dir():
        raise InputError(f"--parquet {parquet} is a file; give a folder to write the Parquet dataset into")
    paths = TraceStore(db, read_only=True).export_parquet(run, parquet, shards=shards, overwrite=overwrite)
    console.print(f"run {run} -> {parquet}: {len(paths)} files in {shards} shard(s); open it with --db {parquet}")


@app.command("import")
def import_(folder: Path = typer.Argument(..., help="A Parquet dataset folder written by moelens export."),
            run: Optional[list[int]] = typer.Option(None, "--run", help="Run id in the dataset (repeatable; default: all)."),
            db: Path = db_option()) -> None:
    """Load a Parquet dataset's runs into a DuckDB store as new runs (prints old id -> new id)."""
    from moelens.store import TraceStore

    mapping = TraceStore(db).import_parquet(folder, run or None)
    for old, new in mapping.items():
        console.print(f"run {old} -> run {new} in {db}")


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
