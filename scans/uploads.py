"""Accepting a file: judged by its content, stored under a generated name, or rejected leaving nothing."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pypdfium2 as pdfium
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.files.uploadedfile import UploadedFile
from django.db import transaction
from pypdf import PdfReader

from scans import imaging, services
from scans.models import Scan
from scans.pipeline.render import PdfPages
from scans.pipeline.types import ScanWarning

logger = logging.getLogger(__name__)

CHUNK = 1024 * 1024
# Upload validation decodes an image's first readable page with the function rendering uses, at this
# size: small, so a JPEG decodes at 1/8 scale.
CHECK_LONGEST_SIDE = 256


class UploadRejected(Exception):
    """A file we will not process, with a message meant for the person who sent it."""


@dataclass(frozen=True)
class FileKind:
    content_type: str
    extension: str


PDF = FileKind("application/pdf", ".pdf")
PNG = FileKind("image/png", ".png")
JPEG = FileKind("image/jpeg", ".jpg")
TIFF = FileKind("image/tiff", ".tif")
WEBP = FileKind("image/webp", ".webp")
GIF = FileKind("image/gif", ".gif")
SUPPORTED = "PDF, PNG, JPEG, TIFF, WebP or GIF"
_IMAGE_KINDS = {imaging.PNG: PNG, imaging.JPEG: JPEG, imaging.TIFF: TIFF, imaging.WEBP: WEBP, imaging.GIF: GIF}


@dataclass(frozen=True)
class Inspection:
    kind: FileKind
    page_count: int
    has_text_layer: bool
    warnings: list[ScanWarning] = field(default_factory=list)  # about the whole file, kept on the scan


def sniff(head: bytes) -> FileKind | None:
    image = imaging.sniff_image(head)
    if image is not None:
        return _IMAGE_KINDS[image]
    if b"%PDF-" in head[:1024]:  # the header may follow a few bytes of junk
        return PDF
    return None


def _too_many_pages() -> UploadRejected:
    limit = settings.OCRSITE_MAX_PAGES
    return UploadRejected(f"This file has more than {limit} pages; the limit is {limit} (OCRSITE_MAX_PAGES).")


def _inspect_pdf(path: Path) -> Inspection:
    """Pages are the ones that load (render.PdfPages): the count shown is the count rendered."""
    try:
        pages = PdfPages(path)
    except pdfium.PdfiumError:
        raise UploadRejected(_why_pdf_unreadable(path)) from None
    with pages:
        count = pages.page_count(limit=settings.OCRSITE_MAX_PAGES)
        if count > settings.OCRSITE_MAX_PAGES:
            raise _too_many_pages()
        if count == 0:
            if pages.claimed:
                raise UploadRejected(f"None of this PDF's {pages.claimed} pages can be loaded; it is damaged.")
            raise UploadRejected("This PDF has no pages.")
        return Inspection(PDF, count, pages.has_text(), list(pages.warnings))


def _why_pdf_unreadable(path: Path) -> str:
    """PDFium's error code is process-global and can be stale, so ask pypdf what is wrong instead."""
    try:
        reader = PdfReader(path)
        if reader.is_encrypted:
            return "This PDF is password-protected; remove the password and upload it again."
        if len(reader.pages) == 0:
            return "This PDF has no pages."
    except Exception:  # pypdf raises many types for damaged files
        pass
    return "This PDF is damaged and cannot be read."


def _inspect_image(path: Path, kind: FileKind) -> Inspection:
    """Accepted when at least one page decodes, with the decoder rendering uses: what is accepted here
    renders later (a page that does not fails alone)."""
    try:
        with imaging.ImageDocument(path) as document:
            count = document.page_count(limit=settings.OCRSITE_MAX_PAGES)
            if count > settings.OCRSITE_MAX_PAGES:
                raise _too_many_pages()
            first_error: imaging.UnreadableImage | None = None
            for number in range(1, count + 1):
                try:
                    document.decode(number, longest_side=CHECK_LONGEST_SIDE, probe=True)
                    return Inspection(kind, count, False, list(document.warnings))
                except imaging.UnreadableImage as exc:
                    first_error = first_error or exc
            raise UploadRejected(str(first_error))
    except imaging.UnreadableImage as exc:
        raise UploadRejected(str(exc)) from None


def inspect_file(path: Path) -> Inspection:
    """Validate a stored-to-disk file by its content; raises UploadRejected with a clear message."""
    size = path.stat().st_size
    if size == 0:
        raise UploadRejected("The file is empty.")
    limit_mb = settings.OCRSITE_MAX_UPLOAD_MB
    if size > limit_mb * 1024 * 1024:
        raise UploadRejected(f"The file is {size / 1024 / 1024:.1f} MB; the limit is {limit_mb} MB.")
    with path.open("rb") as handle:
        kind = sniff(handle.read(1024))
    if kind is None:
        raise UploadRejected(f"This is not a supported file type (judged by its content); upload a {SUPPORTED}.")
    return _inspect_pdf(path) if kind is PDF else _inspect_image(path, kind)


