"""Installing and starting moelens: the lock file, the torch thread policy and the app launcher's first run.

The lock is checked against pyproject.toml, the Makefile and the installed distributions' own metadata; the
thread policy in fresh interpreters (torch's thread count is per process); the launcher by starting the real
Streamlit server the way a first-time user with a display does (a terminal, no ~/.streamlit, $DISPLAY set).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import pty
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
MAKEFILE = (ROOT / "Makefile").read_text(encoding="utf-8")


def make_var(name: str) -> str:
    match = re.search(rf"^{name}\s*:?=\s*(.+)$", MAKEFILE, re.M)
    assert match, f"Makefile has no {name} variable"
    return match.group(1).strip()


def pins() -> dict[str, Version]:
    """constraints.txt as {canonical name: version}; every line is `name==version`, each name once."""
    out: dict[str, Version] = {}
    for line in (ROOT / make_var("CONSTRAINTS")).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([0-9][^\s;]*)", line.strip())
        assert match, f"constraints.txt line is not name==version: {line!r}"
        name = canonicalize_name(match.group(1))
        assert name not in out, f"{name} pinned twice"
        out[name] = Version(match.group(2))
    return out


def setup_requirements() -> list[Requirement]:
    """The direct requirements `make setup` installs: the dependencies plus the Makefile's extras (recursively)."""
    extras = PYPROJECT["optional-dependencies"]
    todo, seen, reqs = list(make_var("EXTRAS").split(",")), set(), [Requirement(r) for r in PYPROJECT["dependencies"]]
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        assert extra in extras, f"Makefile installs extra {extra!r} that pyproject.toml does not define"
        for req in map(Requirement, extras[extra]):
            if canonicalize_name(req.name) == "moelens":
                todo += sorted(req.extras)
            else:
                reqs.append(req)
    return reqs


def test_lock_pins_every_direct_requirement_within_pyproject_bounds() -> None:
    pinned = pins()
    for req in setup_requirements():
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req} is not pinned in constraints.txt (run `make lock`)"
        assert req.specifier.contains(pinned[name], prereleases=True), f"pin {name}=={pinned[name]} violates {req}"
    assert pinned["torch"] == Version(make_var("TORCH")), "constraints.txt and the Makefile pin different torch"
    assert "moelens" not in pinned


def test_make_setup_installs_the_lock_for_every_extra_but_datasets() -> None:
    assert re.search(r"^\$\(STAMP\):.*\$\(CONSTRAINTS\)", MAKEFILE, re.M), "the stamp must depend on the lock"
    install = [line for line in MAKEFILE.splitlines() if 'install -q -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"' in line]
    assert install, "make setup must install moelens with -c constraints.txt"
    setup = MAKEFILE[MAKEFILE.index("$(STAMP):"):]
    assert setup.index("torch==$(TORCH)") < setup.index("-c $(CONSTRAINTS)"), "torch goes first"
    # datasets only serves hf:NAME inputs, which need the hub: not part of the offline setup.
    assert set(make_var("EXTRAS").split(",")) == set(PYPROJECT["optional-dependencies"]) - {"datasets"}


def _installed_closure(reqs: list[Requirement]) -> set[str]:
    """Names of the installed distributions `reqs` pull in, following each one's own Requires-Dist and extras."""
    todo = [(canonicalize_name(req.name), frozenset(req.extras)) for req in reqs]
    visited, installed = set(), set()
    while todo:
        item = todo.pop()
        if item in visited:
            continue
        visited.add(item)
        name, extras = item
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:  # an extra or platform this environment was not set up with
            continue
        installed.add(name)
        envs = [{"extra": extra} for extra in extras] or [{"extra": ""}]
        for sub in map(Requirement, dist.requires or []):
            if sub.marker is None or any(sub.marker.evaluate(env) for env in envs):
                todo.append((canonicalize_name(sub.name), frozenset(sub.extras)))
    return installed


def test_lock_covers_every_installed_transitive_requirement() -> None:
    """A lock missing a transitive dependency lets a fresh machine resolve it to whatever is newest."""
    missing = _installed_closure(setup_requirements()) - set(pins())
    assert not missing, f"installed requirements not pinned in constraints.txt: {sorted(missing)} (run `make lock`)"


# -- torch threads --------------------------------------------------------------------------------------------


def test_default_threads_leave_small_machines_one_core() -> None:
    from moelens.threads import MAX_DEFAULT_THREADS, default_threads

    assert [default_threads(c) for c in (1, 2, 3, 4, 8, 16, 64)] == [1, 1, 1, 2, 4, 8, MAX_DEFAULT_THREADS]


def test_bad_thread_counts_say_where_they_came_from(monkeypatch) -> None:
    from moelens.errors import InputError
    from moelens.threads import THREADS_ENV, chosen_threads, parse_threads

    assert parse_threads(" 3 ") == 3
    for bad in ("0", "-2", "two", "1.5"):
        monkeypatch.setenv(THREADS_ENV, bad)
        with pytest.raises(InputError, match=f"{THREADS_ENV} must be a positive number of threads, not '{re.escape(bad)}'"):
            chosen_threads()


