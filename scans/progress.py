"""Scan progress events: typed payloads, the selectors that build them, and the publishers.

Everything that tells browsers about scans goes through the publishers here (never through the
channel layer directly). Events are sent after the write has committed; channel layers deliver at
most once, so the consumers send a full snapshot on every (re)connect and these events only keep an
open page current. Publishing never raises into the caller: a channel layer outage must not break OCR.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal, TypedDict

from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from django.db import transaction
from django.db.models import Count, Q
from django.urls import NoReverseMatch, reverse
from django.utils import timezone

from scans.access import visible_scans
from scans.models import Page, Scan

logger = logging.getLogger(__name__)

PREVIEW_CHARS = 300
# What a page's live event shows (page_state below).
PAGE_STATE_FIELDS = ("id", "scan_id", "number", "status", "attempts", "latency_ms", "text", "error", "fallback")
RATE_WINDOW_S = 60.0  # pages/s is measured over the pages finished in this trailing window
SEND_TIMEOUT_S = 5.0
PROGRESS_INTERVAL_S = 0.25
ALL_SCANS_GROUP = "all-scans"
EVENT_HANDLER = "live.event"  # consumers implement `live_event`

ScanStatusName = Literal["queued", "processing", "done", "done_with_errors", "failed", "cancelled"]
PageStatusName = Literal["pending", "running", "done", "failed"]


def scan_group(scan_id: int) -> str:
    return f"scan-{scan_id}"


def user_scans_group(user_id: int) -> str:
    return f"user-{user_id}-scans"


# --- payloads --------------------------------------------------------------------------------------


class Totals(TypedDict):
    status: ScanStatusName
    total: int
    done: int
    failed: int
    running: int
    pending: int
    fallback: int
    pages_per_s: float | None
    eta_s: float | None


class PageState(TypedDict):
    number: int
    status: PageStatusName
    attempts: int
    latency_ms: int | None
    preview: str  # the first PREVIEW_CHARS characters of the text; model output, render as text only
    text_length: int
    error: str
    fallback: bool


class ScanState(TypedDict):
    id: int
    filename: str
    status: ScanStatusName
    status_label: str
    error: str
    page_count: int
    model: str
    created_at: str
    started_at: str | None
    finished_at: str | None
    url: str


class ScanListItem(TypedDict):
    id: int
    filename: str
    owner: str
    status: ScanStatusName
    status_label: str
    page_count: int
    done: int
    failed: int
    created_at: str
    url: str


class ScanSnapshotEvent(TypedDict):
    type: Literal["scan.snapshot"]
    scan: ScanState
    pages: list[PageState]
    totals: Totals


class ScanProgressEvent(TypedDict):
    type: Literal["scan.progress"]
    scan_id: int
    totals: Totals


class PageUpdateEvent(TypedDict):
    type: Literal["page.update"]
    scan_id: int
    page: PageState


class ScanListItemEvent(TypedDict):
    type: Literal["scans.list_item"]
    scan: ScanListItem


class ScanListSnapshotEvent(TypedDict):
    type: Literal["scans.snapshot"]
    scans: list[ScanListItem]


SCAN_EVENT_TYPES: tuple[type, ...] = (
    ScanSnapshotEvent,
    ScanProgressEvent,
    PageUpdateEvent,
    ScanListItemEvent,
    ScanListSnapshotEvent,
)


# --- selectors -------------------------------------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass(frozen=True)
class _Counts:
    total: int
    done: int
    failed: int
    running: int
    pending: int
    fallback: int
    recent: int  # pages finished inside the rate window


def _window_start(scan: Scan, now: datetime) -> datetime:
    start = now - timedelta(seconds=RATE_WINDOW_S)
    # Only this run counts: a retried scan's old pages finished before it was started again.
    if scan.started_at is not None and scan.started_at > start:
        start = scan.started_at
    return start


def compute_totals(scan: Scan, counts: _Counts, window_start: datetime, now: datetime) -> Totals:
    """Pages/s over the trailing window of this run; ETA = what is left at that rate."""
    total = max(counts.total, scan.page_count if counts.total == 0 else counts.total)
    remaining = counts.pending + counts.running
    elapsed = (now - window_start).total_seconds()
    rate: float | None = None
    if counts.recent and elapsed > 0:
        rate = counts.recent / elapsed
    eta: float | None
    if scan.is_finished or remaining == 0:
        eta = 0.0 if scan.is_finished else None
    else:
        eta = remaining / rate if rate else None
    return Totals(
        status=scan.status,  # type: ignore[typeddict-item]
        total=total,
        done=counts.done,
        failed=counts.failed,
        running=counts.running,
        pending=counts.pending,
        fallback=counts.fallback,
        pages_per_s=round(rate, 3) if rate is not None else None,
        eta_s=round(eta, 1) if eta is not None else None,
    )


def scan_totals(scan: Scan, *, now: datetime | None = None) -> Totals:
    now = now or timezone.now()
    start = _window_start(scan, now)
    counts = Page.objects.filter(scan_id=scan.pk).aggregate(**_counts_query_kwargs(start))
    return compute_totals(scan, _Counts(**counts), start, now)


def _counts_query_kwargs(window_start: datetime) -> dict:
    return dict(
        total=Count("id"),
        done=Count("id", filter=Q(status=Page.Status.DONE)),
        failed=Count("id", filter=Q(status=Page.Status.FAILED)),
        running=Count("id", filter=Q(status=Page.Status.RUNNING)),
        pending=Count("id", filter=Q(status=Page.Status.PENDING)),
        fallback=Count("id", filter=Q(fallback=True)),
        recent=Count(
            "id",
            filter=Q(status__in=(Page.Status.DONE, Page.Status.FAILED), finished_at__gte=window_start),
        ),
    )


def page_state(page: Page) -> PageState:
    text = page.text or ""
    return PageState(
        number=page.number,
        status=page.status,  # type: ignore[typeddict-item]
        attempts=page.attempts,
        latency_ms=page.latency_ms,
        preview=text[:PREVIEW_CHARS],
        text_length=len(text),
        error=page.error or "",
        fallback=bool(page.fallback),
    )


def scan_state(scan: Scan) -> ScanState:
    return ScanState(
        id=scan.pk,
        filename=scan.original_filename,
        status=scan.status,  # type: ignore[typeddict-item]
        status_label=Scan.Status(scan.status).label,
        error=scan.error or "",
        page_count=scan.page_count,
        model=scan.model or "",
        created_at=scan.created_at.isoformat(),
        started_at=_iso(scan.started_at),
        finished_at=_iso(scan.finished_at),
        url=_detail_url(scan.pk),
    )


def list_item(scan: Scan, totals: Totals, owner_name: str) -> ScanListItem:
    return ScanListItem(
        id=scan.pk,
        filename=scan.original_filename,
        owner=owner_name,
        status=scan.status,  # type: ignore[typeddict-item]
        status_label=Scan.Status(scan.status).label,
        page_count=totals["total"],
        done=totals["done"],
        failed=totals["failed"],
        created_at=scan.created_at.isoformat(),
        url=_detail_url(scan.pk),
    )


def _detail_url(scan_id: int) -> str:
    try:
        return reverse("scans:detail", args=[scan_id])
    except NoReverseMatch:
        return ""


def build_scan_snapshot(scan: Scan) -> ScanSnapshotEvent:
    pages = Page.objects.filter(scan_id=scan.pk).only(*PAGE_STATE_FIELDS).order_by("number")
    return ScanSnapshotEvent(
        type="scan.snapshot",
        scan=scan_state(scan),
        pages=[page_state(p) for p in pages],
        totals=scan_totals(scan),
    )


def build_list_snapshot(user, limit: int = 500) -> ScanListSnapshotEvent:
    """The user's scans (staff: everyone's), newest first, with page counts by status."""
    scans = list(visible_scans(user).select_related("owner").order_by("-created_at", "-id")[:limit])
    by_scan: dict[int, dict[str, int]] = {}
    rows = (
        Page.objects.filter(scan_id__in=[s.pk for s in scans])
        .values("scan_id")
        .annotate(
            total=Count("id"),
            done=Count("id", filter=Q(status=Page.Status.DONE)),
            failed=Count("id", filter=Q(status=Page.Status.FAILED)),
        )
    )
    for row in rows:
        by_scan[row["scan_id"]] = row
    items = []
    for scan in scans:
        row = by_scan.get(scan.pk, {})
        items.append(
            ScanListItem(
                id=scan.pk,
                filename=scan.original_filename,
                owner=scan.owner.get_username(),
                status=scan.status,  # type: ignore[typeddict-item]
                status_label=Scan.Status(scan.status).label,
                page_count=row.get("total") or scan.page_count,
                done=row.get("done", 0),
                failed=row.get("failed", 0),
                created_at=scan.created_at.isoformat(),
                url=_detail_url(scan.pk),
            )
        )
    return ScanListSnapshotEvent(type="scans.snapshot", scans=items)


# --- publishers ------------------------------------------------------------------------------------

Message = tuple[list[str], dict]  # (groups, payload)


def _list_groups(scan: Scan) -> list[str]:
    return [user_scans_group(scan.owner_id), ALL_SCANS_GROUP]


async def _send(messages: list[Message], read_at: float) -> None:
    """`read_at` (epoch seconds, taken before the payloads' data was read) lets a consumer drop events
    older than the snapshot it has just sent."""
    layer = get_channel_layer()
    if layer is None:
        return
    for groups, payload in messages:
        for group in groups:
            await asyncio.wait_for(
                layer.group_send(group, {"type": EVENT_HANDLER, "payload": payload, "read_at": read_at}),
                SEND_TIMEOUT_S,
            )


def _progress_messages(scan: Scan, totals: Totals, owner_name: str) -> list[Message]:
    return [
        ([scan_group(scan.pk)], ScanProgressEvent(type="scan.progress", scan_id=scan.pk, totals=totals)),
        (_list_groups(scan), ScanListItemEvent(type="scans.list_item", scan=list_item(scan, totals, owner_name))),
    ]


def _scan_messages(scan_id: int) -> list[Message]:
    """The scan's committed state as messages; one trip to the database thread for all the reads."""
    scan = Scan.objects.select_related("owner").get(pk=scan_id)
    return _progress_messages(scan, scan_totals(scan), scan.owner.get_username())


def _progress_due(scan_id: int) -> bool:
    """Totals cost an aggregate over the scan's pages, so a scan's totals go out at most every
    PROGRESS_INTERVAL_S from the page path; a trailing send covers the pages in between."""
    now = time.monotonic()
    if now - _last_progress.get(scan_id, 0.0) >= PROGRESS_INTERVAL_S:
        if len(_last_progress) > 10_000:
            _last_progress.clear()
        _last_progress[scan_id] = now
        return True
    loop = asyncio.get_running_loop()
    if _trailing_progress.get(scan_id) is not loop:  # none pending on this loop yet
        _trailing_progress[scan_id] = loop
        loop.call_later(PROGRESS_INTERVAL_S - (now - _last_progress[scan_id]), _send_trailing_progress, scan_id)
    return False


def _send_trailing_progress(scan_id: int) -> None:
    _trailing_progress.pop(scan_id, None)
    _last_progress[scan_id] = time.monotonic()
    task = asyncio.get_running_loop().create_task(apublish_scan(Scan(pk=scan_id)))
    _background.add(task)
    task.add_done_callback(_background.discard)


async def apublish_page(page: Page) -> None:
    """A page changed (committed): its new state, then the scan's totals, to everyone watching."""
    read_at = time.time()
    try:
        update = PageUpdateEvent(type="page.update", scan_id=page.scan_id, page=page_state(page))
        messages: list[Message] = [([scan_group(page.scan_id)], update)]
        if _progress_due(page.scan_id):
            messages += await sync_to_async(_scan_messages)(page.scan_id)
        await _send(messages, read_at)
    except Exception:
        logger.warning("Could not publish the progress of page %s of scan %s", page.number, page.scan_id, exc_info=True)


async def apublish_scan(scan: Scan) -> None:
    """A scan changed (committed): its status and totals to the scan page and the scan lists."""
    read_at = time.time()
    try:
        await _send(await sync_to_async(_scan_messages)(scan.pk), read_at)
    except Exception:
        logger.warning("Could not publish the state of scan %s", scan.pk, exc_info=True)


def publish_scan_sync(scan_id: int) -> None:
    """Build the scan's events from the DB now and send them (sync code; never raises)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is not None:
        # Sync code on an event loop's thread may neither query the DB nor block: schedule instead.
        task = loop.create_task(apublish_scan(Scan(pk=scan_id)))
        _background.add(task)
        task.add_done_callback(_background.discard)
        return
    read_at = time.time()
    try:
        messages = _scan_messages(scan_id)
        # In a sync view's thread under ASGI, async_to_sync runs this on the server's loop (where
        # the in-memory channel layer lives); in a plain thread it runs on a loop of its own.
        async_to_sync(_send)(messages, read_at)
    except Exception:
        logger.warning("Could not publish the state of scan %s", scan_id, exc_info=True)




_background: set[asyncio.Task] = set()
_last_progress: dict[int, float] = {}  # scan id -> when its totals last went out (monotonic)
_trailing_progress: dict[int, asyncio.AbstractEventLoop] = {}  # scan id -> loop with a trailing send pending


def publish_scan_on_commit(scan: Scan) -> None:
    """For sync code (views, services): publish the scan once the current transaction commits."""
    scan_id = scan.pk
    try:
        transaction.on_commit(lambda: publish_scan_sync(scan_id))
    except Exception:
        logger.warning("Could not schedule publishing scan %s", scan_id, exc_info=True)
