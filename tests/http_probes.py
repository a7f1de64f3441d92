"""Raw HTTP/1.1 probes against a real server process on 127.0.0.1, for tests and bench/server_bench.py.

Oversize and trickling bodies, slow request heads, a multipart upload streamed from disk, the
server's memory and temporary files read from /proc, and a `manage.py serve` process to probe.
"""

from __future__ import annotations

import asyncio
import atexit
import html
import http.client
import os
import re
import resource
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path

from tests.support import REPO, free_port, kill_group, manage, port_open, project_env, wait_until

MB = 1024 * 1024


# --- the server's memory and temporary files ------------------------------------------------------

def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    pids, index = [pid], 0
    while index < len(pids):
        current = pids[index]
        index += 1
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    pids.extend(int(child) for child in handle.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return pids


def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def rss(pids: Iterable[int]) -> int:
    """Resident memory of these processes, in bytes."""
    return sum(_status_kb(p, "VmRSS") for p in pids) * 1024


def reset_peak_rss(pids: Iterable[int]) -> None:
    """Starts a new high-water mark (VmHWM) at the current RSS of each process (proc(5), clear_refs
    value 5): `peak_rss` then reports the peak since this call, without sampling."""
    for p in pids:
        try:
            with open(f"/proc/{p}/clear_refs", "w") as handle:
                handle.write("5")
        except (FileNotFoundError, ProcessLookupError):
            pass


def peak_rss(pids: Iterable[int]) -> int:
    """The sum of these processes' peak RSS since `reset_peak_rss`, in bytes."""
    return sum(_status_kb(p, "VmHWM") for p in pids) * 1024


def temp_bytes(pid: int, directories: Iterable[Path]) -> int:
    """Bytes in temporary files: files under `directories` plus files the server holds open that are
    deleted (anonymous spools) or inside those directories or /tmp."""
    seen: dict[tuple[int, int], int] = {}
    roots = [str(d) for d in directories] + [os.path.realpath("/tmp")]
    for directory in directories:
        for path in Path(directory).rglob("*"):
            try:
                info = path.stat()
            except FileNotFoundError:
                continue
            if path.is_file():
                seen[(info.st_dev, info.st_ino)] = info.st_size
    for p in process_tree(pid):
        try:
            fds = os.listdir(f"/proc/{p}/fd")
        except (FileNotFoundError, ProcessLookupError):
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{p}/fd/{fd}")
                if not target.startswith("/") or not (
                    target.endswith("(deleted)") or any(target.startswith(root) for root in roots)
                ):
                    continue
                info = os.stat(f"/proc/{p}/fd/{fd}")
            except (FileNotFoundError, ProcessLookupError):
                continue
            seen[(info.st_dev, info.st_ino)] = info.st_size
    return sum(seen.values())


class TempSampler:
    """Samples `temp_bytes` every 50 ms in a thread; `peak` is the largest value seen."""

    def __init__(self, pid: int, directories: Iterable[Path]) -> None:
        self.pid, self.directories, self.peak = pid, list(directories), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, temp_bytes(self.pid, self.directories))
            self._stop.wait(0.05)

    def __enter__(self) -> TempSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, temp_bytes(self.pid, self.directories))


# --- a logged-in browser-like session -------------------------------------------------------------

