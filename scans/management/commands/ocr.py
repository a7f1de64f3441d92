"""`manage.py ocr FILE ...`: OCR files to completion in this process (or only queue them).

Per-scan overrides given here (--prompt, --model, --base-url, --concurrency, --engine, --lang) are stored in
`Scan.options`, so a queued scan keeps them wherever it is processed. The API key is the exception:
it is used from memory for this run only, and stored in `Scan.options` (in the database, in clear)
only with --queue, where the worker that processes the scan later has no other way to get it.
Without --api-key the key of the effective settings is used. Each file is judged alone: one that is
rejected is reported and the others are processed; the exit status says whether every page was read.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from ocrsite.database import ensure_migrated
from scans import batch, exports, services
from scans.models import Scan
from scans.pipeline.engines import ENGINE_CHOICES
from scans.pipeline.languages import LanguageError, installed_languages, validate_language
from scans.uploads import create_scan_from_path, judge
from vllm_control.config import normalize_base_url

PRIORITIES = {priority.name.lower(): priority.value for priority in Scan.Priority}  # low, normal, high, urgent


def positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError
    return value


class Command(BaseCommand):
    help = (
        "OCR PDF or image files to Markdown/text/JSON. The scans are recorded (they appear in the web UI). "
        "Exit status 0 when every page is done, 1 when any page failed. Options not given come from the "
        "effective settings. --api-key is stored in the database (in clear) only with --queue."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("files", nargs="*", metavar="FILE", help="PDF, PNG, JPEG, TIFF, WebP or GIF files")
        parser.add_argument("--out", default=".", help="directory for the output files (default: current directory)")
        parser.add_argument("--format", choices=tuple(exports.FORMATS), default="md", help="output format (default: md)")
        parser.add_argument("--base-url", help="OpenAI-compatible server URL, with or without /v1")
        parser.add_argument("--model", help="model name to request (default: the served model name)")
        parser.add_argument("--api-key", help="API key of the server (stored only with --queue)")
        parser.add_argument("--concurrency", type=positive_int, help="requests in flight at once")
        parser.add_argument("--prompt", choices=("markdown", "olmocr"), help="prompt preset")
        parser.add_argument(
            "--engine", choices=ENGINE_CHOICES,
            help="vllm (the model server), tesseract or rapidocr (CPU), or builtin (the CPU engine chosen in the "
            "settings); default: the configured mode",
        )
        parser.add_argument(
            "--lang", metavar="LANG",
            help="Tesseract's language codes, several joined by + (eng+deu); default: the settings' "
            f"(installed: {', '.join(installed_languages()) or 'none'})",
        )
        parser.add_argument("--user", help="owner of the recorded scans (default: the first superuser)")
        parser.add_argument("--queue", action="store_true", help="only record the scans as queued and print their ids")
        parser.add_argument(
            "--priority", choices=PRIORITIES, default="normal",
            help="the queued scans' share of the runners: low, normal (default), high (4x) or urgent (16x)",
        )
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
        language = None
        if opts["lang"]:
            try:
                language = validate_language(opts["lang"])
            except LanguageError as exc:
                raise CommandError(str(exc)) from None
        ensure_migrated(self.stderr)
        options = {
            "prompt": opts["prompt"],
            "model": opts["model"],
            "base_url": normalize_base_url(opts["base_url"]) if opts["base_url"] else None,
            "concurrency": opts["concurrency"],
            "engine": opts["engine"],
            "language": language,
        }
        options = {key: value for key, value in options.items() if value not in (None, "")}
        if opts["queue"] and opts["api_key"]:
            options["api_key"] = opts["api_key"]

        scans: list[Scan] = []
        if opts["retry_failed"] is not None:
            scans.append(self._retry(opts["retry_failed"], options))
        rejected = 0
        if files:
            try:
                owner = batch.resolve_owner(opts["user"])
            except batch.OwnerNotFound as exc:
                raise CommandError(str(exc)) from None
            for name in files:
                judged = judge(name, lambda: create_scan_from_path(
                    owner=owner, path=Path(name), options=options, priority=PRIORITIES[opts["priority"]]
                ))
                if judged.scan is None:
                    rejected += 1
                    self.stderr.write(f"{name}: {judged.error}")
                    continue
                scans.append(judged.scan)
                for warning in judged.scan.warnings:
                    self.stderr.write(f"{name}: {warning['message']}")

        if opts["queue"]:
            for scan in scans:
                self.stdout.write(f"{scan.pk}\t{scan.original_filename}\t{scan.page_count} pages\tqueued")
        elif scans:
            secrets = {scan.pk: opts["api_key"] for scan in scans} if opts["api_key"] else {}
            if not self._process(scans, out_dir, opts["format"], opts["concurrency"], secrets):
                sys.exit(1)
        elif rejected:
            raise CommandError("No file could be processed.")
        if rejected:
            sys.exit(1)

    def _retry(self, scan_id: int, options: dict) -> Scan:
        scan = Scan.objects.filter(pk=scan_id).first()
        if scan is None:
            raise CommandError(f"There is no scan {scan_id}.")
        if not scan.is_finished:
            raise CommandError(f"Scan {scan_id} is {scan.status}; only a finished scan can be retried.")
        if options:
            Scan.objects.filter(pk=scan.pk).update(options={**scan.options, **options})
        count = services.retry_failed_pages(scan=scan)
        if count:
            self.stdout.write(f"Retrying {count} page(s) of scan {scan_id} ({scan.original_filename}).")
        else:
            self.stdout.write(f"Scan {scan_id} has no failed pages to retry.")  # still written out below
        return scan

    def _process(self, scans: list[Scan], out_dir: Path, fmt: str, concurrency: int | None, secrets: dict[int, str]) -> bool:
        """Returns whether every page of every scan is done."""
        ids = [scan.pk for scan in scans]
        progress = batch.BatchProgress(self.stderr._out, batch.pages_to_send(scans), self.stderr.isatty())
        try:
            asyncio.run(batch.run_batch(scans, concurrency=concurrency, secrets=secrets, progress=progress))
        except KeyboardInterrupt:
            progress.close()
            batch.cancel_unfinished(ids)
            raise CommandError(
                "Interrupted: the unfinished scans were cancelled; finished pages are kept "
                f"(resume with --retry-failed {' / '.join(str(i) for i in ids)})."
            ) from None
        progress.close()

        all_done = True
        total = failed = fallback = 0
        for item in batch.write_outputs(ids, out_dir, fmt):
            scan, counts = item.scan, item.counts
            total += counts.total
            failed += counts.failed
            fallback += counts.fallback
            all_done &= counts.done == counts.total
            label = f"{scan.original_filename} (scan {scan.pk})"
            if scan.status == Scan.Status.FAILED:
                self.stderr.write(f"{label}: failed: {scan.error}")
            elif not scan.is_finished or scan.status == Scan.Status.CANCELLED:
                self.stderr.write(f"{label}: {scan.status}")
            if item.path is not None:
                self.stdout.write(
                    f"{label}: {scan.get_status_display().lower()}, {counts.done}/{counts.total} pages done -> {item.path}"
                )
        self.stdout.write(
            f"Summary: {len(ids)} file(s), {total} pages, {failed} failed, {fallback} fallback, "
            f"{progress.rate(progress.done):.2f} pages/s, {progress.rate(progress.output_tokens):.1f} tokens/s"
        )
        return all_done
