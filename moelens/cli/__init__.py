"""The `moelens` command line: thin commands over recording, the store, analysis, steering, the demo and the app.

The command line is one face and lives here only; the parts it calls return data and raise
`moelens.errors.MoelensError` for bad input, and this package prints (one line + exit 1 for an error, no
traceback). Heavy imports (torch, transformers, streamlit) happen inside the commands that need them.

Layout: ``common`` (the typer ``app``, consoles, ``--db``/``--format`` options, ``emit``, ``resolve_model``)
and one module per command group, each registering its commands with ``@app.command()``:
``record`` (record), ``runs`` (runs, show, export, delete), ``workbench`` (app), ``analyze`` (analyze),
``demo`` (demo, demo train, demo corpus), ``steer`` (steer), ``decode`` (decode), ``prune`` (prune), ``engine`` (import-engine). A new command goes into its group's module
(a new group: a new module, imported below).
"""

from __future__ import annotations

import logging
import sys

from rich.logging import RichHandler
from rich.markup import escape

from moelens.cli.common import app, err_console
from moelens.errors import MoelensError

# Importing a group's module registers its commands; `moelens --help` lists them in this order.
from moelens.cli import record, runs, workbench, analyze, demo, steer, decode, prune, engine  # noqa: E402, F401, I001

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, turning moelens errors into one line and exit code 1."""
    _show_progress_messages()
    try:
        app(args=argv)
    except MoelensError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]; any run being recorded was marked failed")
        sys.exit(130)


def _show_progress_messages() -> None:
    """Show what moelens logs at INFO (steps of long commands) on stderr, once per process."""
    logger = logging.getLogger("moelens")
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        logger.addHandler(RichHandler(console=err_console, show_time=False, show_level=False, show_path=False))
    logger.setLevel(logging.INFO)
