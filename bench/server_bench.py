"""Which ASGI server can hold ocrsite's request limits? Daphne, Uvicorn, Hypercorn and Granian
(as `manage.py serve` runs it) against the probes of issue 11, each a real server process with
the same application (`ocrsite.asgi.application`, with `ocrsite.limits` in front) and 1024 file
descriptors.

Run A (OCRSITE_MAX_UPLOAD_MB=5, header/body timeouts 5 s where the server allows):
  - a 300 MB upload with Content-Length, the same chunked, and an anonymous 300 MB POST to /login/:
    the answer, its time, the server's peak RSS above idle and its peak temporary-file bytes;
  - 520 clients sending 20 bytes every 2 s of the request head, then of a body: how many the
    server closed within 20 s, and whether a normal request made meanwhile was answered;
  - a WebSocket (the scan list's snapshot), the lifespan (the Local vLLM test double started with
    the server and gone after SIGTERM).
Run B (the default 200 MB limit): a valid 200 MB PDF uploaded: answer, time, peak RSS, temp bytes.

    .venv/bin/python bench/server_bench.py [--only granian,uvicorn]

Takes about 4 minutes on 2 cores; prints one table. RSS is exact (VmHWM, reset before each probe).
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.http_probes import (  # noqa: E402
    MB,
    TempSampler,
    file_chunks,
    login,
    multipart_upload,
    peak_rss,
    process_tree,
    reset_peak_rss,
    rss,
    send_request,
    slow_clients,
    write_padded_pdf,
    zeros,
)
from tests.support import (  # noqa: E402
    free_port,
    kill_group,
    manage,
    port_open,
    processes_with_marker,
    project_env,
    vllm_pids,
    wait_until,
    watchdogs_of,
)

USERNAME, PASSWORD = "bench", "bench-password-1"
TIMEOUT_S = 5
SETUP = (
    "from vllm_control.models import VLMSettings as V; r = V.load(); r.mode = 'local'; r.autostart = True; r.save()"
)

Launcher = Callable[[int], list[str]]
PY = sys.executable
SERVERS: dict[str, Launcher] = {
    "daphne": lambda port: [PY, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "ocrsite.asgi:application"],
    "uvicorn": lambda port: [
        PY, "-m", "uvicorn", "ocrsite.asgi:application", "--host", "127.0.0.1", "--port", str(port),
        "--lifespan", "on", "--ws", "websockets", "--timeout-keep-alive", str(TIMEOUT_S), "--log-level", "warning",
    ],
    "hypercorn": lambda port: [
        PY, "-m", "hypercorn", "ocrsite.asgi:application", "-b", f"127.0.0.1:{port}",
        "--keep-alive", str(TIMEOUT_S), "--read-timeout", str(TIMEOUT_S), "--log-level", "warning",
    ],
    "granian (manage.py serve)": lambda port: [PY, str(REPO / "manage.py"), "serve", "--port", str(port)],
}


@dataclass
class Row:
    server: str
    cells: dict[str, str] = field(default_factory=dict)
    rate: float = 0.0
    cpu_ms: float = 0.0


class Running:
    """One server process on a copy of the template data directory."""

    def __init__(self, name: str, template: Path, extra_env: dict[str, str]) -> None:
        self.data = Path(tempfile.mkdtemp(prefix="server-bench-"))
        shutil.copytree(template, self.data, dirs_exist_ok=True)
        self.port = free_port()
        self.env = project_env(self.data, {
            "DEBUG": "1", "VLLM_PORT": str(free_port()), "VLLM_HOST": "127.0.0.1", "VLLM_STOP_GRACE_MS": "1000",
            "FAKE_VLLM_STARTUP_DELAY": "0.3", "OCRSITE_EMBEDDED_RUNNER": "false",
            "OCRSITE_HEADER_TIMEOUT_MS": str(TIMEOUT_S * 1000), "OCRSITE_BODY_TIMEOUT_MS": str(TIMEOUT_S * 1000),
            **extra_env,
        })
        self.log = (self.data / "server.log").open("wb")
        self.process = subprocess.Popen(
            SERVERS[name](self.port), env=self.env, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024)),
        )
        wait_until(lambda: port_open(self.port) or self.process.poll() is not None, 60, message="the server")
        if self.process.poll() is not None:
            raise RuntimeError((self.data / "server.log").read_text()[-3000:])
        time.sleep(1)  # settle: the first requests import lazily

    def pids(self) -> list[int]:
        """The server's own processes: not the watchdogs it started, nor the vLLM groups under them."""
        others = {w.pid for w in watchdogs_of(self.process.pid)} | set(self.vllm_pids())
        return [p for p in process_tree(self.process.pid) if p not in others]

    def vllm_pids(self) -> list[int]:
        return vllm_pids(self.env)

    def measure(self, probe: Callable[[], str]) -> str:
        """`probe`'s result with the peak RSS above idle and the peak temporary bytes during it."""
        pids = self.pids()
        idle = rss(pids)
        reset_peak_rss(pids)
        with TempSampler(self.process.pid, [self.data / "tmp"]) as temp:
            result = probe()
        peak = peak_rss(self.pids())
        return f"{result}, +{max(0, peak - idle) / MB:.0f} MB RSS, {temp.peak / MB:.0f} MB tmp"

    def stop(self) -> tuple[int | None, bool]:
        """SIGTERM; returns the exit code and whether the model server's processes are gone."""
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            code = None
        vllm_gone = not self.vllm_pids()
        kill_group(self.process.pid)
        self.process.wait(timeout=10)
        for pid in processes_with_marker(self.env["OCRSITE_TEST_MARKER"]):
            os.kill(pid, signal.SIGKILL)
        self.log.close()
        shutil.rmtree(self.data, ignore_errors=True)
        return code, vllm_gone


