"""Every kind of bad upload gets a clear message and leaves nothing behind (no row, no file)."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import pytest
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from PIL import Image
from pypdf import PdfWriter

from scans.models import Scan
from scans.uploads import UploadRejected, clean_filename, create_scan_from_path, create_scan_from_upload
from tests.conftest import assert_nothing_stored, stored_files
from tests.fakes.pages import make_image, make_pdf, make_tiff

pytestmark = pytest.mark.django_db


def upload(user, name: str, data: bytes) -> Scan:
    return create_scan_from_upload(owner=user, uploaded_file=SimpleUploadedFile(name, data))


def encrypted_pdf(tmp_path: Path) -> bytes:
    writer = PdfWriter(clone_from=str(make_pdf(tmp_path / "plain.pdf", 2)))
    writer.encrypt("secret", algorithm="RC4-128")
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


def png_bomb() -> bytes:
    """A PNG header claiming 30000 x 30000 pixels: tiny on disk, ~2.7 GB decoded."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = (30000).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        ("empty.pdf", lambda tmp: b"", "empty"),
        ("notes.pdf", lambda tmp: b"just some text, not a PDF at all\n" * 10, "not a supported file type"),
        ("archive.png", lambda tmp: b"PK\x03\x04" + b"\0" * 200, "not a supported file type"),
        ("broken.pdf", lambda tmp: b"%PDF-1.7\n" + b"\x00garbage" * 100, "damaged"),
        ("locked.pdf", encrypted_pdf, "password-protected"),
        ("zero.pdf", lambda tmp: make_pdf(tmp / "zero.pdf", 0).read_bytes(), "no pages"),
        ("truncated.png", lambda tmp: make_image(tmp / "p.png", 1).read_bytes()[:60], "damaged"),
        ("bomb.png", lambda tmp: png_bomb(), r"30000 × 30000 pixels \(900 megapixels\), more than the 280 megapixel limit \(OCRSITE_MAX_IMAGE_PIXELS=280000000\)"),
    ],
)
def test_bad_upload_is_rejected_and_leaves_nothing(user, tmp_path, name, make, message) -> None:
    with pytest.raises(UploadRejected, match=message):
        upload(user, name, make(tmp_path))
    assert_nothing_stored()


def test_over_the_size_limit(user, tmp_path, settings) -> None:
    settings.OCRSITE_MAX_UPLOAD_MB = 1
    data = make_pdf(tmp_path / "big.pdf", 1).read_bytes() + b"%" + b"x" * (1024 * 1024)
    with pytest.raises(UploadRejected, match="1 MB limit"):
        upload(user, "big.pdf", data)
    assert_nothing_stored()


def test_over_the_page_limit(user, tmp_path, settings) -> None:
    settings.OCRSITE_MAX_PAGES = 3
    with pytest.raises(UploadRejected, match=r"more than 3 pages; the limit is 3 \(OCRSITE_MAX_PAGES\)"):
        upload(user, "long.pdf", make_pdf(tmp_path / "long.pdf", 4).read_bytes())
    assert_nothing_stored()


def test_mislabelled_file_is_judged_by_content(user, tmp_path) -> None:
    scan = upload(user, "scan.pdf", make_image(tmp_path / "p.png", 1).read_bytes())
    assert scan.content_type == "image/png"
    assert scan.file.name.endswith(".png")


def test_path_separators_and_odd_characters_never_reach_the_disk(user, tmp_path) -> None:
    scan = upload(user, "../../etc/passwd\x00\r\n.pdf", make_pdf(tmp_path / "a.pdf", 1).read_bytes())
    assert scan.original_filename == "passwd.pdf"
    stored = stored_files(settings.MEDIA_ROOT)
    assert [p.name for p in stored] == [Path(scan.file.name).name]
    assert "passwd" not in scan.file.name
    assert clean_filename("C:\\Users\\me\\scan 1.pdf") == "scan 1.pdf"


def test_good_uploads_have_the_right_page_counts(user, tmp_path) -> None:
    pdf = upload(user, "three.pdf", make_pdf(tmp_path / "three.pdf", 3).read_bytes())
    tiff = create_scan_from_path(owner=user, path=make_tiff(tmp_path / "four.tiff", 4))
    webp = upload(user, "one.webp", make_image(tmp_path / "one.webp", 1, "WEBP").read_bytes())
    jpeg = upload(user, "one.jpg", make_image(tmp_path / "one.jpg", 1, "JPEG").read_bytes())
    assert [(s.content_type, s.page_count) for s in (pdf, tiff, webp, jpeg)] == [
        ("application/pdf", 3), ("image/tiff", 4), ("image/webp", 1), ("image/jpeg", 1),
    ]
    assert list(pdf.pages.values_list("number", "status")) == [(1, "pending"), (2, "pending"), (3, "pending")]
    assert pdf.status == Scan.Status.QUEUED
    assert len(pdf.sha256) == 64 and pdf.size > 0


def test_a_page_of_unusual_size_is_accepted(user, tmp_path) -> None:
    huge = make_pdf(tmp_path / "poster.pdf", 1, size=(200 * 72, 200 * 72), dpi=2)
    scan = upload(user, "poster.pdf", huge.read_bytes())
    assert scan.page_count == 1


def test_text_layer_is_detected(user, tmp_path) -> None:
    scan = upload(user, "t.pdf", make_pdf(tmp_path / "t.pdf", 2, text_layer=True).read_bytes())
    assert scan.has_text_layer
    assert not upload(user, "n.pdf", make_pdf(tmp_path / "n.pdf", 2).read_bytes()).has_text_layer


def test_upload_page_reports_each_rejection(alice_client, tmp_path) -> None:
    good = SimpleUploadedFile("good.pdf", make_pdf(tmp_path / "g.pdf", 2).read_bytes())
    bad = SimpleUploadedFile("bad.pdf", b"")
    response = alice_client.post("/scans/upload/", {"files": [good, bad]}, follow=True)
    text = response.content.decode()
    assert "bad.pdf: The file is empty." in text
    assert "good.pdf (2 pages)" in text
    assert Scan.objects.count() == 1


def test_rgba_and_grayscale_images_are_accepted(user) -> None:
    buffer = io.BytesIO()
    Image.new("LA", (50, 40)).save(buffer, format="PNG")
    assert upload(user, "gray.png", buffer.getvalue()).page_count == 1


def test_the_upload_page_sets_the_scans_priority(alice_client, tmp_path) -> None:
    """Issue 14: the UI sets a scan's priority, as the API and the CLI do."""
    page = alice_client.get("/scans/upload/").content.decode()
    assert '<select name="priority">' in page and '<option value="0" selected>Normal</option>' in page
    pdf = make_pdf(tmp_path / "p.pdf", 1).read_bytes()
    alice_client.post("/scans/upload/", {"files": [SimpleUploadedFile("p.pdf", pdf)], "priority": "1"})
    assert Scan.objects.get().priority == Scan.Priority.HIGH
    refused = alice_client.post("/scans/upload/", {"files": [SimpleUploadedFile("q.pdf", pdf)], "priority": "9"}, follow=True)
    assert "Choose a priority from the list." in refused.content.decode()
    assert Scan.objects.count() == 1
