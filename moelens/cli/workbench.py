"""`moelens app`: open the Streamlit workbench on a trace store."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moelens.cli.common import app, db_option


@app.command("app")
def open_app(db: Path = db_option(), port: Optional[int] = typer.Option(None, "--port")) -> None:
    """Open the Streamlit workbench on a trace store."""
    from moelens.app_launcher import launch

    launch(db, port=port)
