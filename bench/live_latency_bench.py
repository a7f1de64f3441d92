"""Live-event latency under load: from a page's commit to a browser's WebSocket receive.

    .venv/bin/python bench/live_latency_bench.py              # this checkout: about a minute per run
    mkdir /tmp/before && git archive <commit> | tar -x -C /tmp/before
    .venv/bin/python bench/live_latency_bench.py --checkout /tmp/before --checkout . --rounds 3   # taking turns

Each run starts the real `manage.py serve` (Local mode, supervising the vLLM test double) on a fresh data
directory, logs in WATCHERS users over HTTP and opens what their browsers open: the scan list, the
header's server indicator and, after each upload, that scan's page (`ws/scans/<id>/`). Then SCANS PDFs are
uploaded at once (each a separate POST, spread over the watchers' accounts) and OCRed while everyone
watches. With `--watch-all` every watcher also watches every scan (as someone allowed to see all scans).
With `--busy N`, N processes spin on the CPU throughout each run (other work on the machine, made
reproducible: this machine is shared, and its load otherwise varies from run to run).

Latency of one delivery = the moment the socket received the page's `page.update` (done or failed) minus
the page's `finished_at`, stamped by the commit just before its transaction begins (so the figure includes
the commit itself). Both are this machine's wall clock, read from the database after the run. Pages that finished before a socket's
snapshot arrived are in that snapshot, not in the events, and are not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
from websockets.asyncio.client import connect

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.fakes.pages import make_pdf  # noqa: E402
from tests.support import free_port, kill_group, port_open, processes_with_marker, project_env, wait_until  # noqa: E402

PASSWORD = "bench-password-1"
FINISHED = {"done", "done_with_errors", "failed", "cancelled"}
CSRF = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')
SETUP = """
from django.contrib.auth.models import Permission, User
from vllm_control.models import VLMSettings
view_all = Permission.objects.filter(codename="view_all_scans").first()
for n in range({watchers}):  # with --watch-all: staff, which is how older checkouts let someone see every scan
    user = User.objects.create_user(f"watcher{{n}}", password="{password}", is_staff={watch_all})
    if {watch_all} and view_all is not None:
        user.user_permissions.add(view_all)