@dataclass
class Session:
    port: int
    host: str = "127.0.0.1"
    ssl_context: ssl.SSLContext | None = None  # HTTPS when given
    cookies: dict[str, str] = field(default_factory=dict)

    @property
    def origin(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://{self.host}:{self.port}"

    @property
    def cookie_header(self) -> str:
        return "; ".join(f"{name}={value}" for name, value in self.cookies.items())

    @property
    def csrf_token(self) -> str:
        return self.cookies["csrftoken"]

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
        if self.ssl_context:
            connection = http.client.HTTPSConnection(self.host, self.port, timeout=60, context=self.ssl_context)
        else:
            connection = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            all_headers = {"Cookie": self.cookie_header, **(headers or {})}
            connection.request(method, path, body=body, headers=all_headers)
            response = connection.getresponse()
            data = response.read()
            self.take_cookies(response.headers.get_all("Set-Cookie") or [])
            return response.status, response.headers, data
        finally:
            connection.close()

    def take_cookies(self, set_cookie_values: Iterable[str]) -> None:
        for value in set_cookie_values:
            for name, morsel in SimpleCookie(value).items():
                self.cookies[name] = morsel.value


def login(port: int, username: str, password: str, **session_options) -> Session:
    session = Session(port, **session_options)
    status, _, page = session.request("GET", "/login/")
    assert status == 200, status
    token = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1).decode()
    form = f"username={username}&password={password}&csrfmiddlewaretoken={token}".encode()
    status, headers, _ = session.request(
        "POST", "/login/", form,
        {"Content-Type": "application/x-www-form-urlencoded", "Referer": f"{session.origin}/login/"},
    )
    assert status == 302 and "sessionid" in session.cookies, (status, headers)
    return session


def page_messages(page: bytes) -> list[str]:
    """The texts of the Django messages shown on an HTML page."""
    found = re.findall(rb'<li class="message[^"]*">(.*?)</li>', page, re.S)
    return [html.unescape(text.decode()).strip() for text in found]


# --- raw requests ---------------------------------------------------------------------------------

@dataclass
class Reply:
    status: int | None  # None: closed or reset before an answer arrived
    head: str  # the status line and headers
    body: bytes
    sent: int  # body bytes written before the answer, the close or the end
    seconds: float

    def header(self, name: str) -> str | None:
        found = re.search(rf"(?im)^{re.escape(name)}:\s*(.*?)\s*$", self.head)
        return found.group(1) if found else None


def _read_reply(sock: socket.socket, timeout: float) -> tuple[int | None, bytes, bytes]:
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None, b"", data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        while length and len(body) < int(length.group(1)):
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return status, head, body
    except (ConnectionResetError, BrokenPipeError, socket.timeout):
        return None, b"", data


def send_request(
    port: int,
    head: str,
    body: Iterable[bytes] = (),
    *,
    chunked: bool = False,
    timeout: float = 120,
) -> Reply:
    """Sends `head` (request line and headers, without the blank line) and then `body` from a thread,
    while this thread waits for the answer; sending stops once the answer arrives or the server
    closes the connection."""
    sock = socket.create_connection(("127.0.0.1", port))
    answered = threading.Event()
    sent = 0

    def write() -> None:
        nonlocal sent
        try:
            sock.sendall(head.encode() + b"\r\n\r\n")
            for chunk in body:
                if answered.is_set():
                    return
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" if chunked else chunk)
                sent += len(chunk)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass

    started = time.monotonic()
    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    status, head_bytes, data = _read_reply(sock, timeout)
    seconds = time.monotonic() - started
    answered.set()
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    writer.join(timeout=30)
    sock.close()
    return Reply(status, head_bytes.decode("latin-1"), data, sent, seconds)


def zeros(total: int, chunk: int = MB) -> Iterator[bytes]:
    block = bytes(chunk)
    for offset in range(0, total, chunk):
        yield block[: min(chunk, total - offset)]


def file_chunks(path: Path, chunk: int = MB) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while data := handle.read(chunk):
            yield data


def multipart_form(csrf_token: str, files: list[tuple[str, Iterable[bytes], int]]) -> tuple[str, int, Iterator[bytes]]:
    """The upload form with `files` as (name, chunks, size): its content type, length and body."""
    boundary = uuid.uuid4().hex
    preamble = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="csrfmiddlewaretoken"\r\n\r\n{csrf_token}\r\n'
    ).encode()
    parts = [
        (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
         "Content-Type: application/octet-stream\r\n\r\n").encode()
        for name, _, _ in files
    ]
    closing = f"\r\n--{boundary}--\r\n".encode()
    total = len(preamble) + sum(len(p) for p in parts) + sum(size for _, _, size in files) + 2 * (len(files) - 1) + len(closing)

    def body() -> Iterator[bytes]:
        yield preamble
        for index, (part, (_, chunks, _)) in enumerate(zip(parts, files)):
            yield (b"\r\n" if index else b"") + part
            yield from chunks
        yield closing

    return f"multipart/form-data; boundary={boundary}", total, body()


