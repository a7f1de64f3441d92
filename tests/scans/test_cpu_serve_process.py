"""A real `manage.py serve` (Built-in mode, its embedded runner, real Tesseract) in the middle of a long
CPU scan: Cancel from a logged-in session stops the scan's work, and SIGTERM ends the process with the
pages it had not read given back to the queue.

The scan has far more pages than the machine reads in the moments between a page being seen running
and the test acting, and every wait is for a state in the site's database; timeouts are safety nets.
How long Cancel and SIGTERM take is measured by bench/bench_cpu_scans.py, not asserted here.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from tests.http_probes import file_chunks, multipart_upload, running_site
from tests.scans.ocr_corpus import PARAGRAPHS, image_only_pdf, make_born_digital_pdf, render_pdf_pages
from tests.scans.ocr_processes import query
from tests.support import wait_until

pytestmark = pytest.mark.timeout(240)

PAGES = 40
SAFETY_S = 120


@pytest.fixture(scope="module")
def long_scan(tmp_path_factory) -> Path:
    """PAGES pages of paragraphs, image-only, as a scanner makes them."""
    folder = tmp_path_factory.mktemp("long-scan")
    born = make_born_digital_pdf(folder / "born.pdf", [[PARAGRAPHS[n % 7 : n % 7 + 3]] for n in range(PAGES)])
    return image_only_pdf(folder / "long.pdf", render_pdf_pages(born, dpi=100), dpi=100)


@pytest.fixture
def site(tmp_path):
    with running_site(tmp_path / "data", {"OCRSITE_EMBEDDED_RUNNER": "true", "OCRSITE_RUNNER_POLL_MS": "200"}) as site:
        yield site


def upload(site, pdf: Path):
    session = site.login()
    reply = multipart_upload(session, [(pdf.name, file_chunks(pdf), pdf.stat().st_size)])
    assert reply.status == 302, reply.head
    (scan_id,) = query(site.data, "SELECT id FROM scans_scan")[0]
    return session, scan_id


def pages(site, scan_id: int) -> dict[str, int]:
    rows = query(site.data, "SELECT status, COUNT(*) FROM scans_page WHERE scan_id = ? GROUP BY status", (scan_id,))
    return dict(rows)


def scan_status(site, scan_id: int) -> str:
    return query(site.data, "SELECT status FROM scans_scan WHERE id = ?", (scan_id,))[0][0]


def heartbeats(site) -> list[str]:
    return [row[0] for row in query(site.data, "SELECT heartbeat_at FROM scans_worker")]


def test_cancel_stops_a_running_cpu_scan(site, long_scan):
    session, scan_id = upload(site, long_scan)
    wait_until(lambda: pages(site, scan_id).get("done", 0) >= 1, SAFETY_S, message="the first page to be read")

    status, _, _ = session.request(
        "POST", f"/scans/{scan_id}/cancel/", b"",
        {"X-CSRFToken": session.csrf_token, "Referer": f"{session.origin}/scans/{scan_id}/"},
    )
    assert status == 302
    wait_until(lambda: "running" not in pages(site, scan_id), SAFETY_S, message="the running pages to be given back")
    after_cancel = pages(site, scan_id)
    # Two more rounds of the runner's periodic work: nothing more of the scan is read or claimed.
    for _ in range(2):
        before = heartbeats(site)
        wait_until(lambda: heartbeats(site) != before, SAFETY_S, message="a heartbeat")
    assert pages(site, scan_id) == after_cancel
    assert scan_status(site, scan_id) == "cancelled"
    assert after_cancel.get("pending", 0) > 0 and sum(after_cancel.values()) == PAGES


def test_sigterm_mid_cpu_scan_exits_and_gives_the_unread_pages_back(site, long_scan):
    _, scan_id = upload(site, long_scan)
    wait_until(lambda: pages(site, scan_id).get("done", 0) >= 1, SAFETY_S, message="the first page to be read")

    site.process.send_signal(signal.SIGTERM)
    try:
        returncode = site.process.wait(timeout=SAFETY_S)
    except subprocess.TimeoutExpired:
        pytest.fail("serve did not exit after SIGTERM: " + (site.data / "server.log").read_text()[-3000:])

    log = (site.data / "server.log").read_text()
    assert returncode == 0, log[-3000:]
    assert "Traceback" not in log
    counts = pages(site, scan_id)
    assert "running" not in counts, counts  # every page it held went back to pending
    assert counts.get("pending", 0) > 0 and counts.get("done", 0) + counts["pending"] == PAGES, counts
    assert scan_status(site, scan_id) in ("queued", "processing")  # not cancelled: it resumes on the next start
