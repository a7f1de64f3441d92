"""Request limits against the real server process (`manage.py serve`: Granian + ocrsite.limits).

The server runs with a 5 MB upload limit, 2 s header and body timeouts and 1024 file descriptors.
Oversize bodies are refused before they are read, with the server's memory measured exactly (its
peak RSS, reset before each probe); trickling clients are driven until the server closes them.
"""

from __future__ import annotations

import json
import shutil
import socket
import time

import pytest

from tests.fakes.pages import make_pdf
from tests.support import manage, project_env
from tests.http_probes import (
    MB,
    Site,
    file_chunks,
    multipart_upload,
    page_messages,
    peak_rss,
    reset_peak_rss,
    rss,
    running_site,
    send_request,
    write_padded_pdf,
    zeros,
)

pytestmark = pytest.mark.timeout(180)

TIMEOUT_MS = 2000
RSS_MARGIN = 100 * MB  # the bound: the server's RSS stays within 100 MB of idle


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    data = tmp_path_factory.mktemp("limits-site")
    limits = {"OCRSITE_MAX_UPLOAD_MB": "5", "OCRSITE_HEADER_TIMEOUT_MS": str(TIMEOUT_MS), "OCRSITE_BODY_TIMEOUT_MS": str(TIMEOUT_MS)}
    with running_site(data, limits) as site:
        yield site
    shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="module")
def session(site):
    return site.login()


def refused_within_rss_margin(site: Site, send) -> object:
    """Runs `send` and returns its reply, asserting the server's peak RSS stayed within the margin."""
    media, scans = site.files("media"), site.scan_count()
    idle = rss([site.process.pid])
    reset_peak_rss([site.process.pid])
    reply = send()
    peak = peak_rss([site.process.pid])
    assert peak - idle < RSS_MARGIN, f"peak RSS {peak / MB:.0f} MB, idle {idle / MB:.0f} MB"
    assert site.files("tmp") == [] and site.files("media") == media and site.scan_count() == scans
    return reply


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_300_mb_upload_is_refused_before_it_is_read(site, session, chunked) -> None:
    reply = refused_within_rss_margin(
        site, lambda: multipart_upload(session, [("big.pdf", zeros(300 * MB), 300 * MB)], chunked=chunked)
    )
    assert reply.status == 413
    expected = (
        "The request body is larger than 6.0 MB, the limit for this address." if chunked
        else "The request body is 300.0 MB; this address accepts at most 6.0 MB."
    )
    assert expected in reply.body.decode()  # an HTML page for a browser (Accept: text/html)
    # The server stopped reading: what was sent is what the kernel's socket buffers took, not 300 MB.
    assert reply.sent < 50 * MB


def test_an_anonymous_300_mb_post_to_login_is_refused_before_it_is_read(site) -> None:
    head = (
        f"POST /login/ HTTP/1.1\r\nHost: 127.0.0.1:{site.port}\r\n"
        f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {300 * MB}"
    )
    reply = refused_within_rss_margin(site, lambda: send_request(site.port, head, zeros(300 * MB)))
    assert reply.status == 413 and reply.sent < 50 * MB
    assert reply.body.decode().strip() == "The request body is 300.0 MB; this address accepts at most 2.5 MB."


def test_an_upload_at_the_limit_is_stored_and_watched_over_a_websocket(site, session, tmp_path) -> None:
    from websockets.sync.client import connect

    pdf = write_padded_pdf(tmp_path / "at-limit.pdf", 5 * MB)
    assert 5 * MB - 1024 < pdf.stat().st_size <= 5 * MB
    reply = multipart_upload(session, [("at-limit.pdf", file_chunks(pdf), pdf.stat().st_size)])
    assert reply.status == 302, reply.body[:2000]
    scan_path = reply.header("location")
    scan_id = int(scan_path.rstrip("/").rsplit("/", 1)[1])
    assert site.files("tmp") == [] and len(site.files("media")) == 1
    with connect(
        f"ws://127.0.0.1:{site.port}/ws/scans/{scan_id}/", open_timeout=30,
        additional_headers={"Cookie": session.cookie_header, "Origin": f"http://127.0.0.1:{site.port}"},
    ) as ws:
        snapshot = json.loads(ws.recv(timeout=30))
    assert snapshot["scan"]["id"] == scan_id and snapshot["scan"]["page_count"] == 1


def test_a_small_upload_with_several_files_still_works(site, session, tmp_path) -> None:
    files = [make_pdf(tmp_path / f"doc{n}.pdf", n) for n in (1, 2)]
    reply = multipart_upload(session, [(f.name, [f.read_bytes()], f.stat().st_size) for f in files])
    assert reply.status == 302 and reply.header("location") == "/scans/"


def read_until_closed(sock: socket.socket, trickle: bytes, every: float, safety: float = 60) -> tuple[bytes, float]:
    """Keeps sending `trickle` every `every` seconds until the server closes the connection; returns
    what it answered and when it closed (the safety limit only guards against a hang)."""
    started = time.monotonic()
    sock.settimeout(every)
    answer = b""
    while time.monotonic() - started < safety:
        try:
            sock.sendall(trickle)
        except OSError:
            break
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            break
        if not data:
            break
        answer += data
    else:
        raise AssertionError(f"the server kept a trickling client for {safety} s")
    return answer, time.monotonic() - started


def test_a_client_trickling_its_request_head_is_disconnected(site) -> None:
    with socket.create_connection(("127.0.0.1", site.port)) as sock:
        sock.sendall(f"GET /login/ HTTP/1.1\r\nHost: 127.0.0.1:{site.port}\r\nX-Padding: ".encode())
        answer, seconds = read_until_closed(sock, b"a", every=0.1)
    assert seconds >= TIMEOUT_MS / 1000 * 0.9
    assert b"200 OK" not in answer


def test_a_client_trickling_its_body_is_answered_408_and_disconnected(site) -> None:
    with socket.create_connection(("127.0.0.1", site.port)) as sock:
        sock.sendall(
            f"POST /login/ HTTP/1.1\r\nHost: 127.0.0.1:{site.port}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100000\r\n\r\n".encode()
        )
        answer, seconds = read_until_closed(sock, b"a" * 20, every=0.1)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:300]
    assert b"arrived too slowly" in answer
    assert seconds >= TIMEOUT_MS / 1000 * 0.9


def test_too_many_files_at_once_are_refused_with_a_message_on_the_upload_page(site, session) -> None:
    before = site.scan_count()
    files = [(f"f{n}.png", [b"x"], 1) for n in range(101)]
    reply = multipart_upload(session, files)
    assert reply.status == 303 and reply.header("location") == "/scans/upload/"
    status, _, page = session.request("GET", "/scans/upload/")
    assert status == 200
    assert "Too many files at once: one upload takes at most 100. Nothing was uploaded; choose fewer files." in page_messages(page)
    assert site.files("tmp") == [] and site.scan_count() == before


def test_serve_on_a_port_in_use_says_so_before_starting_anything(tmp_path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = manage(["serve", "--port", str(port)], project_env(tmp_path), timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip() == f"CommandError: Cannot serve on 127.0.0.1:{port}: Address already in use."