row = VLMSettings.load()
row.mode = "local"
row.autostart = True
row.max_in_flight = {in_flight}
row.page_retries = 1
row.save()
"""


@dataclass
class Socket:
    """One open WebSocket: when its first snapshot arrived, and each page.update it received."""

    path: str
    snapshot_at: float | None = None
    pages: list[tuple[int, int, float]] = field(default_factory=list)  # (scan id, page number, received at)


@dataclass
class RunResult:
    label: str
    latencies_ms: list[float]
    pages: int
    wall_s: float
    sockets: int
    load: float  # the machine's 1-minute load average when the run ended (other processes included)


async def login(base: str, username: str) -> httpx.AsyncClient:
    client = httpx.AsyncClient(base_url=base, timeout=120, follow_redirects=False)
    page = await client.get("/login/")
    token = CSRF.search(page.text)[1]  # type: ignore[index]
    answer = await client.post("/login/", data={"username": username, "password": PASSWORD, "csrfmiddlewaretoken": token})
    assert answer.status_code == 302, f"login failed for {username}: {answer.status_code}"
    return client


async def watch(base: str, client: httpx.AsyncClient, socket: Socket, stop: asyncio.Event, finished: dict[int, str]) -> None:
    cookie = "; ".join(f"{name}={value}" for name, value in client.cookies.items())
    url = base.replace("http://", "ws://") + socket.path
    async with connect(url, additional_headers={"Cookie": cookie}, origin=base, max_size=None) as ws:
        receiving = asyncio.ensure_future(_receive(ws, socket, finished))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({receiving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        receiving.cancel()
        stopping.cancel()


async def _receive(ws, socket: Socket, finished: dict[int, str]) -> None:
    async for raw in ws:
        received = time.time()
        event = json.loads(raw)
        kind = event.get("type")
        if kind in ("scan.snapshot", "scans.snapshot", "server.snapshot") and socket.snapshot_at is None:
            socket.snapshot_at = received
        if kind == "page.update" and event["page"]["status"] in ("done", "failed"):
            socket.pages.append((event["scan_id"], event["page"]["number"], received))
        elif kind == "scans.list_item" and event["scan"]["status"] in FINISHED:
            finished[event["scan"]["id"]] = event["scan"]["status"]
        elif kind == "scans.snapshot":
            finished.update({item["id"]: item["status"] for item in event["scans"] if item["status"] in FINISHED})


async def upload(client: httpx.AsyncClient, pdf: Path) -> int:
    form = await client.get("/scans/upload/")
    token = CSRF.search(form.text)[1]  # type: ignore[index]
    with pdf.open("rb") as handle:
        answer = await client.post(
            "/scans/upload/", data={"csrfmiddlewaretoken": token}, files={"files": (pdf.name, handle, "application/pdf")}
        )
    match = re.fullmatch(r"/scans/(\d+)/", answer.headers.get("location", ""))
    assert answer.status_code == 302 and match, f"upload failed: {answer.status_code} {answer.text[:300]}"
    return int(match[1])


async def drive(base: str, args: argparse.Namespace, pdf: Path) -> tuple[list[Socket], float]:
    clients = [await login(base, f"watcher{n}") for n in range(args.watchers)]
    stop = asyncio.Event()
    finished: dict[int, str] = {}
    sockets: list[Socket] = []
    tasks: list[asyncio.Task] = []

    def open_socket(client: httpx.AsyncClient, path: str) -> None:
        socket = Socket(path)
        sockets.append(socket)
        tasks.append(asyncio.create_task(watch(base, client, socket, stop, finished)))

    for client in clients:  # every page has the server indicator; the list page is where uploads land
        open_socket(client, "/ws/server/")
        open_socket(client, "/ws/scans/")
    await asyncio.sleep(1.0)

    started = time.monotonic()

    async def upload_and_open(index: int) -> int:
        client = clients[index % len(clients)]
        scan_id = await upload(client, pdf)
        for watcher in clients if args.watch_all else [client]:
            open_socket(watcher, f"/ws/scans/{scan_id}/")
        return scan_id

    scan_ids = await asyncio.gather(*(upload_and_open(index) for index in range(args.scans)))
    deadline = time.monotonic() + args.timeout
    while not all(scan_id in finished for scan_id in scan_ids):
        if time.monotonic() > deadline or any(task.done() and task.exception() for task in tasks):
            raise SystemExit(f"not finished after {args.timeout} s: {len(finished)} of {len(scan_ids)} scans")
        await asyncio.sleep(0.2)
    wall = time.monotonic() - started
    await asyncio.sleep(1.0)  # the last page events are sent before the scan's final state
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    for client in clients:
        await client.aclose()
    return sockets, wall


def finished_at(database: Path) -> dict[tuple[int, int], float]:
    with sqlite3.connect(database) as db:
        rows = db.execute("SELECT scan_id, number, finished_at FROM scans_page WHERE finished_at IS NOT NULL").fetchall()
    return {(scan, number): datetime.fromisoformat(stamp).replace(tzinfo=UTC).timestamp() for scan, number, stamp in rows}


def run(checkout: Path, label: str, args: argparse.Namespace, pdf: Path, workdir: Path) -> RunResult:
    data_dir = Path(tempfile.mkdtemp(prefix="data-", dir=workdir))
    env = project_env(
        data_dir,
        {
            "DEBUG": "1",
            "LOG_LEVEL": "WARNING",
            "VLLM_HOST": "127.0.0.1",
            "VLLM_PORT": str(free_port()),
            "FAKE_VLLM_LATENCY": str(args.latency),
            "FAKE_VLLM_STARTUP_DELAY": "0.2",
            "FAKE_VLLM_ACCESS_LOG": "0",
        },
    )
    manage = [sys.executable, str(checkout / "manage.py")]
    subprocess.run([*manage, "migrate", "-v0"], env=env, cwd=checkout, check=True)
    setup = SETUP.format(watchers=args.watchers, watch_all=args.watch_all, password=PASSWORD, in_flight=args.in_flight)
    subprocess.run([*manage, "shell", "-c", setup], env=env, cwd=checkout, check=True)
    port = free_port()
    log = (data_dir / "server.log").open("wb")
    server = subprocess.Popen(
        [*manage, "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env, cwd=checkout, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_until(lambda: port_open(port) or server.poll() is not None, timeout=60, message="the server")
        wait_until(lambda: port_open(int(env["VLLM_PORT"])) or server.poll() is not None, timeout=60, message="the double")
        if server.poll() is not None:
            raise SystemExit((data_dir / "server.log").read_text()[-3000:])
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
        try:
            sockets, wall = asyncio.run(drive(f"http://127.0.0.1:{port}", args, pdf))
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        kill_group(server.pid)
        server.wait()
        for pid in processes_with_marker(env["OCRSITE_TEST_MARKER"]):
            os.kill(pid, signal.SIGKILL)
        log.close()
    commits = finished_at(data_dir / "ocrsite.sqlite3")
    latencies = [
        (received - commits[(scan, number)]) * 1000
        for socket in sockets
        for scan, number, received in socket.pages
        if socket.snapshot_at is not None and commits[(scan, number)] > socket.snapshot_at
    ]
    if not args.keep:
        shutil.rmtree(data_dir, ignore_errors=True)
    return RunResult(label, latencies, len(commits), wall, len(sockets), os.getloadavg()[0])


def percentile(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", action="append", type=Path, help="run against this checkout (repeatable; default: this one)")
    parser.add_argument("--scans", type=int, default=20, help="PDFs uploaded at once (default 20)")
    parser.add_argument("--pages", type=int, default=10, help="pages per PDF (default 10)")
    parser.add_argument("--watchers", type=int, default=4, help="logged-in browsers watching (default 4)")
    parser.add_argument("--watch-all", action="store_true", help="every watcher watches every scan")
    parser.add_argument("--latency", type=float, default=0.5, help="the double's seconds per request (default 0.5)")
    parser.add_argument("--in-flight", type=int, default=16, help="requests in flight (default 16)")
    parser.add_argument("--rounds", type=int, default=1, help="runs per checkout, taking turns (default 1)")
    parser.add_argument("--busy", type=int, default=0, help="processes spinning on the CPU during each run (default 0)")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--keep", action="store_true", help="keep the data directories")
    args = parser.parse_args()
    checkouts = [path.resolve() for path in (args.checkout or [REPO])]

    workdir = Path(tempfile.mkdtemp(prefix="ocrsite-live-bench-"))
    try:
        pdf = make_pdf(workdir / "scan.pdf", args.pages)
        results: dict[str, list[RunResult]] = {}
        for round_number in range(args.rounds):
            for checkout in checkouts:
                label = str(checkout.relative_to(REPO.parent) if checkout.is_relative_to(REPO.parent) else checkout)
                print(f"round {round_number + 1}: {label} ...", flush=True)
                results.setdefault(label, []).append(run(checkout, label, args, pdf, workdir))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    watching = "every scan" if args.watch_all else "their own scans"
    print(
        f"\n{args.scans} uploads x {args.pages} pages at once, {args.watchers} watchers ({watching}), double latency "
        f"{args.latency:g} s, {args.in_flight} in flight, {os.cpu_count()} cores, {args.busy} busy processes; "
        "commit -> WebSocket receive:\n"
    )
    print("| checkout | deliveries | p50 ms | p95 ms | p99 ms | max ms | p95 vs first | target p95 <= 250 ms | wall s | load |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    first_p95 = None
    for label, runs in results.items():
        values = [value for result in runs for value in result.latencies_ms]
        if not values:
            print(f"| {label} | 0 | | | | | | | | |")
            continue
        p50, p95, p99 = (percentile(values, p) for p in (50, 95, 99))
        first_p95 = first_p95 or p95
        wall = statistics.median(result.wall_s for result in runs)
        loads = "–".join(f"{value:.1f}" for value in sorted({min(r.load for r in runs), max(r.load for r in runs)}))
        print(
            f"| {label} | {len(values)} | {p50:.0f} | {p95:.0f} | {p99:.0f} | {max(values):.0f} | "
            f"{p95 / first_p95:.2f}x | {'yes' if p95 <= 250 else '**no**'} | {wall:.1f} | {loads} |"
        )
    print("\nwall: from the first upload to the last scan finished (median of the rounds); load: the machine's")
    print("1-minute load average at the end of the runs (other processes included; 2 means both cores busy).")


if __name__ == "__main__":
    main()
