"""Start the Streamlit workbench (``app/Home.py``) on a trace store: ``moelens app --db PATH``.

The app lives in the ``app/`` folder at the repository root (next to the ``moelens`` package). This module
only finds it and runs ``streamlit run app/Home.py -- --db PATH`` in a child process; it imports neither
streamlit nor torch itself.

The server runs headless by default: a first-time Streamlit user with a display would otherwise get Streamlit's
"Email:" prompt in the terminal and no server until it is answered (and on a remote machine no browser opens
anyway); the URL is printed instead. Usage statistics stay off.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from moelens.errors import MoelensError

#: Set this to an ``app/`` folder to run a workbench from elsewhere (e.g. a checkout next to an installed wheel).
APP_DIR_ENV = "MOELENS_APP_DIR"


def find_app() -> Path | None:
    """``app/Home.py``: from ``$MOELENS_APP_DIR``, next to the package (source checkout / editable install),
    or under the current directory. None if none is found."""
    candidates = []
    env = os.environ.get(APP_DIR_ENV)
    if env:
        candidates.append(Path(env).expanduser() / "Home.py")
    pkg = Path(__file__).resolve().parent
    candidates += [pkg.parent / "app" / "Home.py", pkg / "app" / "Home.py", Path.cwd() / "app" / "Home.py"]
    for c in candidates:
        if c.is_file():
            return c
    return None


#: Environment for the server: never ask for an email, even when ``headless=False`` lets Streamlit open a browser
#: (streamlit versions without this option ignore it).
STREAMLIT_ENV = {"STREAMLIT_SERVER_SHOW_EMAIL_PROMPT": "false"}


def command(db: Path, port: int | None = None, headless: bool = True, home: Path | None = None) -> list[str]:
    """The ``streamlit run`` command line that `launch` executes."""
    home = home or find_app()
    if home is None:
        raise MoelensError(_not_found())
    cmd = [sys.executable, "-m", "streamlit", "run", str(home), "--browser.gatherUsageStats", "false",
           "--server.headless", "true" if headless else "false"]
    if port is not None:
        cmd += ["--server.port", str(int(port))]
    return [*cmd, "--", "--db", str(Path(db).expanduser().resolve())]


def server_env(db: Path) -> dict[str, str]:
    """The environment `launch` runs the server in: this one, no email prompt, and the store's path."""
    return {**os.environ, **STREAMLIT_ENV, "MOELENS_DB": str(Path(db).expanduser().resolve())}


def _not_found() -> str:
    return (
        "The moelens workbench (app/Home.py) was not found next to the installed package. It ships in the "
        "source repository: run `moelens app` from a checkout (pip install -e '.[app]'), or set "
        f"{APP_DIR_ENV}=/path/to/moelens/app."
    )


def launch(db: Path, port: int | None = None, headless: bool = True) -> int:
    """Run the workbench on ``db`` until it is stopped (Ctrl-C); returns streamlit's exit code."""
    if importlib.util.find_spec("streamlit") is None:
        raise MoelensError("The workbench needs streamlit: pip install 'moelens[app]'")
    cmd = command(Path(db), port=port, headless=headless)
    db_path = Path(db).expanduser()
    if not db_path.exists():
        print(f"note: {db_path} does not exist yet; the app will say how to record a trace.", file=sys.stderr)
    try:
        return subprocess.call(cmd, env=server_env(db_path))
    except KeyboardInterrupt:
        return 0
