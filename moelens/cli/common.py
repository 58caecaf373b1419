"""What every `moelens` command shares: the typer app, the consoles, common options, table output, model specs.

Commands live in one module per group next to this one and register themselves on ``app`` with
``@app.command()``; ``moelens.cli`` imports them in the order ``moelens --help`` lists them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from moelens.errors import InputError, did_you_mean
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


@app.callback()
def _global_options(
    threads: Optional[int] = typer.Option(
        None, "--threads", min=1, envvar="MOELENS_THREADS", show_envvar=True,
        help="torch CPU threads (default: 1 on <= 2 cores, else half the cores, at most 8)."),
) -> None:
    """Record, store, analyse and steer the routing of Mixture-of-Experts language models."""
    if threads is not None:
        from moelens.threads import THREADS_ENV

        os.environ[THREADS_ENV] = str(threads)  # applied when torch work starts; inherited by the app server

FORMATS = ("table", "csv", "json")


# Option factories: typer reads options from each command's signature, so commands share them through these.
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


#: How a table shows a missing value (NULL, NaN, pandas NA): one marker everywhere.
MISSING = "-"


def _cell(value) -> str:
    """Integers as integers (also integral floats: 151050, not 1.51e+05), other floats to 4 digits, one marker
    for a missing value."""
    import pandas as pd

    if value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and value != value):
        return MISSING
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"
    return str(value)


def device_option() -> Optional[str]:
    return typer.Option(None, "--device", help="Device to move the model to (default cpu), e.g. cuda:0.")


def device_map_option() -> Optional[str]:
    return typer.Option(None, "--device-map", help="Place the model while it loads: auto | cpu | cuda:0 | JSON like '{\"\": 0}' (auto and JSON need accelerate).")


def dtype_option() -> str:
    return typer.Option("auto", "--dtype", help="auto | float32 (fp32) | bfloat16 (bf16) | float16 (fp16)")


def revision_option() -> Optional[str]:
    return typer.Option(None, "--revision", help="Hub branch, tag or commit of the model.")


def trust_remote_code_option() -> bool:
    return typer.Option(False, "--trust-remote-code", help="Run code shipped with the model (only for models you trust).")


def allow_random_router_option() -> bool:
    return typer.Option(False, "--allow-random-router", help="Load a checkpoint even if its router weights are missing (randomly initialised).")


def resolve_model(spec: str, *, device: str | None = None, device_map: str | None = None, dtype: str = "auto",
                  revision: str | None = None, trust_remote_code: bool = False, allow_random_router: bool = False):
    """``(model, tokenizer, name)`` for ``demo`` (the bundled model), ``demo:early`` (its early checkpoint),
    ``tiny:TYPE`` (a random tiny model) or a folder/hub id (see `moelens.load`)."""
    from moelens.threads import apply_thread_policy

    apply_thread_policy()
    from moelens.demo import model_path

    spec = model_path(spec)
    if spec.startswith("tiny:"):
        return (*_tiny(spec[5:], device=device, dtype=dtype), spec)
    from moelens.recording.loading import load_model, parse_device_map

    model, tokenizer = load_model(spec, device=device, device_map=parse_device_map(device_map), dtype=dtype,
                                  revision=revision, trust_remote_code=trust_remote_code,
                                  allow_missing_router_weights=allow_random_router)
    return model, tokenizer, spec


def _tiny(model_type: str, *, device: str | None, dtype: str):
    """A random tiny model of ``model_type`` and its tokenizer; an unknown type gets the closest MoE type."""
    from transformers import CONFIG_MAPPING

    from moelens.adapters import SUPPORTED_MODEL_TYPES
    from moelens.recording.loading import resolve_dtype
    from moelens.tiny import tiny_model, tiny_tokenizer

    if model_type not in CONFIG_MAPPING:
        choices = [f"tiny:{name}" for name in SUPPORTED_MODEL_TYPES]
        raise InputError(f"tiny:{model_type}: unknown model type{did_you_mean(f'tiny:{model_type}', choices)}; "
                         f"MoE types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    torch_dtype = resolve_dtype(dtype)
    model, _ = tiny_model(model_type)
    model = model.to(device or "cpu", **({} if torch_dtype == "auto" else {"dtype": torch_dtype}))
    return model, tiny_tokenizer(model.config.vocab_size)
