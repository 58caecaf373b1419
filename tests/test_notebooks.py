"""The notebooks (issue #6) run top to bottom on the bundled demo model, and are stored without outputs.

Each notebook is executed by nbclient in a fresh kernel started with *this* interpreter (``sys.executable``),
through a kernel spec written to a temporary folder, so the test never depends on which ``python3`` kernel a
machine has registered. The kernel runs offline (``HF_HUB_OFFLINE=1``, as ``conftest.py`` sets for the tests)
with its working directory and ``TMPDIR`` under pytest's ``tmp_path``, so nothing a notebook writes lands in the
repository. The run tests are skipped, saying why, only when the demo model files are absent. Execution times are
printed at the end of the module (and kept as a junit property ``execution_seconds``).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = ("01_quickstart", "02_specialization", "03_consistency", "04_committee_and_npmi", "05_steering")

#: Seconds one cell may run before the notebook fails (the slowest, a first UMAP fit with numba compilation,
#: takes about a minute on a loaded 2-core machine).
CELL_TIMEOUT = 600
#: How long the kernel may take to start.
STARTUP_TIMEOUT = 120

_TIMES: dict[str, float] = {}
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _ids(path: Path) -> str:
    return path.stem


def _missing_demo_files() -> list[str]:
    from moelens.demo import DEMO_EARLY_DIR, DEMO_MODEL_DIR

    files = ("config.json", "model.safetensors", "tokenizer.json")
    needed = [folder / name for folder in (DEMO_MODEL_DIR, DEMO_EARLY_DIR) for name in files]
    return [str(p) for p in needed if not p.is_file() or _is_lfs_pointer(p)]


def _is_lfs_pointer(path: Path) -> bool:
    """A Git LFS pointer left in place of the weights (a checkout without ``git lfs pull``)."""
    if path.stat().st_size > 1024:
        return False
    return path.read_bytes().startswith(b"version https://git-lfs")


def _kernel_manager(tmp: Path):
    """A kernel manager for a kernel spec that runs this test's interpreter (the venv's python in CI)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    name = "moelens-test"
    spec_dir = tmp / "kernels" / name
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-Xfrozen_modules=off", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"moelens test ({sys.executable})",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    return KernelManager(kernel_name=name, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp / "kernels")]))


def _kernel_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        TMPDIR=str(tmp),  # the notebooks' temporary stores land under pytest's tmp_path, even if a kernel is killed
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PYDEVD_DISABLE_FILE_VALIDATION="1",
        JUPYTER_PLATFORM_DIRS="1",
    )
    return env


@pytest.fixture(scope="module", autouse=True)
def _report_times(request):
    """Print every executed notebook's wall time once the module is done (visible with -q too)."""
    yield
    if not _TIMES:
        return
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"  {name:<28} {seconds:6.1f} s" for name, seconds in sorted(_TIMES.items())]
    lines.append(f"  {'total':<28} {sum(_TIMES.values()):6.1f} s")
    text = "notebook execution times:\n" + "\n".join(lines)
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:  # pragma: no cover - plugins disabled
        print(text)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_line(text)


def test_the_five_notebooks_are_there() -> None:
    missing = set(EXPECTED) - {p.stem for p in NOTEBOOKS}
    assert not missing, f"notebooks missing from {NOTEBOOK_DIR}: {sorted(missing)}"


@pytest.mark.parametrize("path", [*NOTEBOOKS, NOTEBOOK_DIR / "README.md"], ids=lambda p: p.name)
def test_notebooks_cite_papers_not_missing_files(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    cited = set(re.findall(r"[\w-]+\.md\b", text)) - {"README.md"}
    missing = [c for c in cited if not list(NOTEBOOK_DIR.parent.rglob(c))]
    assert not missing, f"{path.name} cites files that are not in the repository: {missing}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_is_stored_without_outputs(path: Path) -> None:
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("language") == "python"
    dirty = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs or execution counts; clear them before saving"
    assert any(cell.cell_type == "markdown" for cell in nb.cells)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_runs_top_to_bottom(path: Path, tmp_path: Path, record_property) -> None:
    missing = _missing_demo_files()
    if missing:
        pytest.skip(f"the bundled demo model is not in this checkout (missing {', '.join(missing)}); "
                    "train it with `moelens demo train`")
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    workdir, tmpdir = tmp_path / "cwd", tmp_path / "tmp"
    workdir.mkdir()
    tmpdir.mkdir()
    km = _kernel_manager(tmp_path)
    client = NotebookClient(
        nb,
        km=km,
        timeout=CELL_TIMEOUT,
        startup_timeout=STARTUP_TIMEOUT,
        allow_errors=False,
        resources={"metadata": {"path": str(workdir)}},
    )
    start = time.perf_counter()
    try:
        client.execute(env=_kernel_env(tmpdir))
    except CellExecutionError as exc:  # the message holds the cell source and the kernel's traceback
        pytest.fail(f"{path.name} failed:\n{_ANSI.sub('', str(exc))}", pytrace=False)
    finally:
        elapsed = time.perf_counter() - start
        _TIMES[path.stem] = elapsed
        record_property("execution_seconds", round(elapsed, 1))
        if km.has_kernel:  # nbclient leaves a kernel it did not create running: stop it (graceful, runs atexit)
            km.shutdown_kernel(now=False)
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    streams = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "IProgress" not in streams and "TqdmWarning" not in streams, "progress bars warn in the notebook"
