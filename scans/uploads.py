"""Accepting a file: judged by its content, stored under a generated name, or rejected leaving nothing."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pypdfium2 as pdfium
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.files.uploadedfile import UploadedFile
from django.db import transaction
from PIL import Image, UnidentifiedImageError
from pypdf import PdfReader

from scans import services
from scans.models import Scan
from scans.pipeline.render import pdfium_lock

MAX_IMAGE_PIXELS = 16_000 * 16_000  # larger is treated as a decompression bomb
CHUNK = 1024 * 1024


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
SUPPORTED = "PDF, PNG, JPEG, TIFF or WebP"


@dataclass(frozen=True)
class Inspection:
    kind: FileKind
    page_count: int
    has_text_layer: bool


def sniff(head: bytes) -> FileKind | None:
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if head.startswith(b"\xff\xd8\xff"):
        return JPEG
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return TIFF
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return WEBP
    if b"%PDF-" in head[:1024]:  # the header may follow a few bytes of junk
        return PDF
    return None


def _inspect_pdf(path: Path) -> Inspection:
    with pdfium_lock():
        try:
            document = pdfium.PdfDocument(str(path))
        except pdfium.PdfiumError:
            raise UploadRejected(_why_pdf_unreadable(path)) from None
        try:
            count = len(document)
            text = count > 0 and _pdf_has_text(document)
        finally:
            document.close()
    if count == 0:
        raise UploadRejected("This PDF has no pages.")
    return Inspection(PDF, count, text)


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


def _pdf_has_text(document: pdfium.PdfDocument, pages_to_check: int = 3) -> bool:
    for index in range(min(len(document), pages_to_check)):
        page = document[index]
        textpage = page.get_textpage()
        try:
            if textpage.count_chars() > 0:
                return True
        finally:
            textpage.close()
            page.close()
    return False


def _inspect_image(path: Path, kind: FileKind) -> Inspection:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise UploadRejected(
                        f"This image is {width} × {height} pixels, larger than the {MAX_IMAGE_PIXELS // 1_000_000} "
                        "megapixel limit (it could be a decompression bomb)."
                    )
                frames = getattr(image, "n_frames", 1)
                image.verify()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UploadRejected("This image is too large to decode safely (possible decompression bomb).") from None
    except UploadRejected:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise UploadRejected("This image is damaged and cannot be read.") from None
    return Inspection(kind, frames, False)


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
    inspection = _inspect_pdf(path) if kind is PDF else _inspect_image(path, kind)
    if inspection.page_count > settings.OCRSITE_MAX_PAGES:
        raise UploadRejected(
            f"This file has {inspection.page_count} pages; the limit is {settings.OCRSITE_MAX_PAGES}."
        )
    return inspection


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


def create_scan_from_path(*, owner: AbstractBaseUser, path: Path, options: dict | None = None) -> Scan:
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise UploadRejected(f"Cannot read {path}: {exc.strerror}.") from None
    with handle:
        spooled, sha256, size = _spool(iter(lambda: handle.read(CHUNK), b""))
    return _store(owner=owner, spooled=spooled, sha256=sha256, size=size, original_name=path.name, options=options)
