"""A real ocrsite server process (Daphne + lifespan through `manage.py serve`) and headless Chromium.

Each test session gets a fresh data directory, a migrated SQLite database, a staff user and the vLLM
test double as VLLM_BIN (Local mode, autostart) with short supervision knobs.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import (
    REPO,
    free_port,
    kill_group,
    manage,
    port_open,
    processes_with_marker,
    project_env,
    wait_until,
)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-gpu",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
USERNAME = "staffer"
PASSWORD = "browser-test-password-1"
SETTINGS_SCRIPT = """
from vllm_control.models import VLMSettings
row = VLMSettings.load()
row.mode = "local"
row.autostart = True
row.restart_delay_s = 1
row.health_check_interval_s = 1
row.start_timeout_s = 60
row.max_restart_attempts = 5
row.page_retries = 1
row.max_in_flight = 1
row.request_timeout_s = 30
row.save()
"""


@dataclass
class Server:
    url: str
    env: dict[str, str]
    process: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def release_model_server(self) -> None:
        """The supervised double stays `starting` until this is called (FAKE_VLLM_HOLD_UNTIL)."""
        hold = self.env.get("FAKE_VLLM_HOLD_UNTIL")
        if hold:
            Path(hold).touch()


@pytest.fixture(scope="session")
def chromium_path() -> str:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed")
    return CHROMIUM


@contextmanager
def running_server(data_dir: Path, extra_env: dict[str, str], settings_script: str | None) -> Iterator[Server]:
    """`manage.py serve` on a free port with a fresh database, a staff user and optional saved settings."""
    port = free_port()
    env = project_env(data_dir, {"DJANGO_SUPERUSER_PASSWORD": PASSWORD, "DEBUG": "1", **extra_env})
    setup = [["migrate", "--noinput"], ["createsuperuser", "--noinput", "--username", USERNAME, "--email", "s@example.com"]]
    if settings_script:
        setup.append(["shell", "-c", settings_script])
    for args in setup:
        result = manage(args, env)
        assert result.returncode == 0, result.stderr[-3000:]
    log = data_dir / "server.log"
    with log.open("wb") as handle:
        process = subprocess.Popen(
            [sys.executable, str(REPO / "manage.py"), "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
        )
    server = Server(url=f"http://127.0.0.1:{port}", env=env, process=process, log=log)
    try:
        wait_until(lambda: port_open(port) or process.poll() is not None, timeout=60, message="the server to listen")
        assert process.poll() is None, server.log_text()
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # lets the lifespan stop the supervised model server
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        kill_group(process.pid)
        process.wait(timeout=10)
        # Anything the test double left behind (it is tagged with the test's marker) goes too.
        for pid in processes_with_marker(env["OCRSITE_TEST_MARKER"]):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    """Local mode supervising the vLLM test double, with short supervision knobs."""
    vllm_port = free_port()
    extra = {
        "VLLM_PORT": str(vllm_port),
        "VLLM_HOST": "127.0.0.1",
        "VLLM_STOP_GRACE_MS": "1000",
        "FAKE_VLLM_LATENCY": "0.5",
        "FAKE_VLLM_STARTUP_DELAY": "0.2",
        "FAKE_VLLM_HOLD_UNTIL": str(tmp_path_factory.mktemp("vllm-hold") / "release"),
    }
    with running_server(tmp_path_factory.mktemp("browser-data"), extra, SETTINGS_SCRIPT) as server:
        yield server


def login(page, server: Server) -> None:
    page.goto(f"{server.url}/login/")
    page.fill("input[name=username]", USERNAME)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit], input[type=submit]")
    page.wait_for_url(f"{server.url}/scans/")


@pytest.fixture(scope="module")
def browser(chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    login(page, server)
    try:
        yield page
    finally:
        context.close()


# Records every state a live element goes through, so a test can tell a live change from a reload.
WATCH_STATES = """
([selector, attribute]) => {
  window.__loadMarker = window.__loadMarker || Math.random();
  window.__seen = window.__seen || {};
  const record = (element) => {
    const key = element.id || selector;
    const value = element.getAttribute(attribute);
    const list = (window.__seen[key] = window.__seen[key] || []);
    if (list[list.length - 1] !== value) list.push(value);
  };
  for (const element of document.querySelectorAll(selector)) {
    record(element);
    new MutationObserver(() => record(element)).observe(element, { attributes: true, attributeFilter: [attribute] });
  }
  return window.__loadMarker;
}
"""


def states_seen(page, key: str) -> list[str]:
    return page.evaluate("(key) => (window.__seen || {})[key] || []", key)


def upload_and_watch_until_done(page, server: Server, pdf: Path, pages: int) -> list[list[str]]:
    """Upload through the page, then wait, without reloading, until the scan and its pages are done.
    Returns each page's status history as the browser showed it."""
    server.release_model_server()
    page.goto(f"{server.url}/scans/upload/")
    page.set_input_files("#files", str(pdf))
    page.click("#upload-form button[type=submit]")
    page.wait_for_url(re.compile(r".*/scans/\d+/$"))
    marker = page.evaluate(WATCH_STATES, ["li.page", "data-status"])
    page.wait_for_function(
        "() => document.querySelector('#scan').dataset.status === 'done'"
        " && [...document.querySelectorAll('li.page')].every((li) => li.dataset.status === 'done')",
        timeout=90_000,
    )
    assert page.evaluate("window.__loadMarker") == marker, "the page reloaded"
    histories = [states_seen(page, f"page-{n}") for n in range(1, pages + 1)]
    assert all(history[-1] == "done" for history in histories), histories
    return histories



def page_texts(page) -> list[str]:
    """Each page's raw text as the scan page shows it, in order. Pages' text loads as they come near
    the window, so this brings each page without its text into view until every page has it."""
    page.wait_for_function(
        """() => {
            const missing = [...document.querySelectorAll('li.page')].find((li) => !li.querySelector('[data-field=text]'));
            if (missing) missing.scrollIntoView();
            return !missing;
        }""",
        polling=100,
    )
    return [text.text_content() for text in page.locator("li.page [data-field=text]").all()]