def answer(reply) -> str:
    status = reply.status or "closed"
    if reply.status in (302, 303) and re.search(r"/scans/\d+/$", reply.header("location") or ""):
        status = f"{reply.status} to the scan"
    return f"{status} in {reply.seconds:.1f} s"


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (all their threads, Rust ones included)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (proc(5) fields 14, 15)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def request_rate(running: Running, requests: int = 400) -> tuple[float, float]:
    """Requests per second for GET /login/ (a rendered template) over one keep-alive connection,
    and the server's CPU milliseconds per request."""
    connection = http.client.HTTPConnection("127.0.0.1", running.port, timeout=30)
    try:
        for _ in range(20):  # warm-up
            connection.request("GET", "/login/")
            connection.getresponse().read()
        cpu = cpu_seconds(running.pids())
        started = time.perf_counter()
        for _ in range(requests):
            connection.request("GET", "/login/")
            response = connection.getresponse()
            response.read()
            assert response.status == 200
        elapsed = time.perf_counter() - started
        return requests / elapsed, (cpu_seconds(running.pids()) - cpu) * 1000 / requests
    finally:
        connection.close()


def websocket_ok(port: int, session) -> str:
    from websockets.sync.client import connect

    try:
        with connect(
            f"ws://127.0.0.1:{port}/ws/scans/", open_timeout=10,
            additional_headers={"Cookie": session.cookie_header, "Origin": f"http://127.0.0.1:{port}"},
        ) as socket:
            message = json.loads(socket.recv(timeout=10))
            return "yes" if "type" in message else "no"
    except Exception as exc:  # any failure is the answer
        return f"no ({type(exc).__name__})"


def slow(running: Running, body: bool) -> str:
    result = slow_clients(running.port, clients=520, body=body)
    normal = f"normal request {'answered' if result.normal_ok else 'FAILED'} ({result.normal_seconds:.1f} s)"
    if result.closed:
        return f"{result.closed}/{result.connected} closed by {result.close_seconds[-1]:.0f} s; {normal}"
    return f"none of {result.connected} closed in 20 s; {normal}"