def clean_filename(name: str) -> str:
    """The client's name as display text only: no directories, no control characters."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = "".join(ch for ch in base if ch.isprintable()).strip()
    return cleaned[:255] or "upload"


def _spool(chunks: Iterable[bytes]) -> tuple[Path, str, int]:
    """Write chunks to a temporary file in the data directory, hashing on the way and stopping early
    when the size limit is passed."""
    limit = settings.OCRSITE_MAX_UPLOAD_MB * 1024 * 1024
    digest = hashlib.sha256()
    size = 0
    try:
        fd, name = tempfile.mkstemp(dir=settings.FILE_UPLOAD_TEMP_DIR, prefix="upload-")
    except OSError as exc:
        raise _not_stored(exc) from exc
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise UploadRejected(
                        f"The file is larger than the {settings.OCRSITE_MAX_UPLOAD_MB} MB limit."
                    )
                digest.update(chunk)
                handle.write(chunk)
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise _not_stored(exc) from exc
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path, digest.hexdigest(), size


def _not_stored(error: OSError) -> UploadRejected:
    """A write (or read) that failed while storing a file, as a message for the person uploading."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return UploadRejected("The server's disk is full, so the file was not stored. Try again later.")
    return UploadRejected(f"The server could not store the file ({error.strerror or error}); nothing was kept.")


def _store(
    *, owner: AbstractBaseUser, spooled: Path, sha256: str, size: int, original_name: str, options: dict | None, priority: int = 0
) -> Scan:
    try:
        inspection = inspect_file(spooled)
        relative = f"scans/{uuid.uuid4().hex}{inspection.kind.extension}"
        destination = Path(settings.MEDIA_ROOT) / relative
        try:
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(spooled, destination)  # a copy when media is on another filesystem
        except OSError as exc:
            destination.unlink(missing_ok=True)
            raise _not_stored(exc) from exc
    finally:
        spooled.unlink(missing_ok=True)
    try:
        with transaction.atomic():
            scan = Scan.objects.create(
                owner=owner,
                file=relative,
                original_filename=clean_filename(original_name),
                content_type=inspection.kind.content_type,
                size=size,
                sha256=sha256,
                page_count=inspection.page_count,
                has_text_layer=inspection.has_text_layer,
                warnings=inspection.warnings,
                options=options or {},
                priority=priority,
            )
            services.create_pages(scan)
            services.announce_queued(scan_id=scan.pk)
    except BaseException:
        destination.unlink(missing_ok=True)
        raise
    return scan


def create_scan_from_upload(
    *, owner: AbstractBaseUser, uploaded_file: UploadedFile, options: dict | None = None, priority: int = 0
) -> Scan:
    """A queued scan of the uploaded file with `options` (Scan.options) and `priority` (higher first);
    raises UploadRejected, leaving no row and no file."""
    spooled, sha256, size = _spool(uploaded_file.chunks(CHUNK))
    return _store(
        owner=owner, spooled=spooled, sha256=sha256, size=size, original_name=uploaded_file.name or "",
        options=options, priority=priority,
    )


def create_scan_from_path(*, owner: AbstractBaseUser, path: Path, options: dict | None = None, priority: int = 0) -> Scan:
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise UploadRejected(f"Cannot read {path}: {exc.strerror}.") from None
    with handle:
        spooled, sha256, size = _spool(iter(lambda: handle.read(CHUNK), b""))
    return _store(
        owner=owner, spooled=spooled, sha256=sha256, size=size, original_name=path.name, options=options, priority=priority
    )


@dataclass(frozen=True)
class Judged:
    """One file of a multi-file upload: the scan it became, or why not (`error`, meant for a person)."""

    name: str
    scan: Scan | None = None
    error: str = ""


def judge(name: str, create: Callable[[], Scan]) -> Judged:
    """Run `create` (storing one file) so that its failure is its own: a rejection keeps its message; any
    other exception is logged with its traceback and becomes this file's error. Either way nothing of the
    file is kept (no row, no stored file) and the caller goes on with the next one."""
    try:
        return Judged(name, scan=create())
    except UploadRejected as exc:
        return Judged(name, error=str(exc))
    except Exception:
        logger.exception("Storing the uploaded file %r failed", name)
        return Judged(name, error="It could not be stored because of an internal error (logged); nothing was kept.")