def multipart_upload(
    session: Session, files: list[tuple[str, Iterable[bytes], int]], *, path: str = "/scans/upload/", chunked: bool = False
) -> Reply:
    """POSTs the upload form with `files` as (name, chunks, size), streamed, as a browser would."""
    content_type, length, body = multipart_form(session.csrf_token, files)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{session.port}\r\nCookie: {session.cookie_header}\r\n"
        f"Referer: {session.origin}{path}\r\nAccept: text/html\r\nContent-Type: {content_type}\r\n{framing}"
    )
    reply = send_request(session.port, head, body, chunked=chunked)
    session.take_cookies(re.findall(r"(?im)^set-cookie:\s*(.*?)\s*$", reply.head))
    return reply


def write_padded_pdf(path: Path, size: int) -> Path:
    """A valid one-page PDF of about `size` bytes: the page's resources hold an unused image stream
    of random (incompressible) bytes."""
    payload = max(0, size - 1024)
    with path.open("wb") as handle:
        offsets = []

        def obj(text: bytes) -> None:
            offsets.append(handle.tell())
            handle.write(text)

        handle.write(b"%PDF-1.7\n")
        obj(b"1 0 obj <</Type/Catalog/Pages 2 0 R>> endobj\n")
        obj(b"2 0 obj <</Type/Pages/Kids[3 0 R]/Count 1>> endobj\n")
        obj(b"3 0 obj <</Type/Page/Parent 2 0 R/MediaBox[0 0 612 792]/Resources<</XObject<</Pad 4 0 R>>>>>> endobj\n")
        obj(b"4 0 obj <</Type/XObject/Subtype/Image/Width 1/Height 1/ColorSpace/DeviceGray/BitsPerComponent 8"
            + f"/Length {payload}>>\nstream\n".encode())
        for chunk in zeros(payload, 4 * MB):
            handle.write(os.urandom(len(chunk)))
        handle.write(b"\nendstream endobj\n")
        xref = handle.tell()
        handle.write(f"xref\n0 {len(offsets) + 1}\n0000000000 65535 f \n".encode())
        for offset in offsets:
            handle.write(f"{offset:010d} 00000 n \n".encode())
        handle.write(f"trailer <</Size {len(offsets) + 1}/Root 1 0 R>>\nstartxref\n{xref}\n%%EOF\n".encode())
    return path


# --- slow clients ---------------------------------------------------------------------------------

@dataclass
class SlowResult:
    clients: int
    connected: int
    closed: int  # closed by the server within the observation window
    close_seconds: list[float]  # when each was closed, from its connection
    normal_ok: bool  # a normal request, made while all of them were connected, was answered
    normal_seconds: float


async def _slow_client(port: int, head: bytes, trickle: bytes, interval: float, until: float, opened: list, closed: list) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return
    start = time.monotonic()
    opened.append(start)
    try:
        writer.write(head)
        while time.monotonic() < until:
            writer.write(trickle)
            await writer.drain()
            try:
                data = await asyncio.wait_for(reader.read(65536), interval)
            except TimeoutError:
                continue
            if not data or data.startswith(b"HTTP/"):
                closed.append(time.monotonic() - start)
                return
    except OSError:
        closed.append(time.monotonic() - start)
    finally:
        writer.close()


