"""Writes on scans and pages: queueing, claiming pages, committing page results, cancelling, retrying.

Every function is keyword-only and typed; each state change is one short transaction whose
condition (`WHERE status=... AND worker_id=...`) decides whether it happened, so several runners
(threads, processes, machines) share the queue without stepping on each other.

Runners claim pages, not scans (see scans.scheduling for which pages): a scan is `queued` until its
first page is claimed, `processing` while it has pages to send, and finished by the commit of its last
page. A runner's claims are kept by its heartbeat (`Worker`); when it stops beating, any runner puts
its running pages back to pending.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta

from django.db import connection, transaction
from django.db.models import Count, Exists, F, OuterRef
from django.db.models.functions import Coalesce
from django.utils import timezone

from scans import thumbnails
from scans.events import PAGE_STATE_FIELDS
from scans.models import Page, Scan, Worker
from scans.pipeline import queue_signals
from scans.pipeline.types import PageResult, PageWarning
from scans.progress import publish_page_on_commit, publish_scan_on_commit
from scans.scheduling import Candidate, allocate
from scans.signals import send_scan_finished_on_commit

logger = logging.getLogger(__name__)

UNFINISHED_PAGES = (Page.Status.PENDING, Page.Status.RUNNING)


def announce_queued(*, scan_id: int) -> None:
    """Once the current transaction commits: tell the browsers, and wake this process's runners."""
    publish_scan_on_commit(scan_id)
    transaction.on_commit(queue_signals.wake_runners)


# --- queueing --------------------------------------------------------------------------------


def create_pages(scan: Scan) -> int:
    """Create the missing Page rows (1..page_count) of a scan; returns how many were created."""
    existing = set(scan.pages.values_list("number", flat=True))
    missing = [Page(scan=scan, number=n) for n in range(1, scan.page_count + 1) if n not in existing]
    Page.objects.bulk_create(missing)
    return len(missing)


# A failed page sent again starts over.
_FAILED_PAGE_RESET = dict(
    status=Page.Status.PENDING, error="", text="", attempts=0, finish_reason="", worker_id="",
    started_at=None, finished_at=None, latency_ms=None, warnings=[],
)
_SCAN_REQUEUED = dict(status=Scan.Status.QUEUED, error="", started_at=None, finished_at=None)


def retry_failed_pages(*, scan: Scan) -> int:
    """Put a finished scan's failed pages back to pending and requeue it; returns how many pages
    will be sent. A cancelled or failed scan's other unfinished pages resume as well."""
    with transaction.atomic():
        locked = Scan.objects.select_for_update().filter(pk=scan.pk, status__in=Scan.FINISHED)
        current = locked.first()
        if current is None:
            return 0
        current.pages.filter(status=Page.Status.FAILED).update(**_FAILED_PAGE_RESET)
        unfinished = current.pages.filter(status__in=UNFINISHED_PAGES).count()
        if not unfinished:
            return 0
        Scan.objects.filter(pk=scan.pk).update(**_SCAN_REQUEUED)
        announce_queued(scan_id=scan.pk)
    scan.refresh_from_db()
    return unfinished


# --- corrections and single pages read again ---------------------------------------------------

# What reading one page again may override in the scan's options (scans.pipeline.options.ScanOptions).
REREAD_OPTIONS = ("prompt", "model", "engine")


def correct_page(*, page: Page, text: str, user) -> Page:
    """Store a person's correction of a page (any status): it replaces the engine's text, which stays
    in `Page.text`, in the page view and every export, and stays in use when the page is read again.
    Line ends are normalized to `\\n`. Text equal to the engine's is no correction (an existing one
    is removed). Returns the page as stored."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    with transaction.atomic():
        current = Page.objects.select_for_update().get(pk=page.pk)
        if text == current.text and current.has_engine_result:
            fields = dict(corrected_text="", corrected_by=None, corrected_at=None)
        else:
            fields = dict(corrected_text=text, corrected_by=user, corrected_at=timezone.now())
        Page.objects.filter(pk=page.pk).update(**fields)
        publish_page_on_commit(page_id=page.pk)
    page.refresh_from_db()
    return page


def revert_correction(*, page: Page) -> Page:
    """Drop the page's correction: the engine's text is the page's text again. Returns the page."""
    with transaction.atomic():
        Page.objects.filter(pk=page.pk).update(corrected_text="", corrected_by=None, corrected_at=None)
        publish_page_on_commit(page_id=page.pk)
    page.refresh_from_db()
    return page


