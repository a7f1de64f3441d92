"""Page images for the scan page: a thumbnail, the page at a readable size, and a zoom at high resolution.

Each is rendered from the original file once (in a worker thread; rendering takes the process-wide
PDFium lock) and cached under DATA_DIR/thumbs, keyed by the file's hash so a reused id never shows
another file. Sizes are fixed, so a request can never ask for an unbounded rendering: the zoom is at
most ZOOM_LONGEST_SIDE px on its longest side (about 350 dpi for a letter page; 21 megabytes of RGB
pixels while it is encoded).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

from scans.models import Scan
from scans.pipeline.render import render_page_sync

logger = logging.getLogger(__name__)

THUMB_LONGEST_SIDE = 300
VIEW_LONGEST_SIDE = 1400
ZOOM_LONGEST_SIDE = 3000


@dataclass(frozen=True)
class ImageSize:
    longest_side: int  # px
    image_format: str  # "png" | "jpeg" (scans.pipeline.render.encode_page)

    @property
    def content_type(self) -> str:
        return f"image/{self.image_format}"

    @property
    def suffix(self) -> str:
        return "png" if self.image_format == "png" else "jpg"


# PNG keeps a small picture sharp; JPEG keeps a large one small (a 1400 px page is 150-400 kB).
SIZES: dict[str, ImageSize] = {
    "thumb": ImageSize(THUMB_LONGEST_SIDE, "png"),
    "view": ImageSize(VIEW_LONGEST_SIDE, "jpeg"),
    "zoom": ImageSize(ZOOM_LONGEST_SIDE, "jpeg"),
}


def thumbs_dir() -> Path:
    return Path(settings.DATA_DIR) / "thumbs"


def _prefix(scan: Scan) -> str:
    return f"{scan.pk}-{scan.sha256[:16]}-"


def page_image_path(scan: Scan, number: int, size: str) -> Path:
    image = SIZES[size]
    return thumbs_dir() / f"{_prefix(scan)}p{number}-{image.longest_side}.{image.suffix}"


def thumbnail_path(scan: Scan, number: int) -> Path:
    return page_image_path(scan, number, "thumb")


def page_image(scan: Scan, number: int, size: str) -> bytes:
    """Page `number` at `size` (a key of SIZES), from the cache or rendered and cached first (blocking:
    call it off the event loop). Raises FileNotFoundError when the stored file is gone, ValueError
    when the page cannot be rendered."""
    path = page_image_path(scan, number, size)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    image = SIZES[size]
    rendered = render_page_sync(
        Path(scan.file.path), scan.content_type, number, longest_side=image.longest_side, image_format=image.image_format
    )
    try:
        _cache(path, rendered.data)
    except OSError as exc:  # a full disk costs the cache, not the picture
        logger.warning("Page image not cached (%s): %s", path.name, exc.strerror or exc)
    return rendered.data


def delete_cached(*, scan_id: int, sha256: str) -> None:
    """Remove a deleted scan's cached page images."""
    for path in thumbs_dir().glob(f"{scan_id}-{sha256[:16]}-*"):
        path.unlink(missing_ok=True)


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
