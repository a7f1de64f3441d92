"""Live pages in real headless Chromium against the real server process (Daphne, lifespan, supervisor,
embedded runner, in-memory channel layer) with the vLLM test double as the model server."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from tests.browser.conftest import WATCH_STATES, page_texts, states_seen, upload_and_watch_until_done
from tests.fakes.pages import make_pdf
from tests.support import manage

pytestmark = pytest.mark.browser

def test_settings_page_shows_start_then_a_crash_and_restart(page, server):
    """Runs first in this module: the autostarted model server is held in `starting` until released."""
    page.goto(f"{server.url}/settings/")
    marker = page.evaluate(WATCH_STATES, ["#server-status", "data-state"])
    page.wait_for_selector("#server-status[data-state=starting]")
    server.release_model_server()
    page.wait_for_selector("#server-status[data-state=ready]", timeout=60_000)
    assert "starting" in states_seen(page, "server-status"), states_seen(page, "server-status")
    assert page.locator("#server-indicator").get_attribute("data-state") == "ready"
    pid = int(page.locator("#server-status [data-field=pid]").get_attribute("data-pid"))
    assert pid > 0
    page.screenshot(path="/tmp/ocrsite-settings-page.png", full_page=True)

    os.kill(pid, signal.SIGKILL)
    page.wait_for_function(
        "(pid) => { const el = document.querySelector('#server-status [data-field=pid]');"
        " return document.querySelector('#server-status').dataset.state === 'ready' && el.dataset.pid"
        " && el.dataset.pid !== String(pid); }",
        arg=pid,
        timeout=60_000,
    )
    after_kill = states_seen(page, "server-status")
    assert after_kill[-1] == "ready"
    assert {"unhealthy", "starting", "failed"} & set(after_kill[after_kill.index("ready") + 1:]), after_kill
    assert page.evaluate("window.__loadMarker") == marker  # no reload happened
    assert int(page.locator("#server-status [data-field=restart_count]").inner_text()) >= 1


def test_upload_watch_pages_complete_read_and_download(page, server, tmp_path: Path):
    pages = 4
    histories = upload_and_watch_until_done(page, server, make_pdf(tmp_path / "four-pages.pdf", pages), pages)
    assert any(len(history) > 1 for history in histories), f"no page changed live: {histories}"

    joined = "\n".join(page_texts(page))
    positions = [joined.find(f"PAGE {n}") for n in range(1, pages + 1)]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), joined[:500]
    assert page.locator("#scan [data-field=counts]").inner_text().startswith(f"{pages}/{pages} done")
    assert page.locator("#scan form[action$='/cancel/']").is_hidden()
    page.wait_for_function(
        "() => [...document.querySelectorAll('.page-image img')].every((img) => img.complete && img.naturalWidth > 0)"
    )
    page.screenshot(path="/tmp/ocrsite-scan-page.png", full_page=True)

    with page.expect_download() as download_info:
        page.click("a[href$='download.md']")
    markdown = Path(download_info.value.path()).read_text()
    positions = [markdown.find(f"PAGE {n}") for n in range(1, pages + 1)]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), markdown[:500]


def test_script_in_page_text_renders_inert(page, server, tmp_path: Path):
    pdf = make_pdf(tmp_path / "one-page.pdf", 1)
    page.goto(f"{server.url}/scans/upload/")
    page.set_input_files("#files", str(pdf))
    page.click("#upload-form button[type=submit]")
    page.wait_for_url(re.compile(r".*/scans/\d+/$"))
    scan_id = int(page.url.rstrip("/").rsplit("/", 1)[1])
    page.wait_for_selector("#page-1[data-status=done]", timeout=90_000)
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))

    evil = '<script>window.__pwned = 1; alert(1)</script><img src=x onerror="window.__pwned = 2; alert(2)">'
    long_evil = evil + " filler" * 100  # longer than the preview: the full text is fetched over HTTP too
    script = (
        "from scans.models import Page; "
        f"Page.objects.filter(scan_id={scan_id}, number=1).update(text={long_evil!r})"
    )
    result = manage(["shell", "-c", script], server.env)
    assert result.returncode == 0, result.stderr[-2000:]

    page.evaluate("window.ocrsiteLive.resync()")
    page.wait_for_function(
        "() => document.querySelector('#page-1 [data-field=text]').textContent.endsWith('filler')"
    )
    text = page.locator("#page-1 [data-field=text]")
    assert text.text_content().startswith("<script>window.__pwned")
    assert text.evaluate("(el) => el.children.length") == 0
    page.reload()  # and the server-rendered page escapes it too
    page.wait_for_selector("#page-1[data-status=done]")
    assert page.locator("#page-1 [data-field=text]").evaluate("(el) => el.children.length") == 0
    page.wait_for_timeout(300)
    assert page.evaluate("window.__pwned") is None
    assert dialogs == []


def test_settings_page_stop_start_and_test_connection_buttons(page, server):
    server.release_model_server()  # already released when the module's tests run in order
    page.goto(f"{server.url}/settings/")
    page.wait_for_selector("#server-status[data-state=ready]", timeout=60_000)
    page.click("#test-connection-button")
    page.wait_for_function("() => document.querySelector('#test-connection-result').className === 'ok'")
    assert page.locator("#test-connection-result").inner_text().startswith("Connected to http://127.0.0.1:")

    page.click("#server-controls button:has-text('Stop')")
    page.wait_for_selector("#server-status[data-state=stopped]", timeout=30_000)
    # The live status may arrive before the POST's answer: wait for the answer, then check it.
    page.wait_for_function("() => document.querySelector('#server-control-result').textContent !== '…'")
    assert page.locator("#server-control-result").inner_text() == "The vLLM server was stopped."
    page.click("#server-controls button:has-text('Start')")
    page.wait_for_selector("#server-status[data-state=ready]", timeout=60_000)
