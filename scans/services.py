"""Writes on scans and pages: queueing, claiming, committing page results, cancelling, retrying.

Every function is keyword-only and typed; each state change is one short transaction whose
condition (`WHERE status=... AND worker_id=...`) decides whether it happened, so several runners
(threads, processes, machines) can share the queue without stepping on each other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from django.db import connection, transaction
from django.db.models import F, Q
from django.db.models.functions import Coalesce
from django.utils import timezone

from scans.events import PAGE_STATE_FIELDS
from scans.models import Page, Scan
from scans.pipeline import queue_signals
from scans.pipeline.types import PageResult
from scans.progress import publish_scan_on_commit
from scans.signals import send_scan_finished_on_commit

logger = logging.getLogger(__name__)

UNFINISHED_PAGES = (Page.Status.PENDING, Page.Status.RUNNING)
ACTIVE_SCANS = (Scan.Status.QUEUED, Scan.Status.PROCESSING)


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


def retry_failed_pages(*, scan: Scan) -> int:
    """Put a finished scan's failed pages back to pending and requeue it; returns how many pages
    will be sent. A cancelled or failed scan's other unfinished pages resume as well."""
    with transaction.atomic():
        locked = Scan.objects.select_for_update().filter(pk=scan.pk, status__in=Scan.FINISHED)
        current = locked.first()
        if current is None:
            return 0
        current.pages.filter(status=Page.Status.FAILED).update(
            status=Page.Status.PENDING, error="", text="", attempts=0, finish_reason="", worker_id="",
            started_at=None, finished_at=None, latency_ms=None,
        )
        unfinished = current.pages.filter(status__in=UNFINISHED_PAGES).count()
        if not unfinished:
            return 0
        Scan.objects.filter(pk=scan.pk).update(
            status=Scan.Status.QUEUED, error="", worker_id="", heartbeat_at=None, finished_at=None
        )
        announce_queued(scan_id=scan.pk)
    scan.refresh_from_db()
    return unfinished


def cancel_scan(*, scan: Scan) -> bool:
    """Cancel a queued or processing scan; the runner processing it stops its in-flight requests.
    Returns False when the scan had already finished."""
    now = timezone.now()
    with transaction.atomic():
        changed = Scan.objects.filter(pk=scan.pk, status__in=ACTIVE_SCANS).update(
            status=Scan.Status.CANCELLED, finished_at=now
        )
        if changed:
            publish_scan_on_commit(scan.pk)
            transaction.on_commit(lambda: queue_signals.notify_cancelled(scan.pk))
            send_scan_finished_on_commit(scan_id=scan.pk, status=Scan.Status.CANCELLED)
    scan.refresh_from_db()
    return bool(changed)


def delete_scan(*, scan: Scan) -> None:
    """Stop any processing of the scan, then delete it, its pages and its stored file."""
    cancel_scan(scan=scan)
    storage, name = scan.file.storage, scan.file.name
    scan.delete()
    if name:
        transaction.on_commit(lambda: storage.delete(name))


# --- claiming (used by the runner) -----------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    scan_id: int
    unfinished: int  # pages to send (pending or left running)


def _claim(scan_id: int, worker_id: str, *, only_if_queued: bool) -> Claim | None:
    now = timezone.now()
    target = Scan.objects.filter(pk=scan_id)
    if only_if_queued:
        target = target.filter(status=Scan.Status.QUEUED)
    won = target.update(
        status=Scan.Status.PROCESSING,
        worker_id=worker_id,
        heartbeat_at=now,
        started_at=Coalesce(F("started_at"), now),
        finished_at=None,
        error="",
    )
    if not won:
        return None
    publish_scan_on_commit(scan_id)
    return Claim(scan_id, Page.objects.filter(scan_id=scan_id, status__in=UNFINISHED_PAGES).count())


