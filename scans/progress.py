"""Publishing scan progress: which events a change sends, and how often a scan's totals go out.

Everything that tells browsers about scans goes through the publishers here, over the transport in
`ocrsite.live` (after commit, never raising). Payloads are built by `scans.events` from reads in
`scans.selectors`.
"""

from __future__ import annotations

import asyncio
import time

from ocrsite import live
from scans import events, selectors
from scans.models import Page, Scan

PROGRESS_INTERVAL_S = 0.25

_last_progress: dict[int, float] = {}  # scan id -> when its totals last went out (monotonic)
_trailing_progress: dict[int, asyncio.AbstractEventLoop] = {}  # scan id -> loop with a trailing send pending


def _scan_messages(scan_id: int) -> list[live.Message]:
    """The scan's committed status and totals, for its page and for the scan lists."""
    scan = Scan.objects.select_related("owner").filter(pk=scan_id).first()
    if scan is None:  # deleted meanwhile
        return []
    totals = selectors.scan_totals(scan)
    counts = events.PageCounts(total=totals["total"], done=totals["done"], failed=totals["failed"])
    item = events.ScanListItemEvent(
        type="scans.list_item", scan=events.list_item(scan, counts, scan.owner.get_username())
    )
    progress = events.ScanProgressEvent(type="scan.progress", scan_id=scan.pk, totals=totals)
    return [(events.scan_group(scan.pk), progress), *((group, item) for group in events.list_groups(scan))]


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
    live.spawn(apublish_scan(scan_id))


async def apublish_page(page: Page) -> None:
    """A page changed (committed): its new state, then (throttled) the scan's totals. Never raises."""
    update = events.PageUpdateEvent(type="page.update", scan_id=page.scan_id, page=events.page_state(page))
    what = f"the progress of page {page.number} of scan {page.scan_id}"
    # The page's own event needs no read: it goes out at once, not behind the totals' read, which waits
    # for a database thread.
    await live.publish([(events.scan_group(page.scan_id), update)], read_at=time.time(), what=what)
    if _progress_due(page.scan_id):
        await live.publish_built(lambda: _scan_messages(page.scan_id), what=f"the totals of scan {page.scan_id}")


async def apublish_scan(scan_id: int) -> None:
    """A scan changed (committed): its status and totals to the scan page and the scan lists."""
    await live.publish_built(lambda: _scan_messages(scan_id), what=f"the state of scan {scan_id}")


def _page_messages(page_id: int) -> list[live.Message]:
    page = Page.objects.filter(pk=page_id).only(*events.PAGE_STATE_FIELDS).first()
    if page is None:  # deleted meanwhile
        return []
    update = events.PageUpdateEvent(type="page.update", scan_id=page.scan_id, page=events.page_state(page))
    return [(events.scan_group(page.scan_id), update), *_scan_messages(page.scan_id)]


def publish_page_on_commit(*, page_id: int) -> None:
    """For sync code (services): publish a page that a person changed (a correction, a new reading)
    and its scan's totals once the current transaction commits."""
    live.publish_on_commit(lambda: _page_messages(page_id), what=f"the state of page {page_id}")


def publish_scan_on_commit(scan_id: int) -> None:
    """For sync code (views, services): publish the scan once the current transaction commits."""
    live.publish_on_commit(lambda: _scan_messages(scan_id), what=f"the state of scan {scan_id}")