def reread_page(*, page: Page, options: dict[str, str]) -> bool:
    """Read one done or failed page again, with `options` (keys of REREAD_OPTIONS; empty values mean
    "the scan's") overriding the scan's options for this page. A done page keeps its result (text,
    status `pending` then `running`, `finished_at`) until the new one arrives, and keeps it with a
    warning if the new reading fails (commit_page_results); a failed page starts over as with retry.
    A finished scan is queued again (a cancelled or failed scan's other unfinished pages resume too).
    Returns False when the page is already waiting to be read. Raises ValueError for another option."""
    unknown = set(options) - set(REREAD_OPTIONS)
    if unknown:
        raise ValueError(f"Cannot override {', '.join(sorted(unknown))} when reading a page again.")
    overrides = {key: value for key, value in options.items() if value}
    with transaction.atomic():
        _lock_scans([page.scan_id])  # as commit_page_results does: the scan finishes or is queued again, not both
        rows = Page.objects.filter(pk=page.pk)
        changed = rows.filter(status=Page.Status.DONE).update(
            status=Page.Status.PENDING, reocr_options=overrides, worker_id="", started_at=None
        ) or rows.filter(status=Page.Status.FAILED).update(**_FAILED_PAGE_RESET, reocr_options=overrides)
        if not changed:
            return False
        Scan.objects.filter(pk=page.scan_id, status__in=Scan.FINISHED).update(**_SCAN_REQUEUED)
        publish_page_on_commit(page_id=page.pk)
        transaction.on_commit(queue_signals.wake_runners)
    page.refresh_from_db()
    return True


def cancel_scan(*, scan: Scan) -> bool:
    """Cancel a queued or processing scan; the runners holding its pages stop their in-flight requests
    and put those pages back to pending. Returns False when the scan had already finished."""
    now = timezone.now()
    with transaction.atomic():
        changed = Scan.objects.filter(pk=scan.pk, status__in=Scan.ACTIVE).update(
            status=Scan.Status.CANCELLED, finished_at=now
        )
        if changed:
            publish_scan_on_commit(scan.pk)
            transaction.on_commit(lambda: queue_signals.notify_cancelled(scan.pk))
            send_scan_finished_on_commit(scan_id=scan.pk, status=Scan.Status.CANCELLED)
    scan.refresh_from_db()
    return bool(changed)


def delete_scan(*, scan: Scan) -> None:
    """Stop any processing of the scan, then delete it, its pages, its stored file and its cached page images."""
    cancel_scan(scan=scan)
    storage, name = scan.file.storage, scan.file.name
    scan_id, sha256 = scan.pk, scan.sha256
    scan.delete()
    if name:
        transaction.on_commit(lambda: storage.delete(name))
    transaction.on_commit(lambda: thumbnails.delete_cached(scan_id=scan_id, sha256=sha256))


# --- workers (runners holding pages) ----------------------------------------------------------


def heartbeat_worker(*, worker_id: str) -> None:
    """Register the runner, or refresh its heartbeat: its running pages stay its own."""
    Worker.objects.update_or_create(worker_id=worker_id, defaults={"heartbeat_at": timezone.now()})


def unregister_worker(*, worker_id: str) -> None:
    """A runner stops cleanly: its running pages go back to pending, for any runner to take."""
    with transaction.atomic():
        scans = _release(Page.objects.filter(status=Page.Status.RUNNING, worker_id=worker_id))
        Worker.objects.filter(worker_id=worker_id).delete()
    for scan_id in scans:
        publish_scan_on_commit(scan_id)


