"""Page thumbnails for the live scan page.

Thumbnails are rendered once (in a worker thread; rendering takes the process-wide PDFium lock) and
cached under DATA_DIR/thumbs, keyed by the file's hash so a reused id never shows another file.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from django.conf import settings

from scans.models import Scan
from scans.pipeline.render import render_page_sync

logger = logging.getLogger(__name__)

THUMB_LONGEST_SIDE = 300


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
