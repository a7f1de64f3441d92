"""OCR a batch of scans to completion in this process (what `manage.py ocr` does), with progress.

The command parses arguments and prints; this module owns who owns the scans, how pages are sent (one
`Runner` for the batch), the progress shown while they are, and where each output goes.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from django.contrib.auth import get_user_model
from tqdm import tqdm

from scans import exports, selectors, services
from scans.events import PageCounts
from scans.models import Page, Scan
from scans.pipeline.runner import Runner


class OwnerNotFound(LookupError):
    pass


def resolve_owner(username: str | None):
    """`username`, else the first superuser, else a local "ocr" user that cannot log in.
    Raises OwnerNotFound for an unknown `username`."""
    User = get_user_model()
    if username:
        try:
            return User.objects.get(**{User.USERNAME_FIELD: username})
        except User.DoesNotExist:
            raise OwnerNotFound(f"There is no user named {username!r}.") from None
    owner = User.objects.filter(is_superuser=True).order_by("pk").first()
    if owner is not None:
        return owner
    owner, created = User.objects.get_or_create(**{User.USERNAME_FIELD: "ocr"})
    if created:
        owner.set_unusable_password()
        owner.save()
    return owner


@dataclass
class BatchProgress:
    """Pages finished during this run: a progress bar on a terminal (tqdm: rate, ETA, terminal width),
    one line per page otherwise (logs, pipes)."""

    stream: TextIO
    total: int
    tty: bool
    done: int = 0
    failed: int = 0
    output_tokens: int = 0
    started: float = field(default_factory=time.monotonic)
    last_page_at: float | None = None
    bar: tqdm | None = None

    def __post_init__(self) -> None:
        if self.tty:
            self.bar = tqdm(total=self.total, unit="page", file=self.stream, dynamic_ncols=True)

    def rate(self, value: float) -> float:
        """Per second of processing: from the start to the last page committed (not writing the outputs)."""
        elapsed = (self.last_page_at or time.monotonic()) - self.started
        return value / elapsed if elapsed > 0 else 0.0

    def page(self, scan: Scan, page: Page) -> None:
        self.last_page_at = time.monotonic()
        self.done += 1
        self.failed += page.status == Page.Status.FAILED
        self.output_tokens += page.output_tokens
        if self.bar is not None:
            if self.failed:
                self.bar.set_postfix(failed=self.failed, refresh=False)
            self.bar.update(1)
            return
        if page.status == Page.Status.FAILED:
            note = f" FAILED: {page.error}"
        else:
            note = "".join(f" ({warning['code']})" for warning in page.warnings or [])
        self.stream.write(f"{scan.original_filename}: page {page.number}/{scan.page_count} {page.status}{note}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def pages_to_send(scans: list[Scan]) -> int:
    return sum(counts.unfinished for counts in selectors.page_counts(scan.pk for scan in scans).values())


async def run_batch(scans: list[Scan], *, concurrency: int | None, secrets: dict[int, str], progress: BatchProgress) -> None:
    """Process every scan to the end with one runner (pages another runner, e.g. the web server's,
    takes meanwhile are waited for)."""
    by_id = {scan.pk: scan for scan in scans}

    async def on_page(page: Page) -> None:
        progress.page(by_id[page.scan_id], page)

    await Runner(max_in_flight=concurrency, on_page=on_page, secrets=secrets).run_scans(list(by_id))


def cancel_unfinished(scan_ids: list[int]) -> None:
    for scan in Scan.objects.filter(pk__in=scan_ids).exclude(status__in=Scan.FINISHED):
        services.cancel_scan(scan=scan)


@dataclass(frozen=True)
class Written:
    scan: Scan
    counts: PageCounts
    path: Path | None  # None: nothing to write (no page was read)


def _is_the_scan_s_file(path: Path, scan: Scan) -> bool:
    """Whether `path` holds the very file the scan was read from (a PDF written next to itself)."""
    try:
        if path.stat().st_size != scan.size:
            return False
        with path.open("rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest() == scan.sha256
    except OSError:
        return False


def write_outputs(scan_ids: list[int], out_dir: Path, fmt: str) -> list[Written]:
    """One output per scan in `out_dir`, named after the uploaded file (`report.pdf` -> `report.md`;
    a name taken twice gets the scan id; a searchable PDF that would replace the file it was read
    from is `report.ocr.pdf`). A scan that failed still gets its done pages written."""
    used: set[str] = set()
    written = []
    scans = Scan.objects.in_bulk(scan_ids)
    counts = selectors.page_counts(scan_ids)
    for scan_id in scan_ids:
        scan, scan_counts = scans[scan_id], counts.get(scan_id, PageCounts())
        path = None
        if scan.status in (Scan.Status.DONE, Scan.Status.DONE_WITH_ERRORS) or scan_counts.done:
            name = f"{Path(scan.original_filename).stem or f'scan-{scan.pk}'}.{fmt}"
            if name in used:
                name = f"{Path(name).stem}-{scan.pk}.{fmt}"
            if fmt == "pdf" and _is_the_scan_s_file(out_dir / name, scan):
                name = f"{Path(name).stem}.ocr.pdf"
            used.add(name)
            path = out_dir / name
            content = exports.render(scan, fmt)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content, encoding="utf-8")
        written.append(Written(scan, scan_counts, path))
    return written