def recover_stale_workers(*, stale_after: timedelta) -> list[int]:
    """Put the running pages of runners that stopped sending heartbeats (they died, e.g. by SIGKILL)
    back to pending; returns the scans that got pages back. A page's result is committed with its
    `done`/`failed` status in one transaction, so a running page never holds a finished result."""
    cutoff = timezone.now() - stale_after
    alive = Worker.objects.filter(heartbeat_at__gte=cutoff).values("worker_id")
    with transaction.atomic():
        dead = list(Worker.objects.filter(heartbeat_at__lt=cutoff).values_list("worker_id", flat=True))
        orphaned = Page.objects.filter(status=Page.Status.RUNNING).exclude(worker_id__in=alive)
        scans = _release(orphaned)
        Worker.objects.filter(worker_id__in=dead).delete()
    for scan_id in scans:
        publish_scan_on_commit(scan_id)
    if scans:
        logger.warning("Requeued the running pages of scans %s: their runner stopped sending heartbeats", scans)
    return scans


def _release(pages) -> list[int]:
    """Running pages back to pending; a processing scan left with none running goes back to the queue
    (it shows `queued` until a runner takes its pages again). Returns the scans that changed."""
    scan_ids = sorted(set(pages.values_list("scan_id", flat=True)))
    if scan_ids:
        pages.update(status=Page.Status.PENDING, worker_id="", started_at=None)
        still_running = Page.objects.filter(scan_id__in=scan_ids, status=Page.Status.RUNNING).values("scan_id")
        Scan.objects.filter(pk__in=scan_ids, status=Scan.Status.PROCESSING).exclude(pk__in=still_running).update(
            status=Scan.Status.QUEUED
        )
    return scan_ids


def release_pages(*, worker_id: str, scan_id: int | None = None, numbers: Collection[int] | None = None) -> None:
    """This runner gives back pages it holds (cancelled, or it is stopping): running -> pending."""
    pages = Page.objects.filter(status=Page.Status.RUNNING, worker_id=worker_id)
    if scan_id is not None:
        pages = pages.filter(scan_id=scan_id)
    if numbers is not None:
        pages = pages.filter(number__in=list(numbers))
    with transaction.atomic():
        for released in _release(pages):
            publish_scan_on_commit(released)


# --- claiming pages --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimedPage:
    page: Page  # as marked running (the fields a live event shows)
    scan_status_changed: bool  # this claim took the scan from queued to processing
    cpu: bool = False  # its scan is read by a CPU engine (the claim's `is_cpu_scan`)


def _candidates(
    scan_ids: Collection[int] | None, slots: int, is_cpu_scan: Callable[[dict], bool] | None = None
) -> tuple[list[Candidate], dict[int, int]]:
    """The active scans with pages waiting (limited to `scan_ids` if given) and every user's pages in
    flight. Cheap at any queue length: an aggregate over the running pages only, and an index seek per
    scan for whether it has a page waiting (how many does not matter beyond `slots`)."""
    running_by_scan: dict[int, int] = {}
    by_owner: dict[int, int] = {}
    running = Page.objects.filter(status=Page.Status.RUNNING).values_list("scan_id", "scan__owner_id").annotate(n=Count("id"))
    for scan_id, owner, count in running.order_by():
        running_by_scan[scan_id] = count
        by_owner[owner] = by_owner.get(owner, 0) + count
    waiting = Scan.objects.filter(
        Exists(Page.objects.filter(scan=OuterRef("pk"), status=Page.Status.PENDING)), status__in=Scan.ACTIVE
    )
    if scan_ids is not None:
        waiting = waiting.filter(pk__in=list(scan_ids))
    rows = waiting.order_by("created_at", "pk").values_list("pk", "owner_id", "priority", "created_at", "options", "status")
    candidates = [
        Candidate(
            scan_id=scan_id, owner_id=owner, priority=priority, created_at=created_at, pending=slots,
            running=running_by_scan.get(scan_id, 0), cap=_cap(options), queued=status == Scan.Status.QUEUED,
            cpu=is_cpu_scan is not None and is_cpu_scan(options or {}),
        )
        for scan_id, owner, priority, created_at, options, status in rows[:1000]
    ]
    return candidates, by_owner


