"""Reads on scans and pages for views, consumers, exports and commands.

`page_counts` is the one place that counts a scan's pages by status; everything that shows counts
(the scan list and page, live events, exports, the `ocr` command) goes through it.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from django.db.models import Count, Q, QuerySet
from django.utils import timezone

from scans import events
from scans.access import visible_scans
from scans.events import PageCounts
from scans.models import Page, Scan
from scans.pipeline.engines import reads_with_configured_server
from scans.pipeline.options import ScanOptions

S = Page.Status
_COUNTS = dict(
    total=Count("id"),
    done=Count("id", filter=Q(status=S.DONE)),
    failed=Count("id", filter=Q(status=S.FAILED)),
    running=Count("id", filter=Q(status=S.RUNNING)),
    pending=Count("id", filter=Q(status=S.PENDING)),
    fallback=Count("id", filter=Q(fallback=True)),
    warned=Count("id", filter=Q(status=S.DONE) & ~Q(warnings=[])),
)


def page_counts(scan_ids: Iterable[int], *, finished_since: datetime | None = None) -> dict[int, PageCounts]:
    """Each scan's pages by status, in one query; with `finished_since`, also how many finished since
    then (`recent`). Scans without pages are absent from the answer."""
    aggregates = dict(_COUNTS)
    if finished_since is not None:
        aggregates["recent"] = Count("id", filter=Q(status__in=(S.DONE, S.FAILED), finished_at__gte=finished_since))
    rows = Page.objects.filter(scan_id__in=list(scan_ids)).values("scan_id").annotate(**aggregates).order_by()
    return {row.pop("scan_id"): PageCounts(**row) for row in rows}


def scan_counts(scan: Scan) -> PageCounts:
    return page_counts([scan.pk]).get(scan.pk, PageCounts())


def scan_totals(scan: Scan, *, now: datetime | None = None) -> events.Totals:
    """Counts, pages/s and ETA of one scan."""
    now = now or timezone.now()
    start = events.rate_window_start(scan, now)
    counts = page_counts([scan.pk], finished_since=start).get(scan.pk, PageCounts())
    return events.totals(scan, counts, start, now)


def scan_statuses(scan_ids: Iterable[int]) -> dict[int, str]:
    """{scan id: status} of the scans that exist."""
    return dict(Scan.objects.filter(pk__in=list(scan_ids)).values_list("pk", "status"))


def pages_waiting_for_model_server(*, mode: str) -> int:
    """Pages (pending or being read) of active scans that the configured model server reads: what keeps
    an idle Local server up, and what starts an idle-stopped one (vllm_control.demand)."""
    active = Scan.objects.filter(status__in=Scan.ACTIVE).values_list("pk", "options")
    ids = [pk for pk, options in active if reads_with_configured_server(ScanOptions.from_scan(options or {}), mode=mode)]
    if not ids:
        return 0
    return Page.objects.filter(scan_id__in=ids, status__in=(S.PENDING, S.RUNNING)).count()


def ordered_pages(scan: Scan) -> QuerySet[Page]:
    return Page.objects.filter(scan_id=scan.pk).order_by("number")


def scans_with_counts(user, limit: int = 500) -> list[tuple[Scan, PageCounts]]:
    """The scans the user may see (`scans.access`), newest first, each with its page counts."""
    scans = list(visible_scans(user).select_related("owner").order_by("-created_at", "-id")[:limit])
    counts = page_counts(scan.pk for scan in scans)
    return [(scan, counts.get(scan.pk, PageCounts())) for scan in scans]


def scan_snapshot(scan: Scan) -> events.ScanSnapshotEvent:
    pages = ordered_pages(scan).only(*events.PAGE_STATE_FIELDS)
    return events.ScanSnapshotEvent(
        type="scan.snapshot",
        scan=events.scan_state(scan),
        pages=[events.page_state(page) for page in pages],
        totals=scan_totals(scan),
    )


def visible_scan_snapshot(user, scan_id: int) -> events.ScanSnapshotEvent | None:
    """The scan's snapshot, or None when `user` may not see it (or it is gone)."""
    scan = visible_scans(user).filter(pk=scan_id).first()
    return scan_snapshot(scan) if scan is not None else None


def list_snapshot(user) -> events.ScanListSnapshotEvent:
    items = [events.list_item(scan, counts, scan.owner.get_username()) for scan, counts in scans_with_counts(user)]
    return events.ScanListSnapshotEvent(type="scans.snapshot", scans=items)