def run_a(name: str, template: Path, row: Row) -> None:
    running = Running(name, template, {"OCRSITE_MAX_UPLOAD_MB": "5"})
    try:
        lifespan_started = bool(running.vllm_pids())
        session = login(running.port, USERNAME, PASSWORD)
        upload = lambda chunked: multipart_upload(session, [("big.pdf", zeros(300 * MB), 300 * MB)], chunked=chunked)  # noqa: E731
        row.cells["300 MB upload, Content-Length"] = running.measure(lambda: answer(upload(False)))
        row.cells["300 MB upload, chunked"] = running.measure(lambda: answer(upload(True)))
        anonymous = (
            f"POST /login/ HTTP/1.1\r\nHost: 127.0.0.1:{running.port}\r\n"
            f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {300 * MB}"
        )
        row.cells["anonymous 300 MB POST /login/"] = running.measure(
            lambda: answer(send_request(running.port, anonymous, zeros(300 * MB)))
        )
        row.rate, row.cpu_ms = request_rate(running)
        row.cells["520 slow heads"] = slow(running, body=False)
        row.cells["520 slow bodies"] = slow(running, body=True)
        row.cells["WebSocket"] = websocket_ok(running.port, session)
    finally:
        code, vllm_gone = running.stop()
    row.cells["lifespan"] = (
        f"vLLM started: {'yes' if lifespan_started else 'no'}; SIGTERM: exit {code}, "
        f"vLLM {'gone' if vllm_gone else 'LEFT RUNNING'}"
    )


def run_b(name: str, template: Path, pdf: Path, row: Row) -> None:
    running = Running(name, template, {})
    try:
        session = login(running.port, USERNAME, PASSWORD)
        size = pdf.stat().st_size
        row.cells["valid 200 MB upload"] = running.measure(
            lambda: answer(multipart_upload(session, [("big.pdf", file_chunks(pdf), size)]))
        )
    finally:
        running.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated server names (prefixes)")
    only = [name for name in parser.parse_args().only.split(",") if name]
    names = [name for name in SERVERS if not only or any(name.startswith(o) for o in only)]
    for name in list(names):
        if importlib.util.find_spec(name.split()[0]) is None:
            print(f"-- {name}: not installed (pip install '.[bench]'), left out", file=sys.stderr)
            names.remove(name)
    work = Path(tempfile.mkdtemp(prefix="server-bench-"))
    try:
        template = work / "template"
        env = project_env(template, {"DJANGO_SUPERUSER_PASSWORD": PASSWORD})
        for args in (["migrate", "-v0"], ["createsuperuser", "--noinput", "--username", USERNAME, "--email", "b@example.com"], ["shell", "-c", SETUP]):
            done = manage(args, env)
            assert done.returncode == 0, done.stderr
        pdf = write_padded_pdf(work / "valid-200mb.pdf", 200 * MB - 64 * 1024)
        rows = []
        for name in names:
            row = Row(name)
            print(f"-- {name}", file=sys.stderr, flush=True)
            run_a(name, template, row)
            run_b(name, template, pdf, row)
            rows.append(row)
        print_table(rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def print_table(rows: list[Row]) -> None:
    reference = rows[0]
    for row in rows:
        row.cells["GET /login/, keep-alive"] = (
            f"{row.rate:.0f} req/s ({row.rate / reference.rate:.2f}× {reference.server}), "
            f"{row.cpu_ms:.1f} ms server CPU per request ({row.cpu_ms / reference.cpu_ms:.2f}×)"
        )
    probes = list(rows[0].cells)
    print("| probe | " + " | ".join(row.server for row in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for probe in probes:
        print(f"| {probe} | " + " | ".join(row.cells.get(probe, "") for row in rows) + " |")


if __name__ == "__main__":
    main()
