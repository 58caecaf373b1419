"""The `moelens` command line: thin commands over recording, the store, analysis, steering and the app.

Every command reports bad input as one clear message and a non-zero exit (no traceback); heavy imports
(torch, transformers, streamlit) happen inside the commands that need them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from moelens.errors import MoelensError
from moelens.store import DEFAULT_DB

app = typer.Typer(
    name="moelens",
    help="Record, store, analyse and steer the routing of Mixture-of-Experts language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

DbOption = typer.Option(DEFAULT_DB, "--db", help="Trace store (DuckDB file).")
FormatOption = typer.Option("table", "--format", "-f", help="table | csv | json")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, turning moelens errors into a message and exit code 1."""
    try:
        app(args=argv)
    except MoelensError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]; any run being recorded was marked failed")
        sys.exit(130)


def resolve_model(spec: str, *, device: str = "cpu", dtype: str = "auto", trust_remote_code: bool = False):
    """``demo`` (the bundled model), ``demo:early`` (its early checkpoint), ``tiny:TYPE`` (a random tiny model), or a folder/hub id."""
    if spec in ("demo", "demo:early"):
        from moelens.demo import DEMO_EARLY_DIR, DEMO_MODEL_DIR

        spec = str(DEMO_EARLY_DIR if spec == "demo:early" else DEMO_MODEL_DIR)
    if spec.startswith("tiny:"):
        from moelens.tiny import tiny_model, tiny_tokenizer

        model, _ = tiny_model(spec[5:])
        return model.to(device), tiny_tokenizer(model.config.vocab_size), spec
    from moelens.recording.loading import load_model

    model, tokenizer = load_model(spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    return model, tokenizer, spec


def emit(df, fmt: str, title: str | None = None) -> None:
    """Print a DataFrame as a rich table, CSV or JSON (records)."""
    if fmt == "csv":
        sys.stdout.write(df.to_csv(index=False))
    elif fmt == "json":
        sys.stdout.write(df.to_json(orient="records", date_format="iso", default_handler=str) + "\n")
    elif fmt == "table":
        from rich.table import Table

        table = Table(title=title, show_lines=False)
        for col in df.columns:
            table.add_column(str(col), justify="right" if df[col].dtype.kind in "iuf" else "left")
        for row in df.itertuples(index=False):
            table.add_row(*(_cell(v) for v in row))
        console.print(table)
    else:
        raise MoelensError(f"--format must be table, csv or json, not {fmt!r}")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


@app.command()
def record(
    model: str = typer.Argument(..., help="Model folder or hub id; 'demo' for the bundled model; 'tiny:mixtral' etc. for a random tiny one."),
    data: list[str] = typer.Argument(None, help="Text/JSONL/CSV/Parquet files, folders (labelled by sub-folder), or hf:DATASET[:SPLIT]."),
    text: list[str] = typer.Option(None, "--text", "-t", help="A text to record (repeatable)."),
    db: Path = DbOption,
    label: Optional[str] = typer.Option(None, "--label", help="Label for every input sequence."),
    label_field: Optional[str] = typer.Option(None, "--label-field", help="JSONL/CSV/Parquet field holding the label."),
    text_field: str = typer.Option("text", "--text-field", help="JSONL/CSV/Parquet field holding the text."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Stop after this many tokens."),
    max_sequences: Optional[int] = typer.Option(None, "--max-sequences", help="Stop after this many sequences."),
    batch_size: int = typer.Option(8, "--batch-size", "-b"),
    seq_len: int = typer.Option(512, "--seq-len", help="Cut documents into sequences of at most this many tokens."),
    generate: Optional[int] = typer.Option(None, "--generate", help="Treat inputs as prompts and record N greedy new tokens each."),
    device: str = typer.Option("cpu", "--device"),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16"),
    logits: bool = typer.Option(False, "--logits", help="Also store full router logits (large)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run code shipped with the model (only for models you trust)."),
    name: Optional[str] = typer.Option(None, "--name", help="A name for the run."),
) -> None:
    """Record the routing of MODEL over DATA into the trace store."""
    import itertools

    from moelens.recording import read_paths
    from moelens.recording.inputs import check_paths, documents
    from moelens.recording.record import record as record_run
    from moelens.store import TraceStore

    if not data and not text:
        raise MoelensError("nothing to record: pass data files/folders or --text 'some text'")
    if data:
        check_paths(data)
    store = TraceStore(db)
    lm, tokenizer, model_name = resolve_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    inputs = itertools.chain(documents(text, label) if text else [],
                             read_paths(data, text_field=text_field, label_field=label_field, label=label) if data else [])
    run_id = record_run(lm, tokenizer, inputs, store=store, batch_size=batch_size, seq_len=seq_len, max_tokens=max_tokens,
                        max_sequences=max_sequences, logits=logits, generate=generate, name=name, model_name=model_name)
    from moelens.analysis.summaries import summarize  # recording never imports analysis; the command does

    summarize(store, run_id)
    info = store.runs().set_index("run_id").loc[run_id]
    console.print(f"[green]run {run_id}[/] complete: {int(info.n_sequences)} sequences, {int(info.n_tokens)} tokens -> {db}")


@app.command()
def runs(db: Path = DbOption, fmt: str = FormatOption) -> None:
    """List the runs in the trace store."""
    from moelens.store import TraceStore

    df = TraceStore(db, read_only=True).runs()
    cols = ["run_id", "name", "model", "model_type", "status", "n_experts", "top_k", "n_sequences", "n_tokens", "labels",
            "parent_run_id", "created_at"]
    emit(df[cols], fmt, title=str(db))


@app.command()
def show(run: int = typer.Argument(..., help="Run id."), db: Path = DbOption, fmt: str = FormatOption) -> None:
    """Show one run: its settings, layers and sequences."""
    from moelens.store import TraceStore

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
           db: Path = DbOption) -> None:
    """Export one run's tables as Parquet files (one per table)."""
    from moelens.store import TraceStore

    paths = TraceStore(db, read_only=True).export_parquet(run, parquet)
    console.print(f"wrote {len(paths)} files to {parquet}")


@app.command()
def delete(run: int = typer.Argument(...), db: Path = DbOption,
           yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation.")) -> None:
    """Delete a run and all its rows."""
    from moelens.store import TraceStore

    store = TraceStore(db)
    info = store.run(run)
    if not yes and not typer.confirm(f"Delete run {run} ({info['model']}, {info['status']})?"):
        raise typer.Exit(1)
    store.delete_run(run)
    console.print(f"deleted run {run}")


@app.command("app")
def open_app(db: Path = DbOption, port: Optional[int] = typer.Option(None, "--port")) -> None:
    """Open the Streamlit workbench on a trace store."""
    from moelens.app_launcher import launch

    launch(db, port=port)


def _register_optional() -> None:
    """Sub-commands that live next to their feature (analysis, demo, steering)."""
    from moelens.cli_commands import register

    register(app)


_register_optional()

if __name__ == "__main__":
    main()
