"""Scan progress events: the typed payloads, their groups, and the pure functions that build them from
rows and counts. Reads live in `scans.selectors`, sending in `scans.progress`.

Payload text is model output: browsers render it as text, never as HTML.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal, TypedDict

from django.urls import NoReverseMatch, reverse

from scans.models import CURRENT_TEXT_FIELDS, Page, Scan

PREVIEW_CHARS = 300
# What a page's live event shows (page_state below).
PAGE_STATE_FIELDS = (
    "id", "scan_id", "number", "attempts", "latency_ms", "error", "fallback", "warnings", *CURRENT_TEXT_FIELDS,
)
RATE_WINDOW_S = 60.0  # pages/s is measured over the pages finished in this trailing window
ALL_SCANS_GROUP = "all-scans"

ScanStatusName = Literal["queued", "processing", "done", "done_with_errors", "failed", "cancelled"]
PageStatusName = Literal["pending", "running", "done", "failed"]


def scan_group(scan_id: int) -> str:
    return f"scan-{scan_id}"


def user_scans_group(user_id: int) -> str:
    return f"user-{user_id}-scans"


def list_groups(scan: Scan) -> list[str]:
    return [user_scans_group(scan.owner_id), ALL_SCANS_GROUP]


@dataclass(frozen=True)
class PageCounts:
    """A scan's pages by status (`scans.selectors.page_counts` is the one place that counts them)."""

    total: int = 0
    done: int = 0
    failed: int = 0
    running: int = 0
    pending: int = 0
    fallback: int = 0
    warned: int = 0  # done pages with at least one warning
    recent: int = 0  # pages finished inside the rate window (only when asked for)

    @property
    def unfinished(self) -> int:
        return self.pending + self.running


# --- payloads --------------------------------------------------------------------------------------


class PageWarningData(TypedDict):
    code: str
    message: str


class Totals(TypedDict):
    status: ScanStatusName
    total: int
    done: int
    failed: int
    running: int
    pending: int
    fallback: int
    warned: int
    pages_per_s: float | None
    eta_s: float | None
    waiting_for_server: bool  # a runner waits for the model server to start (e.g. after its idle stop)


class PageState(TypedDict):
    number: int
    status: PageStatusName
    attempts: int
    latency_ms: int | None
    # The first PREVIEW_CHARS characters of the page's text (Page.current_text: a correction, else the
    # engine's); model output, render as text only.
    preview: str
    text_length: int
    error: str
    fallback: bool
    warnings: list[PageWarningData]
    corrected: bool  # a person corrected the text
    rereading: bool  # being read again; the text is the previous result until the new one arrives
    rev: str  # changes whenever what the page view shows of the page changes (a digest)


class ScanState(TypedDict):
    id: int
    filename: str
    status: ScanStatusName
    status_label: str
    error: str
    page_count: int
    model: str
    warnings: list[PageWarningData]
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
    waiting_for_server: bool  # as in Totals


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


# --- builders --------------------------------------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def rate_window_start(scan: Scan, now: datetime) -> datetime:
    start = now - timedelta(seconds=RATE_WINDOW_S)
    # Only this run counts: a retried scan's old pages finished before it was started again.
    if scan.started_at is not None and scan.started_at > start:
        start = scan.started_at
    return start


def totals(scan: Scan, counts: PageCounts, window_start: datetime, now: datetime) -> Totals:
    """Pages/s over the trailing window of this run (`counts.recent` pages since `window_start`);
    ETA = what is left at that rate."""
    elapsed = (now - window_start).total_seconds()
    rate = counts.recent / elapsed if counts.recent and elapsed > 0 else None
    eta: float | None
    if scan.is_finished:
        eta = 0.0
    elif counts.unfinished == 0:
        eta = None
    else:
        eta = counts.unfinished / rate if rate else None
    return Totals(
        status=scan.status,  # type: ignore[typeddict-item]
        total=counts.total or scan.page_count,
        done=counts.done,
        failed=counts.failed,
        running=counts.running,
        pending=counts.pending,
        fallback=counts.fallback,
        warned=counts.warned,
        pages_per_s=round(rate, 3) if rate is not None else None,
        eta_s=round(eta, 1) if eta is not None else None,
        waiting_for_server=scan.waiting_for_server and not scan.is_finished,
    )


def page_state(page: Page) -> PageState:
    text = page.current_text
    state = PageState(
        number=page.number,
        status=page.status,  # type: ignore[typeddict-item]
        attempts=page.attempts,
        latency_ms=page.latency_ms,
        preview=text[:PREVIEW_CHARS],
        text_length=len(text),
        error=page.error or "",
        fallback=bool(page.fallback),
        warnings=list(page.warnings or []),
        corrected=page.is_corrected,
        rereading=page.is_rereading,
        rev="",
    )
    shown = [state, text, _iso(page.corrected_at), page.has_result]
    state["rev"] = hashlib.blake2b(json.dumps(shown, sort_keys=True).encode(), digest_size=8).hexdigest()
    return state


def scan_state(scan: Scan) -> ScanState:
    return ScanState(
        id=scan.pk,
        filename=scan.original_filename,
        status=scan.status,  # type: ignore[typeddict-item]
        status_label=Scan.Status(scan.status).label,
        error=scan.error or "",
        page_count=scan.page_count,
        model=scan.model or "",
        warnings=list(scan.warnings or []),
        created_at=scan.created_at.isoformat(),
        started_at=_iso(scan.started_at),
        finished_at=_iso(scan.finished_at),
        url=detail_url(scan.pk),
    )


def list_item(scan: Scan, counts: PageCounts, owner_name: str) -> ScanListItem:
    return ScanListItem(
        id=scan.pk,
        filename=scan.original_filename,
        owner=owner_name,
        status=scan.status,  # type: ignore[typeddict-item]
        status_label=Scan.Status(scan.status).label,
        page_count=counts.total or scan.page_count,
        done=counts.done,
        failed=counts.failed,
        created_at=scan.created_at.isoformat(),
        url=detail_url(scan.pk),
        waiting_for_server=scan.waiting_for_server and not scan.is_finished,
    )


def detail_url(scan_id: int) -> str:
    try:
        return reverse("scans:detail", args=[scan_id])
    except NoReverseMatch:
        return ""