def _python(code: str, **env: str | None) -> list[str]:
    """What ``code`` prints in a fresh interpreter (this one's), with env changes (None removes a variable)."""
    full = {**os.environ, "PYTHONPATH": str(ROOT)}
    for key, value in env.items():
        full.pop(key, None) if value is None else full.__setitem__(key, value)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=full, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()


APPLY = "import torch; from moelens.threads import apply_thread_policy; apply_thread_policy(); print(torch.get_num_threads())"


def test_moelens_load_applies_the_env_override() -> None:
    code = ("import moelens, torch; from moelens.demo import DEMO_MODEL_DIR; moelens.load(DEMO_MODEL_DIR); "
            "print(torch.get_num_threads())")
    assert _python(code, MOELENS_THREADS="3", OMP_NUM_THREADS="1") == ["3"]


def test_thread_policy_default_and_omp() -> None:
    from moelens.threads import default_threads

    assert _python(APPLY, MOELENS_THREADS=None, OMP_NUM_THREADS=None) == [str(default_threads())]
    # OMP_NUM_THREADS already decided torch's count: left alone.
    assert _python(APPLY, MOELENS_THREADS=None, OMP_NUM_THREADS="2") == ["2"]


def test_thread_policy_applies_once_so_the_users_choice_stays() -> None:
    code = APPLY + "; torch.set_num_threads(2); apply_thread_policy(); print(torch.get_num_threads())"
    code += "; import moelens; moelens.set_threads(3); print(torch.get_num_threads())"
    assert _python(code, MOELENS_THREADS="1", OMP_NUM_THREADS=None) == ["1", "2", "3"]


def test_cli_threads_option_reaches_torch(tmp_path: Path) -> None:
    code = ("import torch, sys; from moelens.cli import main\n"
            "try:\n"
            f"    main(['--threads', '3', 'record', 'tiny:mixtral', '--text', 'a b c', '--db', {str(tmp_path / 't.duckdb')!r}])\n"
            "except SystemExit as exc:\n"
            "    assert not exc.code, exc.code\n"
            "print(torch.get_num_threads())")
    assert _python(code, MOELENS_THREADS=None, OMP_NUM_THREADS="1")[-1] == "3"
    bad = subprocess.run([sys.executable, "-m", "moelens.cli", "--threads", "0", "runs"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert bad.returncode == 2 and "--threads" in bad.stderr


# -- the app launcher on a first run --------------------------------------------------------------------------


def test_launcher_runs_headless_without_usage_stats_by_default(tmp_path: Path) -> None:
    from moelens import app_launcher

    cmd = app_launcher.command(tmp_path / "x.duckdb")
    flags = dict(zip(cmd[5:cmd.index("--"):2], cmd[6:cmd.index("--"):2]))
    assert flags == {"--browser.gatherUsageStats": "false", "--server.headless": "true"}
    assert app_launcher.command(tmp_path / "x.duckdb", headless=False)[cmd.index("--server.headless") + 1] == "false"
    assert app_launcher.server_env(tmp_path / "x.duckdb")["STREAMLIT_SERVER_SHOW_EMAIL_PROMPT"] == "false"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("headless", [True, False], ids=["headless", "browser"])
def test_first_run_in_a_terminal_serves_without_an_email_prompt(tmp_path: Path, headless: bool) -> None:
    """Streamlit asks a first-time user with a display for an email and serves nothing until it is answered."""
    pytest.importorskip("streamlit")
    from moelens import app_launcher

    port = _free_port()
    home = tmp_path / "home"
    home.mkdir()
    env = {**app_launcher.server_env(tmp_path / "x.duckdb"), "HOME": str(home), "DISPLAY": ":99",
           "BROWSER": "true"}  # headless=False opens a "browser": the no-op `true`
    leader, follower = pty.openpty()
    proc = subprocess.Popen(app_launcher.command(tmp_path / "x.duckdb", port=port, headless=headless), env=env,
                            stdin=follower, stdout=follower, stderr=follower, cwd=tmp_path)
    os.close(follower)
    output = bytearray()
    reader = threading.Thread(target=_drain, args=(leader, output), daemon=True)
    reader.start()
    try:
        answer = _health(port, proc, deadline=time.monotonic() + 120)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        reader.join(timeout=5)
        os.close(leader)
    text = output.decode(errors="replace")
    assert "Email" not in text, text
    assert answer == "ok", text


def _drain(fd: int, into: bytearray) -> None:
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            return
        if not chunk:
            return
        into += chunk


def _health(port: int, proc: subprocess.Popen, deadline: float) -> str:
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as response:
                return response.read().decode()
        except OSError:
            time.sleep(0.5)
    return "no answer"


def test_a_deprecation_that_moelens_code_triggers_fails_the_suite() -> None:
    """pyproject's filterwarnings: warnings attributed to a moelens module are errors, others' stay warnings."""
    import warnings

    for module, category in (("moelens.analysis.fake", FutureWarning), ("moelens.fake", DeprecationWarning)):
        with pytest.raises(category):
            exec("import warnings; warnings.warn('old call', category)", {"__name__": module, "category": category})
    with warnings.catch_warnings(record=True) as caught:
        exec("import warnings; warnings.warn('their own', FutureWarning)", {"__name__": "somelib.internal"})
    assert [str(w.message) for w in caught] == ["their own"]