def _cap(options: dict | None) -> int | None:
    concurrency = (options or {}).get("concurrency")
    return int(concurrency) if concurrency else None


def claim_pages(
    *,
    worker_id: str,
    slots: int,
    scan_ids: Collection[int] | None = None,
    cpu_slots: int | None = None,
    is_cpu_scan: Callable[[dict], bool] | None = None,
) -> list[ClaimedPage]:
    """Take up to `slots` pending pages for this runner, shared fairly between users and scans
    (scans.scheduling), lowest page numbers first; `scan_ids` limits the choice (the `ocr` command's
    own scans). Scans for which `is_cpu_scan(scan.options)` is true take at most `cpu_slots` of the
    slots together. Each claimed page is `running`, held by `worker_id`, its first attempt recorded."""
    now = timezone.now()
    claimed: list[ClaimedPage] = []
    with transaction.atomic():
        candidates, by_owner = _candidates(scan_ids, slots, is_cpu_scan)
        while slots > 0 and candidates:
            granted = allocate(slots, candidates, by_owner, cpu_slots=cpu_slots)
            taken = {}
            for candidate in candidates:
                if candidate.scan_id in granted:
                    pages = _claim_from(candidate, granted[candidate.scan_id], worker_id, now)
                    taken[candidate.scan_id] = len(pages)
                    claimed += pages
            slots -= sum(taken.values())
            if cpu_slots is not None:
                cpu_slots -= sum(taken.get(c.scan_id, 0) for c in candidates if c.cpu)
            # A scan with fewer pages waiting than it was granted leaves the rest to the others.
            exhausted = {scan_id for scan_id, count in taken.items() if count < granted[scan_id]}
            if not exhausted:
                break
            for candidate in candidates:
                by_owner[candidate.owner_id] = by_owner.get(candidate.owner_id, 0) + taken.get(candidate.scan_id, 0)
            candidates = [
                replace(c, running=c.running + taken.get(c.scan_id, 0), queued=c.queued and c.scan_id not in taken)
                for c in candidates
                if c.scan_id not in exhausted
            ]
    return claimed


def _claim_from(candidate: Candidate, count: int, worker_id: str, now) -> list[ClaimedPage]:
    """Inside claim_pages' transaction: the scan's `count` lowest pending pages, marked running; the
    first claim of a queued scan starts it."""
    scan_id = candidate.scan_id
    pages = list(
        Page.objects.select_for_update(skip_locked=True)
        .filter(scan_id=scan_id, status=Page.Status.PENDING)
        .order_by("number")
        .only(*PAGE_STATE_FIELDS)[:count]
    )
    if not pages:
        return []
    Page.objects.filter(pk__in=[page.pk for page in pages]).update(
        status=Page.Status.RUNNING, worker_id=worker_id, started_at=now, attempts=1
    )
    started = candidate.queued and Scan.objects.filter(pk=scan_id, status=Scan.Status.QUEUED).update(
        status=Scan.Status.PROCESSING, started_at=Coalesce(F("started_at"), now), finished_at=None, error=""
    )
    if started:
        publish_scan_on_commit(scan_id)
    for page in pages:  # as just written
        page.status, page.worker_id, page.started_at, page.attempts = Page.Status.RUNNING, worker_id, now, 1
    return [ClaimedPage(page, bool(started), candidate.cpu) for page in pages]


# --- page results ----------------------------------------------------------------------------------


