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

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction
from django.db.models import Count, Q
from django.urls import NoReverseMatch, reverse
from django.utils import timezone

from scans.access import visible_scans
from scans.models import Page, Scan

logger = logging.getLogger(__name__)

PREVIEW_CHARS = 300
RATE_WINDOW_S = 60.0  # pages/s is measured over the pages finished in this trailing window
SEND_TIMEOUT_S = 5.0
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


async def ascan_totals(scan: Scan, *, now: datetime | None = None) -> Totals:
    now = now or timezone.now()
    start = _window_start(scan, now)
    counts = await Page.objects.filter(scan_id=scan.pk).aaggregate(**_counts_query_kwargs(start))
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


def _page_fields() -> tuple[str, ...]:
    return ("id", "scan_id", "number", "status", "attempts", "latency_ms", "text", "error", "fallback")


def build_scan_snapshot(scan: Scan) -> ScanSnapshotEvent:
    pages = Page.objects.filter(scan_id=scan.pk).only(*_page_fields()).order_by("number")
    return ScanSnapshotEvent(
        type="scan.snapshot",
        scan=scan_state(scan),
        pages=[page_state(p) for p in pages],
        totals=scan_totals(scan),
    )


async def abuild_scan_snapshot(scan: Scan) -> ScanSnapshotEvent:
    pages = Page.objects.filter(scan_id=scan.pk).only(*_page_fields()).order_by("number")
    return ScanSnapshotEvent(
        type="scan.snapshot",
        scan=scan_state(scan),
        pages=[page_state(p) async for p in pages],
        totals=await ascan_totals(scan),
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


async def _owner_name(scan: Scan) -> str:
    from django.contrib.auth import get_user_model

    User = get_user_model()
    user = await User.objects.filter(pk=scan.owner_id).only(User.USERNAME_FIELD).afirst()
    return user.get_username() if user else ""


def _progress_messages(scan: Scan, totals: Totals, owner_name: str) -> list[Message]:
    return [
        ([scan_group(scan.pk)], ScanProgressEvent(type="scan.progress", scan_id=scan.pk, totals=totals)),
        (_list_groups(scan), ScanListItemEvent(type="scans.list_item", scan=list_item(scan, totals, owner_name))),
    ]


async def apublish_page(page: Page) -> None:
    """A page changed (committed): its new state, then the scan's totals, to everyone watching."""
    read_at = time.time()
    try:
        scan = await Scan.objects.aget(pk=page.scan_id)
        totals = await ascan_totals(scan)
        messages: list[Message] = [
            ([scan_group(scan.pk)], PageUpdateEvent(type="page.update", scan_id=scan.pk, page=page_state(page))),
            *_progress_messages(scan, totals, await _owner_name(scan)),
        ]
        await _send(messages, read_at)
    except Exception:
        logger.warning("Could not publish the progress of page %s of scan %s", page.number, page.scan_id, exc_info=True)


async def apublish_scan(scan: Scan) -> None:
    """A scan changed (committed): its status and totals to the scan page and the scan lists."""
    read_at = time.time()
    try:
        scan = await Scan.objects.aget(pk=scan.pk)  # the committed row, not the caller's copy
        totals = await ascan_totals(scan)
        await _send(_progress_messages(scan, totals, await _owner_name(scan)), read_at)
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
        scan = Scan.objects.select_related("owner").get(pk=scan_id)
        messages = _progress_messages(scan, scan_totals(scan), scan.owner.get_username())
        # In a sync view's thread under ASGI, async_to_sync runs this on the server's loop (where
        # the in-memory channel layer lives); in a plain thread it runs on a loop of its own.
        async_to_sync(_send)(messages, read_at)
    except Exception:
        logger.warning("Could not publish the state of scan %s", scan_id, exc_info=True)


_background: set[asyncio.Task] = set()


def publish_scan_on_commit(scan: Scan) -> None:
    """For sync code (views, services): publish the scan once the current transaction commits."""
    scan_id = scan.pk
    try:
        transaction.on_commit(lambda: publish_scan_sync(scan_id))
    except Exception:
        logger.warning("Could not schedule publishing scan %s", scan_id, exc_info=True)
