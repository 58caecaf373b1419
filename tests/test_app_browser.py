"""End to end: the real app (``streamlit run``, headless, free localhost port) on the fixture store, driven by
Debian's chromium through Playwright. Visits every page, fails on any exception Streamlit shows, hovers a
token to check the routing tooltip, follows a drill-down link (nPMI bar -> expert profile) and saves
screenshots under tests/_artifacts/. One good one is copied to docs/screenshots/fixture_experts.png when it
is missing or MOELENS_UPDATE_SCREENSHOTS=1 (so test runs leave git clean). Skipped with the reason when
chromium or playwright is missing. Bounded: < 2 minutes.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from app_fixtures import make_store

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "_artifacts"
SCREENSHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = os.environ.get("MOELENS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]  # fmt: skip
#: URL path of each page (Streamlit derives it from the file name without the number prefix).
PAGES = ["", "Tokens", "Experts", "Specialization", "Consistency", "Committee", "nPMI", "Co-activation", "Map",
         "Compare", "Steer", "Router", "SQL"]  # fmt: skip
BUDGET_S = 115  # the whole test, start to finish


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"chromium not found at {CHROMIUM} (apt-get install -y chromium, or set MOELENS_CHROMIUM)")
    pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")
    pytest.importorskip("streamlit")
    info = make_store(tmp_path_factory.mktemp("browser") / "fixture.duckdb")
    port = _free_port()
    log = (tmp_path_factory.getbasetemp() / "streamlit.log").open("w")
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "Home.py"), "--server.port", str(port),
           "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--server.fileWatcherType", "none", "--", "--db", str(info["path"])]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.3)
        if proc.poll() is not None:
            pytest.fail(f"streamlit exited early ({proc.returncode}); see {log.name}")
    else:
        proc.terminate()
        pytest.fail(f"streamlit did not answer on {url} within 45 s; see {log.name}")
    yield {"url": url, **info}
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _settle(page, timeout_ms: int = 40_000) -> None:
    """Wait until the script has run and the page has rendered (title shown, script idle, charts drawn)."""
    page.wait_for_selector("h1", timeout=timeout_ms)
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=timeout_ms)
    page.wait_for_function(
        """() => [...document.querySelectorAll('[data-testid="stPlotlyChart"]')]
                 .every(c => c.querySelector('.main-svg'))""",
        timeout=timeout_ms,
    )
    page.wait_for_timeout(300)


def test_every_page_in_chromium(server) -> None:
    from playwright.sync_api import sync_playwright

    t_start = time.monotonic()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    timings: dict[str, float] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            for name in PAGES:
                page.goto(f"{server['url']}/{name}", wait_until="domcontentloaded")
                _settle(page)
                shown = page.locator('[data-testid="stException"]')
                if shown.count():
                    failures.append(f"/{name}: {shown.first.inner_text()[:500]}")
                page.screenshot(path=str(ARTIFACTS / f"page_{name or 'Home'}.png"), full_page=True)
                timings[name or "Home"] = round(time.monotonic() - t_start, 1)
                assert time.monotonic() - t_start < BUDGET_S, "browser test over its time budget"

            # multibyte text arrives exactly (sequence 14 holds Japanese and an emoji)
            page.goto(f"{server['url']}/Tokens?seq=14", wait_until="domcontentloaded")
            _settle(page)
            assert "日本語" in page.locator(".moelens-tokens").inner_text()

            # hover a token: the tooltip lists the token's experts at every layer
            page.goto(f"{server['url']}/Tokens?seq=0", wait_until="domcontentloaded")
            _settle(page)
            token = page.locator(".moelens-tokens .ml-tok").nth(3)
            token.hover()
            tip = token.get_attribute("data-tip") or ""
            assert "L1  " in tip and "L4  " in tip, tip
            page.wait_for_timeout(200)
            page.screenshot(path=str(ARTIFACTS / "tokens_hover.png"))
            timings["hover"] = round(time.monotonic() - t_start, 1)

            # drill-down: click an expert's bar on the nPMI page, follow the link to its profile
            page.goto(f"{server['url']}/nPMI", wait_until="domcontentloaded")
            _settle(page)
            bar = page.locator('[data-testid="stPlotlyChart"] .bars .point').last.bounding_box()  # the top bar
            page.mouse.click(bar["x"] + bar["width"] / 2, bar["y"] + bar["height"] / 2)
            link = page.get_by_text("Open the profile of", exact=False)
            link.wait_for(timeout=30_000)
            wanted = link.inner_text().split("of ")[1].split(" in layer ")  # ["E5", "L2"]
            link.click()
            page.wait_for_url("**/Experts**", timeout=30_000)
            _settle(page)
            assert page.get_by_text(f"{wanted[0]} in layer {wanted[1]}", exact=False).count(), wanted
            timings["drill-down"] = round(time.monotonic() - t_start, 1)

            # the Experts page is the one shown in the docs
            page.goto(f"{server['url']}/Experts", wait_until="domcontentloaded")
            _settle(page)
            assert page.locator('[data-testid="stPlotlyChart"]').count() >= 3
            shot = ARTIFACTS / "experts.png"
            page.screenshot(path=str(shot))
            # one good screenshot goes to the docs; refreshed only on request so test runs leave git clean
            target = SCREENSHOTS / "fixture_experts.png"
            if not failures and (not target.exists() or os.environ.get("MOELENS_UPDATE_SCREENSHOTS")):
                SCREENSHOTS.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shot, target)
            assert not errors, f"JavaScript errors: {errors[:3]}"
        finally:
            browser.close()
    print("cumulative seconds after each page:", timings)
    assert not failures, "\n".join(failures)
    assert time.monotonic() - t_start < BUDGET_S


def test_steer_generate_twice_saves_nothing(server) -> None:
    """The Steer page in chromium: load the bundled model, press Generate twice, and the store holds exactly the
    runs it had before (saving is a separate, explicit button)."""
    from playwright.sync_api import sync_playwright

    from moelens import TraceStore
    from moelens.demo import DEMO_MODEL_DIR

    if not (DEMO_MODEL_DIR / "model.safetensors").exists():
        pytest.skip("demo model not shipped")
    before = TraceStore(server["path"], read_only=True).runs()["run_id"].tolist()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{server['url']}/Steer", wait_until="domcontentloaded")
            _settle(page)
            page.get_by_role("button", name="Load model").click()
            page.get_by_text("experts, top-", exact=False).wait_for(timeout=120_000)
            for i in range(2):
                page.get_by_role("button", name="Generate baseline and steered").click()
                _settle(page, timeout_ms=180_000)
                page.get_by_text("Baseline vs steered", exact=True).wait_for(timeout=180_000)
                page.locator(".moelens-tokens").nth(1).wait_for(timeout=60_000)  # both token views rendered
                assert page.locator(".moelens-tokens").count() == 2
                assert page.get_by_role("button", name="Save as runs").count() == 1
            # the default prompt and intervention change the bundled model's output visibly
            outlined = page.get_by_text("positions whose text differs", exact=False).inner_text()
            assert not outlined.startswith("Red outline: the 0 "), outlined
            page.screenshot(path=str(ARTIFACTS / "steer.png"), full_page=True)
            assert not page.locator('[data-testid="stException"]').count()
        finally:
            browser.close()
    assert TraceStore(server["path"], read_only=True).runs()["run_id"].tolist() == before, "Generate saved a run"
