"""Request limits against the real server process (`manage.py serve`: Granian + ocrsite.limits).

The server runs with a 5 MB upload limit, 2 s header and body timeouts and 1024 file descriptors.
Oversize bodies are refused before they are read, with the server's memory measured exactly (its
peak RSS, reset before each probe); trickling clients are driven until the server closes them.
"""

from __future__ import annotations

import json
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.http_probes import (
    MB,
    file_chunks,
    login,
    multipart_upload,
    page_messages,
    peak_rss,
    reset_peak_rss,
    rss,
    send_request,
    write_padded_pdf,
    zeros,
)
from tests.fakes.pages import make_pdf
from tests.support import REPO, free_port, kill_group, manage, port_open, project_env, wait_until

pytestmark = pytest.mark.timeout(180)

USERNAME, PASSWORD = "limits", "limits-password-1"
TIMEOUT_MS = 2000
RSS_MARGIN = 100 * MB  # the bound: the server's RSS stays within 100 MB of idle


class Site:
    def __init__(self, data: Path, port: int, process: subprocess.Popen) -> None:
        self.data, self.port, self.process = data, port, process

    def listdir(self, name: str) -> list[str]:
        folder = self.data / name
        return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []

    def scan_count(self) -> int:
        env = project_env(self.data)
        done = manage(["shell", "-c", "from scans.models import Scan; print(Scan.objects.count())"], env)
        assert done.returncode == 0, done.stderr
        return int(done.stdout.split()[-1])


def start_site(data: Path, extra_env: dict[str, str]) -> Site:
    env = project_env(data, {"DJANGO_SUPERUSER_PASSWORD": PASSWORD, "DEBUG": "1", "OCRSITE_EMBEDDED_RUNNER": "false", **extra_env})
    for args in (["migrate", "-v0"], ["createsuperuser", "--noinput", "--username", USERNAME, "--email", "l@example.com"]):
        done = manage(args, env)
        assert done.returncode == 0, done.stderr
    port = free_port()
    log = (data / "server.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, str(REPO / "manage.py"), "serve", "--port", str(port)],
        env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024)),
    )
    wait_until(lambda: port_open(port) or process.poll() is not None, 60, message="the server to listen")
    assert process.poll() is None, (data / "server.log").read_text()[-3000:]
    return Site(data, port, process)


def stop_site(site: Site) -> None:
    site.process.send_signal(signal.SIGTERM)
    try:
        site.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    kill_group(site.process.pid)
    site.process.wait(timeout=10)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    data = tmp_path_factory.mktemp("limits-site")
    site = start_site(data, {
        "OCRSITE_MAX_UPLOAD_MB": "5",
        "OCRSITE_HEADER_TIMEOUT_MS": str(TIMEOUT_MS),
        "OCRSITE_BODY_TIMEOUT_MS": str(TIMEOUT_MS),
    })
    try:
        yield site
    finally:
        stop_site(site)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="module")
def session(site):
    return login(site.port, USERNAME, PASSWORD)


def refused_within_rss_margin(site: Site, send) -> object:
    """Runs `send` and returns its reply, asserting the server's peak RSS stayed within the margin."""
    idle = rss([site.process.pid])
    reset_peak_rss([site.process.pid])
    reply = send()
    peak = peak_rss([site.process.pid])
    assert peak - idle < RSS_MARGIN, f"peak RSS {peak / MB:.0f} MB, idle {idle / MB:.0f} MB"
    assert site.listdir("tmp") == [] and site.listdir("media") == []
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
    assert site.scan_count() == 0


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
    assert site.listdir("tmp") == [] and len(site.listdir("media")) == 1
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
    files = [(f"f{n}.png", [b"x"], 1) for n in range(101)]
    reply = multipart_upload(session, files)
    assert reply.status == 303 and reply.header("location") == "/scans/upload/"
    status, _, page = session.request("GET", "/scans/upload/")
    assert status == 200
    assert page_messages(page) == ["Too many files at once: one upload takes at most 100. Nothing was uploaded; choose fewer files."]
    assert site.listdir("tmp") == [] and site.scan_count() == 0