def claim_next_scan(*, worker_id: str) -> Claim | None:
    """Atomically take the next queued scan (highest priority, then oldest) for `worker_id`."""
    order = ("-priority", "created_at", "id")
    if connection.features.has_select_for_update_skip_locked:
        with transaction.atomic():
            scan_id = (
                Scan.objects.select_for_update(skip_locked=True)
                .filter(status=Scan.Status.QUEUED)
                .order_by(*order)
                .values_list("pk", flat=True)
                .first()
            )
            return None if scan_id is None else _claim(scan_id, worker_id, only_if_queued=False)
    # SQLite: the conditional update's row count decides who got it.
    for scan_id in Scan.objects.filter(status=Scan.Status.QUEUED).order_by(*order).values_list("pk", flat=True)[:20]:
        claimed = claim_scan(scan_id=scan_id, worker_id=worker_id)
        if claimed is not None:
            return claimed
    return None


def claim_scan(*, scan_id: int, worker_id: str) -> Claim | None:
    """Atomically take one given scan if it is queued (e.g. the `ocr` command's own scans)."""
    with transaction.atomic():
        return _claim(scan_id, worker_id, only_if_queued=True)


def heartbeat(*, scan_id: int, worker_id: str) -> bool:
    """Refresh the claim; False when the scan is no longer ours (cancelled, deleted, reclaimed)."""
    return bool(
        Scan.objects.filter(pk=scan_id, status=Scan.Status.PROCESSING, worker_id=worker_id).update(
            heartbeat_at=timezone.now()
        )
    )


def recover_stale_claims(*, stale_after: timedelta) -> list[int]:
    """Requeue processing scans whose worker stopped sending heartbeats (it died, e.g. SIGKILL).

    Their `running` pages go back to `pending`: a page's result is committed with its `done`/`failed`
    status in one transaction, so a running page never holds a finished result."""
    cutoff = timezone.now() - stale_after
    recovered = []
    stale = Scan.objects.filter(status=Scan.Status.PROCESSING).filter(
        Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True)
    )
    for scan_id, worker_id in stale.values_list("pk", "worker_id"):
        with transaction.atomic():
            won = Scan.objects.filter(
                Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True),
                pk=scan_id, status=Scan.Status.PROCESSING, worker_id=worker_id,
            ).update(status=Scan.Status.QUEUED, worker_id="", heartbeat_at=None)
            if won:
                Page.objects.filter(scan_id=scan_id, status=Page.Status.RUNNING).update(
                    status=Page.Status.PENDING, worker_id="", started_at=None
                )
                recovered.append(scan_id)
                publish_scan_on_commit(scan_id)
        if won:
            logger.warning("Requeued scan %s: worker %s stopped sending heartbeats", scan_id, worker_id or "?")
    return recovered


def release_scan(*, scan_id: int, worker_id: str, requeue: bool) -> None:
    """Give a scan back after this worker stops working on it: its running pages become pending;
    with `requeue` (shutdown) a still-processing scan goes back to the queue for another worker."""
    with transaction.atomic():
        Page.objects.filter(scan_id=scan_id, status=Page.Status.RUNNING, worker_id=worker_id).update(
            status=Page.Status.PENDING, worker_id="", started_at=None
        )
        if requeue:
            changed = Scan.objects.filter(pk=scan_id, status=Scan.Status.PROCESSING, worker_id=worker_id).update(
                status=Scan.Status.QUEUED, worker_id="", heartbeat_at=None
            )
            if changed:
                publish_scan_on_commit(scan_id)


# --- page results (used by the runner) -------------------------------------------------------


def mark_page_running(*, scan_id: int, number: int, worker_id: str, attempts: int | None = None) -> Page | None:
    """Claim one page of a scan this worker holds; None when it is not ours to process."""
    changes: dict = {"status": Page.Status.RUNNING, "worker_id": worker_id, "started_at": timezone.now()}
    if attempts is not None:
        changes["attempts"] = attempts
    with transaction.atomic():
        changed = Page.objects.filter(
            Q(status=Page.Status.PENDING) | Q(status=Page.Status.RUNNING, worker_id__in=("", worker_id)),
            scan_id=scan_id,
            number=number,
            scan__status=Scan.Status.PROCESSING,
            scan__worker_id=worker_id,
        ).update(**changes)
        return Page.objects.only(*PAGE_STATE_FIELDS).get(scan_id=scan_id, number=number) if changed else None