def record_attempt(*, scan_id: int, number: int, worker_id: str, attempt: int) -> None:
    Page.objects.filter(scan_id=scan_id, number=number, status=Page.Status.RUNNING, worker_id=worker_id).update(
        attempts=attempt
    )


@dataclass(frozen=True)
class PageOutcomeToCommit:
    scan_id: int
    number: int
    result: PageResult
    engine: str = ""  # the engine and model that read it (Page.engine, Page.model)
    model: str = ""


@dataclass(frozen=True)
class PageCommit:
    page: Page | None  # None when the page was no longer ours (the result was discarded)
    scan_status: str | None  # the scan's status after the commit (None: deleted)


def _keep_previous_result(mine, result: PageResult, now) -> Page | None:
    """Inside commit_page_results: a failed new reading of a page that had a result keeps that result
    (text, layout, tokens) with a warning saying why the new one is not there. Returns the page as
    written, or None when the page was not being read again with a result to keep."""
    previous = mine.filter(reocr_options__isnull=False, finished_at__isnull=False).only(*PAGE_STATE_FIELDS).first()
    if previous is None:
        return None
    warning = PageWarning(code="reread_failed", message=f"Reading the page again failed ({result.error}); this is the text it had.")
    warnings = [w for w in previous.warnings or [] if w.get("code") != "reread_failed"] + [warning]
    fields = dict(status=Page.Status.DONE, warnings=warnings, reocr_options=None, worker_id="")
    mine.update(**fields)
    for name, value in fields.items():
        setattr(previous, name, value)
    return previous


def _add_corrections(pages: list[Page], scan_ids: Collection[int]) -> None:
    """Set the corrections of pages built from what was written (a correction stays in use over a
    new result, and live events show it): one query for the scans' corrected pages."""
    wanted = {(page.scan_id, page.number): page for page in pages}
    rows = Page.objects.filter(scan_id__in=list(scan_ids), corrected_at__isnull=False).values_list(
        "scan_id", "number", "corrected_text", "corrected_at"
    )
    for scan_id, number, text, at in rows:
        page = wanted.get((scan_id, number))
        if page is not None:
            page.corrected_text, page.corrected_at = text, at


def commit_page_results(*, worker_id: str, outcomes: Sequence[PageOutcomeToCommit]) -> list[PageCommit]:
    """Store several pages' outcomes in one transaction, add their tokens to their scans' totals, and
    finish every scan left without unfinished pages. A page must be running for this runner; otherwise
    its outcome is not written (`PageCommit.page` is None). Returns one PageCommit per outcome.

    A page being read again (`Page.reocr_options`) gets its new result and leaves that state; when the
    new reading failed and the page had a result, the result stays and gets a `reread_failed` warning
    (`_keep_previous_result`). A correction is never touched: it stays in use over the new text."""
    now = timezone.now()
    written: list[Page | None] = []
    with transaction.atomic():
        scan_ids = sorted({o.scan_id for o in outcomes})
        _lock_scans(scan_ids)
        tokens: dict[int, list[int]] = {}
        for outcome in outcomes:
            result = outcome.result
            mine = Page.objects.filter(
                scan_id=outcome.scan_id, number=outcome.number, status=Page.Status.RUNNING, worker_id=worker_id
            )
            kept = _keep_previous_result(mine, result, now) if result.status == Page.Status.FAILED else None
            fields = dict(
                status=result.status, text=result.text, fallback=result.fallback, attempts=result.attempts,
                error=result.error, input_tokens=result.input_tokens, output_tokens=result.output_tokens,
                latency_ms=result.latency_ms, finish_reason=result.finish_reason[:30], metadata=result.metadata,
                warnings=list(result.warnings), layout=result.layout, finished_at=now,
                engine=outcome.engine[:20], model=outcome.model[:200], reocr_options=None,
            )
            changed = kept is not None or mine.update(**fields)
            # The row as just written (no need to read it back; a correction is added below).
            written.append(kept or (Page(scan_id=outcome.scan_id, number=outcome.number, worker_id=worker_id, **fields) if changed else None))
            if changed:
                totals = tokens.setdefault(outcome.scan_id, [0, 0])
                totals[0] += result.input_tokens
                totals[1] += result.output_tokens
        _add_corrections([page for page in written if page is not None and page.corrected_at is None], scan_ids)
        for scan_id, (input_tokens, output_tokens) in tokens.items():
            Scan.objects.filter(pk=scan_id).update(
                input_tokens=F("input_tokens") + input_tokens, output_tokens=F("output_tokens") + output_tokens
            )
        _finish_completed(scan_ids, now)
        statuses = dict(Scan.objects.filter(pk__in=scan_ids).values_list("pk", "status"))
    return [PageCommit(page, statuses.get(o.scan_id)) for o, page in zip(outcomes, written)]


