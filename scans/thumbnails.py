"""Per-page assets for the live scan page: a PNG thumbnail and the page's text.

Thumbnails are rendered once (in a worker thread; rendering takes the process-wide PDFium lock) and
cached under DATA_DIR/thumbs, keyed by the file's hash so a reused id never shows another file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from pathlib import Path

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse

from scans.access import visible_scans
from scans.models import Page, Scan
from scans.pipeline.render import render_page_sync

logger = logging.getLogger(__name__)

THUMB_LONGEST_SIDE = 300
CACHE_CONTROL = "private, max-age=86400"


def thumbs_dir() -> Path:
    return Path(settings.DATA_DIR) / "thumbs"


def thumbnail_path(scan: Scan, number: int) -> Path:
    return thumbs_dir() / f"{scan.pk}-{scan.sha256[:16]}-p{number}-{THUMB_LONGEST_SIDE}.png"


def thumbnail_png(scan: Scan, number: int) -> bytes:
    """The cached thumbnail, rendering and caching it first if needed (blocking: call off the loop)."""
    path = thumbnail_path(scan, number)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    image = render_page_sync(
        Path(scan.file.path), scan.content_type, number, longest_side=THUMB_LONGEST_SIDE, image_format="png"
    )
    try:
        _cache(path, image.data)
    except OSError as exc:  # a full disk costs the cache, not the thumbnail
        logger.warning("Thumbnail not cached (%s): %s", path.name, exc.strerror or exc)
    return image.data


def _cache(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write-then-rename: a concurrent request never reads half a file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


async def _visible_scan(request: HttpRequest, scan_id: int) -> Scan:
    user = await request.auser()
    scan = await visible_scans(user).filter(pk=scan_id).afirst()
    if scan is None:
        raise Http404("No such scan.")
    return scan


@login_required
async def page_thumbnail(request: HttpRequest, scan_id: int, number: int) -> HttpResponse:
    scan = await _visible_scan(request, scan_id)
    if not 1 <= number <= scan.page_count:
        raise Http404("No such page.")
    try:
        data = await asyncio.to_thread(thumbnail_png, scan, number)
    except (FileNotFoundError, ValueError) as exc:
        raise Http404("The page could not be rendered.") from exc
    response = HttpResponse(data, content_type="image/png")
    response["Cache-Control"] = CACHE_CONTROL
    return response


@login_required
async def page_text(request: HttpRequest, scan_id: int, number: int) -> HttpResponse:
    """The page's current text as plain text (live.js fetches it when a page finishes)."""
    scan = await _visible_scan(request, scan_id)
    page = await Page.objects.filter(scan=scan, number=number).only("text").afirst()
    if page is None:
        raise Http404("No such page.")
    response = HttpResponse(page.text, content_type="text/plain; charset=utf-8")
    response["Cache-Control"] = "no-store"
    return response