def record_attempt(*, scan_id: int, number: int, worker_id: str, attempt: int) -> None:
    Page.objects.filter(scan_id=scan_id, number=number, status=Page.Status.RUNNING, worker_id=worker_id).update(
        attempts=attempt
    )


@dataclass(frozen=True)
class PageCommit:
    page: Page | None  # None when the page was no longer ours (the result was discarded)
    scan_status: str | None  # the scan's status as seen in the same transaction (None: deleted)


def commit_page_result(*, scan_id: int, number: int, worker_id: str, result: PageResult) -> PageCommit:
    """Store a page's outcome and add its tokens to the scan's totals, in one transaction. The page must
    be running for this worker; otherwise nothing is written (`PageCommit.page` is None)."""
    fields = dict(
        status=result.status, text=result.text, fallback=result.fallback, attempts=result.attempts,
        error=result.error, input_tokens=result.input_tokens, output_tokens=result.output_tokens,
        latency_ms=result.latency_ms, finish_reason=result.finish_reason[:30], metadata=result.metadata,
        warnings=list(result.warnings), layout=result.layout, finished_at=timezone.now(),
    )
    with transaction.atomic():
        changed = Page.objects.filter(
            scan_id=scan_id, number=number, status=Page.Status.RUNNING, worker_id=worker_id
        ).update(**fields)
        if changed:
            Scan.objects.filter(pk=scan_id).update(
                input_tokens=F("input_tokens") + result.input_tokens,
                output_tokens=F("output_tokens") + result.output_tokens,
                heartbeat_at=Coalesce(F("heartbeat_at"), fields["finished_at"]),
            )
        scan_status = Scan.objects.filter(pk=scan_id).values_list("status", flat=True).first()
    # The row as just written (no need to read it back).
    page = Page(scan_id=scan_id, number=number, worker_id=worker_id, **fields) if changed else None
    return PageCommit(page, scan_status)


def finish_scan(*, scan_id: int, worker_id: str, error: str = "", failed: bool = False) -> Scan | None:
    """Close a processing scan this worker holds: `failed` with `error`, else `done` or
    `done_with_errors` from its pages. Returns the scan, or None when it was not ours any more."""
    now = timezone.now()
    with transaction.atomic():
        ours = Scan.objects.filter(pk=scan_id, status=Scan.Status.PROCESSING, worker_id=worker_id)
        Page.objects.filter(scan_id=scan_id, status=Page.Status.RUNNING, worker_id=worker_id).update(
            status=Page.Status.PENDING, worker_id="", started_at=None
        )
        if failed:
            status = Scan.Status.FAILED
        else:
            pages = Page.objects.filter(scan_id=scan_id)
            left = pages.filter(status__in=UNFINISHED_PAGES).count()
            if left:  # should not happen while the claim is ours; never leave the scan looping
                status, error = Scan.Status.FAILED, f"{left} page(s) were not processed; retry the scan."
            elif pages.filter(status=Page.Status.FAILED).exists():
                status = Scan.Status.DONE_WITH_ERRORS
            else:
                status = Scan.Status.DONE
        if not ours.update(status=status, error=error, finished_at=now, heartbeat_at=None):
            return None
        scan = Scan.objects.get(pk=scan_id)
        send_scan_finished_on_commit(scan_id=scan_id, status=status)
    return scan


def set_scan_engine(*, scan_id: int, engine: str, model: str) -> None:
    Scan.objects.filter(pk=scan_id).update(engine=engine[:20], model=model[:200])