def _lock_scans(scan_ids: Sequence[int]) -> None:
    """Inside a transaction: lock the scans' rows, in id order, so two runners committing a scan's last
    pages agree on who finishes it. SQLite needs nothing: its write transactions take turns."""
    if connection.features.has_select_for_update:
        list(Scan.objects.select_for_update().filter(pk__in=scan_ids).order_by("pk").values_list("pk", flat=True))


def _finish_completed(scan_ids: Collection[int], now) -> list[int]:
    """Inside a transaction: close each processing scan of `scan_ids` that has no page left to send,
    `done` or `done_with_errors` from its pages."""
    pages = Page.objects.filter(scan_id__in=list(scan_ids))
    unfinished = set(pages.filter(status__in=UNFINISHED_PAGES).values_list("scan_id", flat=True).distinct().order_by())
    completed = [scan_id for scan_id in scan_ids if scan_id not in unfinished]
    if not completed:
        return []
    failed = set(
        pages.filter(scan_id__in=completed, status=Page.Status.FAILED).values_list("scan_id", flat=True).distinct().order_by()
    )
    finished = []
    for scan_id in completed:
        status = Scan.Status.DONE_WITH_ERRORS if scan_id in failed else Scan.Status.DONE
        if Scan.objects.filter(pk=scan_id, status=Scan.Status.PROCESSING).update(status=status, finished_at=now):
            publish_scan_on_commit(scan_id)
            send_scan_finished_on_commit(scan_id=scan_id, status=status)
            finished.append(scan_id)
    return finished


def finish_completed_scans() -> list[int]:
    """Close processing scans with no page left to send (the commit of the last page normally does;
    this covers a scan whose last running page was released and then finished elsewhere)."""
    candidates = list(
        Scan.objects.filter(status=Scan.Status.PROCESSING)
        .exclude(pages__status__in=UNFINISHED_PAGES)
        .values_list("pk", flat=True)
    )
    if not candidates:
        return []
    with transaction.atomic():
        _lock_scans(candidates)
        return _finish_completed(candidates, timezone.now())


def fail_scan(*, scan_id: int, error: str) -> bool:
    """A problem that concerns every page (no model server, a rejected key, an unknown model): the scan
    fails with `error` and no more of its pages are sent. Requests already out may still answer: their
    pages are committed when they do. Done pages are kept and exported; the others can be retried."""
    with transaction.atomic():
        changed = Scan.objects.filter(pk=scan_id, status__in=Scan.ACTIVE).update(
            status=Scan.Status.FAILED, error=error, finished_at=timezone.now()
        )
        if changed:
            publish_scan_on_commit(scan_id)
            send_scan_finished_on_commit(scan_id=scan_id, status=Scan.Status.FAILED)
    return bool(changed)


def set_waiting_for_server(*, scan_id: int, waiting: bool) -> None:
    """A runner waits for the model server before it can read the scan's pages (or waits no more)."""
    Scan.objects.filter(pk=scan_id).update(waiting_for_server=waiting)


def set_scan_engine(*, scan_id: int, engine: str, model: str) -> None:
    Scan.objects.filter(pk=scan_id).update(engine=engine[:20], model=model[:200])