async def _normal_request(port: int) -> tuple[bool, float]:
    start = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        writer.write(f"GET /login/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), 10)
        writer.close()
        return line.startswith(b"HTTP/1.1 200"), time.monotonic() - start
    except (OSError, TimeoutError):
        return False, time.monotonic() - start


async def _slow_clients(port: int, clients: int, head: bytes, trickle: bytes, interval: float, observe: float) -> SlowResult:
    until = time.monotonic() + observe
    opened: list[float] = []
    closed: list[float] = []
    tasks = [
        asyncio.ensure_future(_slow_client(port, head, trickle, interval, until, opened, closed))
        for _ in range(clients)
    ]
    deadline = time.monotonic() + 20
    while len(opened) < clients and time.monotonic() < deadline and not all(t.done() for t in tasks):
        await asyncio.sleep(0.05)
    await asyncio.sleep(interval)  # every client has sent its head and trickled once
    normal_ok, normal_seconds = await _normal_request(port)
    await asyncio.gather(*tasks)
    return SlowResult(clients, len(opened), len(closed), sorted(closed), normal_ok, normal_seconds)


def slow_clients(
    port: int, *, clients: int, body: bool, trickle: int = 20, interval: float = 2.0, observe: float = 20.0
) -> SlowResult:
    """`clients` connections that each send `trickle` bytes every `interval` seconds, of the request
    head (`body=False`) or, after a complete head, of a declared 1 MB form body (`body=True`)."""
    host = f"Host: 127.0.0.1:{port}\r\n".encode()
    if body:
        head = b"POST /login/ HTTP/1.1\r\n" + host + b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000000\r\n\r\n"
    else:
        head = b"GET /login/ HTTP/1.1\r\n" + host + b"X-Padding: "
    return asyncio.run(_slow_clients(port, clients, head, b"a" * trickle, interval, observe))


# --- a real `manage.py serve` process -------------------------------------------------------------

USERNAME, PASSWORD = "prober", "prober-password-1"


@dataclass
class Site:
    data: Path
    port: int
    env: dict[str, str]
    process: subprocess.Popen

    def files(self, folder: str) -> list[str]:
        """Names of the files under the data directory's `folder` (e.g. tmp, media)."""
        root = self.data / folder
        return sorted(p.name for p in root.rglob("*") if p.is_file()) if root.exists() else []

    def scan_count(self) -> int:
        """Scan rows in the site's SQLite database (read directly: a `manage.py` process takes 1-2 s)."""
        with closing(sqlite3.connect(self.data / "ocrsite.sqlite3")) as db:
            return db.execute("SELECT COUNT(*) FROM scans_scan").fetchone()[0]

    def login(self) -> Session:
        return login(self.port, USERNAME, PASSWORD)


_template: Path | None = None


def _migrated_template() -> Path:
    """A data directory with a migrated database, the superuser and Built-in mode, made once per
    test process."""
    global _template
    if _template is None:
        folder = Path(tempfile.mkdtemp(prefix="ocrsite-site-template-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        env = project_env(folder, {"DJANGO_SUPERUSER_PASSWORD": PASSWORD})
        builtin = "from vllm_control.models import VLMSettings as V; r = V.load(); r.mode = 'builtin'; r.save()"
        for args in (
            ["migrate", "-v0"],
            ["createsuperuser", "--noinput", "--username", USERNAME, "--email", "p@example.com"],
            ["shell", "-c", builtin],  # no model server to start with the site (VLLM_BIN is the double)
        ):
            done = manage(args, env)
            assert done.returncode == 0, done.stderr
        _template = folder
    return _template


@contextmanager
def running_site(data: Path, extra_env: dict[str, str], *, before_start: Callable[[Path], None] | None = None) -> Iterator[Site]:
    """`manage.py serve` on a free port with a migrated database, a superuser (USERNAME) and no
    embedded runner, with 1024 file descriptors; SIGTERM, then SIGKILL to its group, at the end."""
    env = project_env(data, {"DEBUG": "1", "OCRSITE_EMBEDDED_RUNNER": "false", **extra_env})
    shutil.copytree(_migrated_template(), data, dirs_exist_ok=True)
    if before_start:
        before_start(data)
    port = free_port()
    with (data / "server.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(REPO / "manage.py"), "serve", "--port", str(port)],
            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024)),
        )
    try:
        wait_until(lambda: port_open(port) or process.poll() is not None, 60, message="the server to listen")
        assert process.poll() is None, (data / "server.log").read_text()[-3000:]
        yield Site(data, port, env, process)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        kill_group(process.pid)
        process.wait(timeout=10)
