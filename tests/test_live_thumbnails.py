"""Page thumbnails and page text for the live scan page: rendered, cached, and only for who may see the scan."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from django.urls import reverse
from PIL import Image

from scans.models import Page, Scan
from scans.thumbnails import THUMB_LONGEST_SIDE, thumbnail_path
from tests.fakes.pages import make_pdf, read_marker

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _data_dir(settings, tmp_path: Path) -> None:
    settings.DATA_DIR = tmp_path / "data"


@pytest.fixture
def pdf_scan(settings, user, tmp_path: Path) -> Scan:
    source = make_pdf(tmp_path / "three.pdf", 3)
    stored = Path(settings.MEDIA_ROOT) / "scans" / "three.pdf"
    stored.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, stored)
    scan = Scan.objects.create(
        owner=user, file="scans/three.pdf", original_filename="three.pdf", content_type="application/pdf",
        size=stored.stat().st_size, sha256="ab" * 32, page_count=3,
    )
    Page.objects.bulk_create(Page(scan=scan, number=n) for n in range(1, 4))
    Page.objects.filter(scan=scan, number=2).update(status=Page.Status.DONE, text="PAGE 2\n<script>x</script>")
    return scan


def thumb_url(scan: Scan, number: int) -> str:
    return reverse("scans:thumbnail", args=[scan.pk, number])


def test_owner_gets_a_cached_png_of_the_right_page(client, user, pdf_scan):
    client.force_login(user)
    response = client.get(thumb_url(pdf_scan, 2))
    assert response.status_code == 200 and response["Content-Type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert max(image.size) == THUMB_LONGEST_SIDE
    assert read_marker(image) == 2
    cached = thumbnail_path(pdf_scan, 2)
    assert cached.read_bytes() == response.content
    # Served from the cache: the original file is no longer needed.
    Path(pdf_scan.file.path).unlink()
    assert client.get(thumb_url(pdf_scan, 2)).content == response.content


def test_others_get_404_staff_get_the_thumbnail_anonymous_must_log_in(client, other_user, staff_user, pdf_scan):
    anonymous = client.get(thumb_url(pdf_scan, 1))
    assert anonymous.status_code == 302 and reverse("login") in anonymous["Location"]
    client.force_login(other_user)
    assert client.get(thumb_url(pdf_scan, 1)).status_code == 404
    assert client.get(reverse("scans:page_text", args=[pdf_scan.pk, 2])).status_code == 404
    client.force_login(staff_user)
    assert client.get(thumb_url(pdf_scan, 1)).status_code == 200


def test_pages_outside_the_scan_are_404(client, user, pdf_scan):
    client.force_login(user)
    assert client.get(thumb_url(pdf_scan, 4)).status_code == 404
    assert client.get(thumb_url(pdf_scan, 0)).status_code == 404


def test_page_text_is_plain_text(client, user, pdf_scan):
    client.force_login(user)
    response = client.get(reverse("scans:page_text", args=[pdf_scan.pk, 2]))
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response.content.decode() == "PAGE 2\n<script>x</script>"
