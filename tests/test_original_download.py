"""The original file downloads as an attachment named with the extension of the type detected at
upload, with that type and nosniff: a PDF named `report.html` (an HTML/PDF polyglot) never opens as HTML."""

from __future__ import annotations

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from scans.uploads import create_scan_from_upload
from tests.fakes.pages import make_image, make_pdf

pytestmark = pytest.mark.django_db


def polyglot(tmp_path) -> bytes:
    """HTML that is also a PDF: browsers render it as a page, PDF readers skip the leading junk."""
    return b"<html><body><script>alert(document.cookie)</script><!--\n" + make_pdf(tmp_path / "p.pdf", 1).read_bytes()


@pytest.mark.parametrize(
    ("name", "make", "download_name", "content_type"),
    [
        ("report.html", polyglot, "report.pdf", "application/pdf"),
        ("scan", lambda tmp: make_pdf(tmp / "s.pdf", 1).read_bytes(), "scan.pdf", "application/pdf"),
        ("photo.png", lambda tmp: make_image(tmp / "p.jpg", 1, "JPEG").read_bytes(), "photo.jpg", "image/jpeg"),
        ("page.svg", lambda tmp: make_image(tmp / "p.png", 1).read_bytes(), "page.png", "image/png"),
        ("letter.pdf", lambda tmp: make_pdf(tmp / "l.pdf", 1).read_bytes(), "letter.pdf", "application/pdf"),
    ],
)
def test_the_original_downloads_under_its_detected_type(alice_client, user, tmp_path, name, make, download_name, content_type) -> None:
    data = make(tmp_path)
    scan = create_scan_from_upload(owner=user, uploaded_file=SimpleUploadedFile(name, data))
    assert scan.original_filename == name  # shown as the uploader named it
    response = alice_client.get(reverse("scans:original", args=[scan.pk]))
    assert response.status_code == 200
    assert response["Content-Type"] == content_type
    assert response["Content-Disposition"] == f'attachment; filename="{download_name}"'
    assert response["X-Content-Type-Options"] == "nosniff"
    assert b"".join(response.streaming_content) == data
