"""What every `moelens` command shares: the typer app, the consoles, common options, table output, model specs.

Commands live in one module per group next to this one and register themselves on ``app`` with
``@app.command()``; ``moelens.cli`` imports them in the order ``moelens --help`` lists them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from moelens.errors import InputError
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

FORMATS = ("table", "csv", "json")


def db_option(help: str = "Trace store (DuckDB file).") -> Path:
    return typer.Option(DEFAULT_DB, "--db", help=help)


def format_option() -> str:
    return typer.Option("table", "--format", "-f", help="table | csv | json")


def check_format(fmt: str) -> None:
    """Refuse an unknown ``--format`` before any work is done."""
    if fmt not in FORMATS:
        raise InputError(f"--format must be table, csv or json, not {fmt!r}")


def emit(df, fmt: str, title: str | None = None) -> None:
    """Print a DataFrame as a rich table, CSV or JSON (records)."""
    check_format(fmt)
    if fmt == "csv":
        sys.stdout.write(df.to_csv(index=False))
    elif fmt == "json":
        sys.stdout.write(df.to_json(orient="records", date_format="iso", default_handler=str) + "\n")
    else:
        from rich.table import Table

        table = Table(title=title, show_lines=False)
        for col in df.columns:
            table.add_column(str(col), justify="right" if df[col].dtype.kind in "iuf" else "left")
        for row in df.itertuples(index=False):
            table.add_row(*(_cell(v) for v in row))
        console.print(table)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


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
