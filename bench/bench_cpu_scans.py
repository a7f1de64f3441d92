"""Long CPU scans: memory stays flat, Cancel and SIGTERM stop the work (issue 12's targets).

    .venv/bin/python bench/bench_cpu_scans.py            # about 10 minutes on 2 cores
    .venv/bin/python bench/bench_cpu_scans.py --quick    # smaller scans, Tesseract only: a smoke run

(a) `manage.py ocr --engine tesseract` on a 50-page and a 300-page image-only scan (RapidOCR: 10 and 50
    pages), each in a fresh process and data directory: the process's peak RSS (target: flat, the longer
    scan within 10 % of the shorter one), and the most pages the runner held at once (pages `running` in the database, sampled
    every 20 ms) against `cpu.claim_limit()` (the cores plus the look-ahead) and the settings' 16 in flight.
(b) a real `manage.py serve` (Built-in mode, its embedded runner) reading a 40-page scan, once per CPU
    engine. Cancel (POST /scans/N/cancel/ from a logged-in session) once a page is done: seconds until
    the server's CPU time stops growing (less than 5 % of a core over the next second; target 5 s) and
    until no page is running; the server's peak RSS. Then, in a fresh server, SIGTERM once a page is
    done: seconds until the process has exited (target 10 s).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ocrsite.settings")

from markdown_table import print_table  # noqa: E402
from tests.http_probes import file_chunks, multipart_upload, peak_rss, process_tree, running_site  # noqa: E402
from tests.scans.ocr_corpus import PARAGRAPHS, image_only_pdf, make_born_digital_pdf, render_pdf_pages  # noqa: E402
from tests.support import project_env, wait_until  # noqa: E402

SERVER_PAGES = 40
IDLE_SHARE = 0.05  # of one core: below this over a second, the server does no OCR work
SAFETY_S = 600


@dataclass
class Row:
    name: str
    measured: str
    reference: str
    target: str
    met: bool | None


def make_scan(path: Path, pages: int, paragraphs: int) -> Path:
    """An image-only scan of `pages` letter pages of text at 100 dpi, rendered at 1288 px like any other.

    Made in a child process: Linux reports a child's peak RSS as at least this process's at the moment it
    was started (ru_maxrss survives exec), so this process must not grow by holding the page images."""
    subprocess.run([sys.executable, __file__, "--make-scan", str(path), str(pages), str(paragraphs)], check=True)
    return path


def _make_scan(path: Path, pages: int, paragraphs: int) -> None:
    born = make_born_digital_pdf(
        path.with_suffix(".born.pdf"), [[PARAGRAPHS[n % 7 : n % 7 + paragraphs]] for n in range(pages)]
    )
    image_only_pdf(path, render_pdf_pages(born, dpi=100), dpi=100)


def db_count(data_dir: Path, sql: str, params: tuple = ()) -> int:
    try:
        with closing(sqlite3.connect(data_dir / "ocrsite.sqlite3", timeout=30)) as db:
            return db.execute(sql, params).fetchone()[0]
    except sqlite3.OperationalError:  # not migrated yet
        return 0


class MaxSampler:
    """The largest value of `sample()` seen, every `interval` seconds, in a thread."""

    def __init__(self, sample, interval: float = 0.02) -> None:
        self.sample, self.interval, self.maximum = sample, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.maximum = max(self.maximum, self.sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> MaxSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def ocr_command(workdir: Path, pdf: Path, engine: str) -> tuple[float, int, int, float]:
    """(peak RSS in MB, pages done, most pages held at once, wall seconds) of `manage.py ocr`."""
    data_dir = Path(tempfile.mkdtemp(prefix="data-", dir=workdir))
    env = project_env(data_dir, {"DJANGO_SETTINGS_MODULE": "ocrsite.settings"})
    manage = [sys.executable, str(REPO / "manage.py")]
    subprocess.run([*manage, "migrate", "-v0"], env=env, cwd=REPO, check=True)
    running = "SELECT COUNT(*) FROM scans_page WHERE status = 'running'"
    started = time.perf_counter()
    with MaxSampler(lambda: db_count(data_dir, running)) as held:
        process = subprocess.Popen(
            [*manage, "ocr", str(pdf), "--engine", engine, "--lang", "eng", "--format", "txt",
             "--out", str(workdir / f"out-{data_dir.name}")],
            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        # wait4: this child's own peak RSS (ru_maxrss, KiB on Linux).
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"manage.py ocr failed on {pdf.name}")
    done = db_count(data_dir, "SELECT COUNT(*) FROM scans_page WHERE status = 'done'")
    return usage.ru_maxrss / 1024, done, held.maximum, wall


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for member in process_tree(pid):
        try:
            times = psutil.Process(member).cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


def work_stopped_after(pid: int, since: float) -> float:
    """Seconds from `since` to the first moment after which the process tree uses less than IDLE_SHARE of
    a core over a whole second (CPU time sampled every 50 ms)."""
    samples: list[tuple[float, float]] = []
    deadline = time.monotonic() + SAFETY_S
    while time.monotonic() < deadline:
        samples.append((time.monotonic(), cpu_seconds(pid)))
        # The first sample from which the next second stays idle.
        for index, (at, used) in enumerate(samples):
            later = [(t, u) for t, u in samples[index:] if t - at >= 1.0]
            if later and later[0][1] - used < IDLE_SHARE * (later[0][0] - at):
                return at - since
        time.sleep(0.05)
    raise SystemExit("the server never stopped working")


def serve_round(workdir: Path, pdf: Path, engine: str, action: str) -> dict[str, float]:
    """One server, one scan, Cancel or SIGTERM once its first page is done."""
    data = Path(tempfile.mkdtemp(prefix=f"serve-{engine}-{action}-", dir=workdir)) / "data"

    def choose_engine(folder: Path) -> None:
        with closing(sqlite3.connect(folder / "ocrsite.sqlite3")) as db:
            db.execute("UPDATE vllm_control_vlmsettings SET cpu_engine = ?", (engine,))
            db.commit()

    with running_site(data, {"OCRSITE_EMBEDDED_RUNNER": "true"}, before_start=choose_engine) as site:
        session = site.login()
        reply = multipart_upload(session, [(pdf.name, file_chunks(pdf), pdf.stat().st_size)])
        assert reply.status == 302, reply.head
        scan_id = db_count(site.data, "SELECT MAX(id) FROM scans_scan")
        done = "SELECT COUNT(*) FROM scans_page WHERE scan_id = ? AND status = 'done'"
        wait_until(lambda: db_count(site.data, done, (scan_id,)) >= 1, SAFETY_S, 0.02, "the first page")
        pid = site.process.pid
        if action == "sigterm":
            started = time.monotonic()
            site.process.send_signal(signal.SIGTERM)
            site.process.wait(timeout=SAFETY_S)
            return {"exit_s": time.monotonic() - started, "returncode": site.process.returncode}
        started = time.monotonic()
        status, _, _ = session.request(
            "POST", f"/scans/{scan_id}/cancel/", b"",
            {"X-CSRFToken": session.csrf_token, "Referer": f"{session.origin}/scans/{scan_id}/"},
        )
        assert status == 302, status
        running = "SELECT COUNT(*) FROM scans_page WHERE scan_id = ? AND status = 'running'"
        wait_until(lambda: db_count(site.data, running, (scan_id,)) == 0, SAFETY_S, 0.02, "no running page")
        released = time.monotonic() - started
        stopped = work_stopped_after(pid, started)
        return {
            "stopped_s": stopped, "released_s": released,
            "peak_rss_mb": peak_rss(process_tree(pid)) / 2**20, "done": db_count(site.data, done, (scan_id,)),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small scans, Tesseract only (a smoke run)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--make-scan", nargs=3, metavar=("PATH", "PAGES", "PARAGRAPHS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_scan:
        path, pages, paragraphs = args.make_scan
        _make_scan(Path(path), int(pages), int(paragraphs))
        return
    sizes = [("tesseract", 10, 40)] if args.quick else [("tesseract", 50, 300), ("rapidocr", 10, 50)]
    engines = [engine for engine, _, _ in sizes]

    from scans.pipeline.cpu import claim_limit  # stdlib only: this process stays small (see make_scan)

    limit = claim_limit()
    workdir = Path(tempfile.mkdtemp(prefix="ocrsite-cpu-bench-"))
    rows: list[Row] = []
    try:
        # (a) memory and pages held, one paragraph a page (quick pages; memory does not depend on the text).
        # RapidOCR reads a page in about 5 CPU s: shorter scans for it.
        held = 0
        for engine, small, large in sizes:
            runs = {}
            for pages in (small, large):
                runs[pages] = ocr_command(workdir, make_scan(workdir / f"scan-{pages}.pdf", pages, paragraphs=1), engine)
                rss, done, most, wall = runs[pages]
                held = max(held, most)
                print(f"(a) {engine}, {pages} pages: {done} done in {wall:.0f} s, peak RSS {rss:.0f} MB, "
                      f"at most {most} pages held", flush=True)
            (rss_small, _, _, _), (rss_large, done_large, _, _) = runs[small], runs[large]
            rows.append(Row(f"(a) {engine}: peak RSS, {small}-page scan", f"{rss_small:.0f} MB", "", "", None))
            rows.append(Row(
                f"(a) {engine}: peak RSS, {large}-page scan", f"{rss_large:.0f} MB", f"{rss_small:.0f} MB ({small} pages)",
                "flat (within 10 %)", rss_large <= 1.1 * rss_small and done_large == large,
            ))
        rows.append(Row("(a) most pages held at once", str(held), f"16 in flight (settings); limit {limit}",
                        f"<= {limit}", held <= limit))

        # (b) Cancel and SIGTERM of a real server mid-scan
        pdf = make_scan(workdir / "server-scan.pdf", SERVER_PAGES, paragraphs=3)
        for engine in engines:
            cancel = serve_round(workdir, pdf, engine, "cancel")
            print(f"(b) {engine} cancel: {cancel}", flush=True)
            rows.append(Row(f"(b) {engine}: Cancel -> CPU work stops", f"{cancel['stopped_s']:.1f} s",
                            f"pages given back after {cancel['released_s']:.2f} s", "<= 5 s", cancel["stopped_s"] <= 5))
            rows.append(Row(f"(b) {engine}: server peak RSS", f"{cancel['peak_rss_mb']:.0f} MB", "", "", None))
            term = serve_round(workdir, pdf, engine, "sigterm")
            print(f"(b) {engine} SIGTERM: {term}", flush=True)
            rows.append(Row(f"(b) {engine}: SIGTERM -> serve exits", f"{term['exit_s']:.1f} s",
                            f"exit status {term['returncode']}", "<= 10 s", term["exit_s"] <= 10 and term["returncode"] == 0))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    print_table(("benchmark", "measured", "reference", "target", "met"), rows)
    print(f"\n{len(os.sched_getaffinity(0))} usable cores (claim limit {limit}), Python {sys.version.split()[0]}; "
          f"load average at the end: {os.getloadavg()[0]:.1f}.")


if __name__ == "__main__":
    main()
