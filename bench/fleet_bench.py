"""Several model servers: two vLLM test doubles behind the router (issue 14, item 2).

    .venv/bin/python bench/fleet_bench.py            # about 1 minute
    .venv/bin/python bench/fleet_bench.py --pages 320

Each double answers in 1 s and works on 16 requests at once (more wait in its queue, as vLLM's
max_num_seqs): together, ideally 32 pages/s. The settings' server is the first double (capacity: max
requests in flight 16), a ModelServer row the second (capacity 16); one runner with 32 pages in flight,
in this process, on a fresh SQLite data directory. Pages are rendered at 768 px (--side) so that
rendering on a small shared machine (pipeline_bench.py measures it) is not what limits the rate; the
reference row is one double of capacity 32 through the same pipeline, measured in the same run.

(a) both doubles up, 640 pages: pages/s from the start of the run to the last page committed, versus 32.
(b) the same, but the first double is killed (SIGKILL, its process group) at KILL_AT_S with its 16 pages in
    flight, and started again on its port at RETURN_AT_S: pages lost (not done at the end; target 0),
    finished pages sent again (a page answered by two servers, from their request logs; target 0), pages
    with more than one attempt, and the rate before, while one double is down (ideal 16) and after it is back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
WORKDIR = Path(tempfile.mkdtemp(prefix="ocrsite-fleet-bench-"))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ocrsite.settings")
os.environ["OCRSITE_DATA_DIR"] = str(WORKDIR / "data")
os.environ.pop("DATABASE_URL", None)
os.environ.pop("REDIS_URL", None)

from markdown_table import print_table  # noqa: E402
from tests.fakes.pages import make_pdf  # noqa: E402
from tests.support import FAKE_VLLM, free_port, kill_group, port_open, wait_until  # noqa: E402

MODEL = "bench/model"
LATENCY_S = 1.0
CAPACITY = 16
IDEAL = 2 * CAPACITY / LATENCY_S
KILL_AT_S = 6.0
RETURN_AT_S = 12.0


class Double:
    """The vLLM test double as a process; its answered requests are logged in its own state directory."""

    def __init__(self, name: str, port: int | None = None, capacity: int = CAPACITY) -> None:
        self.port = port or free_port()
        self.state_dir = WORKDIR / f"{name}-{self.port}-{time.monotonic_ns()}"
        self.state_dir.mkdir()
        env = {
            **os.environ, "FAKE_VLLM_STARTUP_DELAY": "0.2", "FAKE_VLLM_ACCESS_LOG": "0", "FAKE_VLLM_LATENCY": str(LATENCY_S),
            "FAKE_VLLM_CAPACITY": str(capacity), "FAKE_VLLM_STATE_DIR": str(self.state_dir), "FAKE_VLLM_MAX_LIFETIME": "900",
        }
        self.log = open(self.state_dir / "double.log", "w")
        self.process = subprocess.Popen(
            [str(FAKE_VLLM), "serve", MODEL, "--host", "127.0.0.1", "--port", str(self.port)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def wait(self) -> Double:
        wait_until(lambda: port_open(self.port), timeout=30, message="the vLLM test double")
        return self

    def kill(self) -> None:
        kill_group(self.process.pid)
        self.process.wait(timeout=10)
        self.log.close()

    def answered(self) -> list[int]:
        path = self.state_dir / "requests.jsonl"
        if not path.exists():
            return []
        entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [entry["page_marker"] for entry in entries if entry.get("outcome") == "ok"]


def setup_django() -> None:
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def configure(first: Double, second: Double | None, side: int) -> None:
    from vllm_control.models import ModelServer, VLMSettings

    row = VLMSettings.load()
    row.mode, row.external_base_url, row.served_model_name = "external", first.base_url, MODEL
    row.max_in_flight = CAPACITY if second is not None else 2 * CAPACITY
    row.request_timeout_s, row.page_retries, row.target_longest_side = 60, 3, side
    row.save()
    ModelServer.objects.all().delete()
    if second is not None:
        ModelServer.objects.create(kind="external", base_url=second.base_url, capacity=CAPACITY, name="second")


def new_scan(pdf: Path):
    from django.contrib.auth import get_user_model

    from scans.uploads import create_scan_from_path

    owner, _ = get_user_model().objects.get_or_create(username="bench")
    return create_scan_from_path(owner=owner, path=pdf)


async def run(scan_id: int, events: list[tuple[float, str]] | None = None, actions=None) -> tuple[float, list[float]]:
    """Run the scan with one runner (32 in flight); returns (wall seconds, each page's commit time)."""
    from scans.pipeline.runner import Runner

    done: list[float] = []
    started = time.perf_counter()

    async def on_page(page) -> None:
        done.append(time.perf_counter() - started)

    task = asyncio.create_task(Runner(max_in_flight=int(IDEAL), on_page=on_page).run_scan(scan_id))
    if actions is not None:
        await actions(started)
    await task
    return time.perf_counter() - started, done


def rate(times: list[float], start: float, end: float) -> float:
    return sum(start <= t < end for t in times) / (end - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=640)
    parser.add_argument("--side", type=int, default=768, help="longest side of the rendered pages (default 768)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    pages = args.pages
    rows: list[tuple[str, str, str, str, str, bool | None]] = []
    doubles: list[Double] = []
    try:
        setup_django()
        from asgiref.sync import async_to_sync, sync_to_async  # noqa: F401

        from scans.models import Page

        print(f"Building a {pages}-page PDF in {WORKDIR} ...", flush=True)
        pdf = make_pdf(WORKDIR / "doc.pdf", pages)

        print("(ref) one double of capacity 32 (the same pipeline without the router) ...", flush=True)
        single = Double("single", capacity=2 * CAPACITY).wait()
        doubles.append(single)
        configure(single, None, args.side)
        wall, _ = asyncio.run(run(new_scan(pdf).pk))
        reference = pages / wall
        rows.append((f"(ref) {pages} pages, one double of capacity 32", f"{reference:.1f} pages/s", f"{IDEAL:.0f} (ideal)",
                     f"{reference / IDEAL:.0%}", "", None))
        single.kill()
        doubles.clear()

        print("(a) two doubles, both up ...", flush=True)
        first, second = Double("first").wait(), Double("second").wait()
        doubles += [first, second]
        configure(first, second, args.side)
        scan = new_scan(pdf)
        wall, times = asyncio.run(run(scan.pk))
        ok = Page.objects.filter(scan=scan, status="done").count()
        measured = pages / wall
        rows.append((f"(a) {pages} pages, two doubles", f"{measured:.1f} pages/s", f"{IDEAL:.0f} (ideal)",
                     f"{measured / IDEAL:.0%}", ">= 90 %", measured / IDEAL >= 0.9 and ok == pages))
        rows.append(("(a) two doubles / one of capacity 32", f"{measured:.1f} pages/s", f"{reference:.1f} (ref)",
                     f"{measured / reference:.0%}", "", None))
        split = Counter({"first": len(first.answered()), "second": len(second.answered())})
        rows.append(("(a) pages per double", f"{split['first']} / {split['second']}", "", "", "", None))
        first.kill()
        second.kill()
        doubles.clear()

        print(f"(b) the first double killed at {KILL_AT_S:g} s, back at {RETURN_AT_S:g} s ...", flush=True)
        first, second = Double("first").wait(), Double("second").wait()
        doubles += [first, second]
        configure(first, second, args.side)
        scan = new_scan(pdf)
        revived: list[Double] = []

        async def actions(started: float) -> None:
            await asyncio.sleep(max(0.0, KILL_AT_S - (time.perf_counter() - started)))
            await asyncio.to_thread(first.kill)
            await asyncio.sleep(max(0.0, RETURN_AT_S - (time.perf_counter() - started)))
            back = await asyncio.to_thread(lambda: Double("first-again", port=first.port).wait())
            revived.append(back)
            doubles.append(back)

        wall, times = asyncio.run(run(scan.pk, actions=actions))
        counts = Counter(Page.objects.filter(scan=scan).values_list("status", flat=True))
        lost = pages - counts.get("done", 0)
        answered = Counter(first.answered() + second.answered() + [p for d in revived for p in d.answered()])
        redone = sum(1 for n in answered.values() if n > 1)
        retried = Page.objects.filter(scan=scan, attempts__gt=1).count()
        before = rate(times, 1.0, KILL_AT_S)
        down = rate(times, KILL_AT_S + 1.0, RETURN_AT_S)
        after_start = RETURN_AT_S + 2.0
        last = max(times) if times else after_start
        after = rate(times, after_start, max(last, after_start + 1.0) - 1.0) if last > after_start + 2 else float("nan")
        rows.append((f"(b) {pages} pages, one double killed", f"{pages / wall:.1f} pages/s", "", "", "", None))
        rows.append(("(b) pages lost", str(lost), "", "", "0", lost == 0))
        rows.append(("(b) finished pages sent again", str(redone), "", "", "0", redone == 0))
        rows.append(("(b) pages with more than one attempt", str(retried), "", "", "0", retried == 0))
        rows.append((f"(b) rate before the kill (1-{KILL_AT_S:g} s)", f"{before:.1f} pages/s", f"{IDEAL:.0f} (ideal)",
                     f"{before / IDEAL:.0%}", "", None))
        rows.append((f"(b) rate while down ({KILL_AT_S + 1:g}-{RETURN_AT_S:g} s)", f"{down:.1f} pages/s",
                     f"{IDEAL / 2:.0f} (survivor)", f"{down / (IDEAL / 2):.0%}", "~ survivor's", 0.8 <= down / (IDEAL / 2) <= 1.1))
        rows.append((f"(b) rate after it is back ({after_start:g} s-end)", f"{after:.1f} pages/s", f"{IDEAL:.0f} (ideal)",
                     f"{after / IDEAL:.0%}", "comes back", after / IDEAL >= 0.8))
        rows.append(("(b) pages answered by the revived double", str(sum(len(d.answered()) for d in revived)), "", "", "> 0",
                     sum(len(d.answered()) for d in revived) > 0))
    finally:
        for double in doubles:
            if double.process.poll() is None:
                double.kill()
        if not args.keep:
            shutil.rmtree(WORKDIR, ignore_errors=True)

    print_table(("benchmark", "measured", "reference", "ratio", "target", "met"), rows)


if __name__ == "__main__":
    main()
