"""`manage.py ocr FILE ...`: OCR files to completion in this process (or only queue them).

Per-scan overrides given here (--prompt, --model, --base-url, --concurrency, --engine) are stored in
`Scan.options`, so a queued scan keeps them wherever it is processed. The API key is the exception:
it is used from memory for this run only, and stored in `Scan.options` (in the database, in clear)
only with --queue, where the worker that processes the scan later has no other way to get it.
Without --api-key the key of the effective settings is used.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from scans import exports, services
from scans.models import Page, Scan
from scans.pipeline.runner import Runner, poll_interval
from scans.progress import scan_totals
from scans.uploads import UploadRejected, create_scan_from_path
from vllm_control.config import normalize_base_url

FORMATS = ("md", "txt", "json")


def positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError
    return value


def resolve_owner(username: str | None):
    """--user NAME, else the first superuser, else a local "ocr" user that cannot log in."""
    User = get_user_model()
    if username:
        try:
            return User.objects.get(**{User.USERNAME_FIELD: username})
        except User.DoesNotExist:
            raise CommandError(f"There is no user named {username!r}.") from None
    owner = User.objects.filter(is_superuser=True).order_by("pk").first()
    if owner is not None:
        return owner
    owner, created = User.objects.get_or_create(**{User.USERNAME_FIELD: "ocr"})
    if created:
        owner.set_unusable_password()
        owner.save()
    return owner


def render_output(scan: Scan, fmt: str) -> str:
    import json

    if fmt == "md":
        return exports.export_markdown(scan)
    if fmt == "txt":
        return exports.export_text(scan)
    return json.dumps(exports.export_json(scan), ensure_ascii=False, indent=2) + "\n"


@dataclass
class Progress:
    """Pages finished during this run, shown as a `\\r` bar on a terminal, as lines otherwise."""

    stream: object
    total: int
    tty: bool
    done: int = 0
    failed: int = 0
    fallback: int = 0
    output_tokens: int = 0
    started: float = field(default_factory=time.monotonic)
    last_page_at: float | None = None

    def rate(self, value: float) -> float:
        """Per second of processing: from the start to the last page committed (not writing the outputs)."""
        elapsed = (self.last_page_at or time.monotonic()) - self.started
        return value / elapsed if elapsed > 0 else 0.0

    def page(self, scan: Scan, page: Page) -> None:
        self.last_page_at = time.monotonic()
        self.done += 1
        self.failed += page.status == Page.Status.FAILED
        self.fallback += page.fallback
        self.output_tokens += page.output_tokens
        if self.tty:
            width = 30
            filled = int(width * self.done / self.total) if self.total else width
            bar = "#" * filled + "-" * (width - filled)
            failed = f", {self.failed} failed" if self.failed else ""
            self.stream.write(
                f"\r[{bar}] {self.done}/{self.total} pages{failed}, {self.rate(self.done):.1f} pages/s "
            )
        else:
            note = f" FAILED: {page.error}" if page.status == Page.Status.FAILED else (" (fallback text)" if page.fallback else "")
            self.stream.write(f"{scan.original_filename}: page {page.number}/{scan.page_count} {page.status}{note}\n")
        self.stream.flush()

    def end_line(self) -> None:
        if self.tty and self.done:
            self.stream.write("\n")
            self.stream.flush()


class Command(BaseCommand):
    help = (
        "OCR PDF or image files to Markdown/text/JSON. The scans are recorded (they appear in the web UI). "
        "Exit status 0 when every page is done, 1 when any page failed. Options not given come from the "
        "effective settings. --api-key is stored in the database (in clear) only with --queue."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("files", nargs="*", metavar="FILE", help="PDF, PNG, JPEG, TIFF or WebP files")
        parser.add_argument("--out", default=".", help="directory for the output files (default: current directory)")
        parser.add_argument("--format", choices=FORMATS, default="md", help="output format (default: md)")
        parser.add_argument("--base-url", help="OpenAI-compatible server URL, with or without /v1")
        parser.add_argument("--model", help="model name to request (default: the served model name)")
        parser.add_argument("--api-key", help="API key of the server (stored only with --queue)")
        parser.add_argument("--concurrency", type=positive_int, help="requests in flight at once")
        parser.add_argument("--prompt", choices=("markdown", "olmocr"), help="prompt preset")
        parser.add_argument("--engine", choices=("vllm", "builtin"), help="vllm (the model server) or builtin (CPU)")
        parser.add_argument("--user", help="owner of the recorded scans (default: the first superuser)")
        parser.add_argument("--queue", action="store_true", help="only record the scans as queued and print their ids")
        parser.add_argument("--retry-failed", type=int, metavar="SCAN_ID", help="retry the failed pages of a scan")

    def handle(self, *args, **opts) -> None:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise here
        files: list[str] = opts["files"]
        if not files and opts["retry_failed"] is None:
            raise CommandError("Give at least one FILE (or --retry-failed SCAN_ID).")
        out_dir = Path(opts["out"])
        if not opts["queue"]:
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CommandError(f"Cannot create the output directory {out_dir}: {exc.strerror}.") from None
        options = {
            "prompt": opts["prompt"],
            "model": opts["model"],
            "base_url": normalize_base_url(opts["base_url"]) if opts["base_url"] else None,
            "concurrency": opts["concurrency"],
            "engine": opts["engine"],
        }
        options = {key: value for key, value in options.items() if value not in (None, "")}
        if opts["queue"] and opts["api_key"]:
            options["api_key"] = opts["api_key"]

        scans: list[Scan] = []
        problems: list[str] = []
        if opts["retry_failed"] is not None:
            scans.append(self._retry(opts["retry_failed"], options))
        if files:
            owner = resolve_owner(opts["user"])
            for name in files:
                try:
                    scans.append(create_scan_from_path(owner=owner, path=Path(name), options=options))
                except UploadRejected as exc:
                    problems.append(f"{name}: {exc}")
                    self.stderr.write(f"{name}: {exc}")
        scans = [scan for scan in scans if scan is not None]

        if opts["queue"]:
            for scan in scans:
                self.stdout.write(f"{scan.pk}\t{scan.original_filename}\t{scan.page_count} pages\tqueued")
            if problems:
                sys.exit(1)
            return
        if not scans:
            if problems:
                raise CommandError("No file could be processed.")
            return

        secrets = {scan.pk: opts["api_key"] for scan in scans} if opts["api_key"] else {}
        ok = self._process(scans, out_dir, opts["format"], opts["concurrency"], secrets)
        if problems or not ok:
            sys.exit(1)

    def _retry(self, scan_id: int, options: dict) -> Scan | None:
        scan = Scan.objects.filter(pk=scan_id).first()
        if scan is None:
            raise CommandError(f"There is no scan {scan_id}.")
        if not scan.is_finished:
            raise CommandError(f"Scan {scan_id} is {scan.status}; only a finished scan can be retried.")
        if options:
            Scan.objects.filter(pk=scan.pk).update(options={**scan.options, **options})
        count = services.retry_failed_pages(scan=scan)
        if not count:
            self.stdout.write(f"Scan {scan_id} has no failed pages to retry.")
            return scan  # still written out below (status unchanged)
        self.stdout.write(f"Retrying {count} page(s) of scan {scan_id} ({scan.original_filename}).")
        return scan

    def _process(self, scans: list[Scan], out_dir: Path, fmt: str, concurrency: int | None, secrets: dict[int, str]) -> bool:
        ids = [scan.pk for scan in scans]
        to_send = Page.objects.filter(scan_id__in=ids, status__in=services.UNFINISHED_PAGES).count()
        progress = Progress(self.stderr._out, to_send, self.stderr.isatty())
        by_id = {scan.pk: scan for scan in scans}

        async def on_page(page: Page) -> None:
            progress.page(by_id[page.scan_id], page)

        runner = Runner(max_in_flight=concurrency, on_page=on_page, secrets=secrets)
        try:
            asyncio.run(self._run_all(runner, ids))
        except KeyboardInterrupt:
            progress.end_line()
            for scan in Scan.objects.filter(pk__in=ids).exclude(status__in=Scan.FINISHED):
                services.cancel_scan(scan=scan)
            raise CommandError(
                "Interrupted: the unfinished scans were cancelled; finished pages are kept "
                f"(resume with --retry-failed {' / '.join(str(i) for i in ids)})."
            ) from None
        progress.end_line()

        all_done = True
        used_names: set[str] = set()
        total = failed = fallback = 0
        for scan_id in ids:
            scan = Scan.objects.get(pk=scan_id)
            totals = scan_totals(scan)
            total += totals["total"]
            failed += totals["failed"]
            fallback += totals["fallback"]
            all_done &= totals["done"] == totals["total"]
            if scan.status == Scan.Status.FAILED:
                self.stderr.write(f"{scan.original_filename} (scan {scan.pk}): failed: {scan.error}")
            if scan.status in (Scan.Status.DONE, Scan.Status.DONE_WITH_ERRORS):
                name = f"{Path(scan.original_filename).stem or f'scan-{scan.pk}'}.{fmt}"
                if name in used_names:
                    name = f"{Path(name).stem}-{scan.pk}.{fmt}"
                used_names.add(name)
                target = out_dir / name
                target.write_text(render_output(scan, fmt), encoding="utf-8")
                self.stdout.write(
                    f"{scan.original_filename} (scan {scan.pk}): {scan.get_status_display().lower()}, "
                    f"{totals['done']}/{totals['total']} pages done -> {target}"
                )
            elif scan.status != Scan.Status.FAILED:
                self.stderr.write(f"{scan.original_filename} (scan {scan.pk}): {scan.status}")
        self.stdout.write(
            f"Summary: {len(ids)} file(s), {total} pages, {failed} failed, {fallback} fallback, "
            f"{progress.rate(progress.done):.2f} pages/s, {progress.rate(progress.output_tokens):.1f} tokens/s"
        )
        return all_done

    async def _run_all(self, runner: Runner, ids: list[int]) -> None:
        await asyncio.gather(*(self._run_one(runner, scan_id) for scan_id in ids))

    async def _run_one(self, runner: Runner, scan_id: int) -> None:
        status = await runner.run_scan(scan_id)
        if status is None:
            # Another runner (the web server or a worker) claimed it first: wait for it to finish there.
            while True:
                scan = await Scan.objects.filter(pk=scan_id).afirst()
                if scan is None or scan.is_finished:
                    return
                await asyncio.sleep(poll_interval())
