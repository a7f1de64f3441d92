"""A full disk while an upload is stored gives a clear message, never a 500, and leaves nothing behind
(no partial file in the data directory's tmp/ or media/, no row); a full disk costs a thumbnail its
cache, not the thumbnail. Each place a file is written is put on a real, small tmpfs."""

from __future__ import annotations

import html
import subprocess
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from scans.models import Page, Scan
from scans.uploads import UploadRejected, create_scan_from_path
from tests.conftest import stored_files
from tests.fakes.pages import make_pdf
from tests.http_probes import MB, multipart_upload, running_site, write_padded_pdf

pytestmark = pytest.mark.django_db

DISK_FULL = "The server's disk is full, so the file was not stored. Try again later."


@pytest.fixture
def small_filesystem():
    """Mounts a tmpfs of `size` bytes at a path (needs root, as in CI); unmounted at the end."""
    mounted: list[Path] = []

    def mount(path: Path, size: int) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {done.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> None:
    """Leaves no free space on the filesystem holding `path`."""
    with (path / "filler").open("wb") as handle:
        try:
            while True:
                handle.write(bytes(64 * 1024))
        except OSError:
            pass


def assert_nothing_kept(settings, *, except_names: tuple[str, ...] = ()) -> None:
    assert Scan.objects.exclude(original_filename__in=except_names).count() == 0
    assert Page.objects.filter(scan__original_filename__in=except_names).count() == Page.objects.count()
    assert [p for p in stored_files(Path(settings.FILE_UPLOAD_TEMP_DIR)) if p.name != "filler"] == []
    kept = {p for p in stored_files(settings.MEDIA_ROOT) if p.name != "filler"}
    assert len(kept) == len(except_names)


def upload_page_messages(response) -> list[str]:
    return [str(message) for message in response.context["messages"]]


def test_spooling_the_upload_on_a_full_disk(alice_client, settings, small_filesystem, tmp_path) -> None:
    settings.FILE_UPLOAD_TEMP_DIR = str(small_filesystem(tmp_path / "tmp", 1 * MB))
    pdf = write_padded_pdf(tmp_path / "big.pdf", 2 * MB)  # kept in memory by Django (under 10 MB)
    response = alice_client.post("/scans/upload/", {"files": [SimpleUploadedFile("big.pdf", pdf.read_bytes())]})
    assert response.status_code == 200
    assert upload_page_messages(response) == [f"big.pdf: {DISK_FULL}"]
    assert_nothing_kept(settings)


def test_django_writing_the_form_s_files_on_a_full_disk(alice_client, settings, small_filesystem, tmp_path) -> None:
    settings.FILE_UPLOAD_TEMP_DIR = str(small_filesystem(tmp_path / "tmp", 1 * MB))
    settings.FILE_UPLOAD_MAX_MEMORY_SIZE = 64 * 1024  # Django streams larger files to FILE_UPLOAD_TEMP_DIR
    pdf = write_padded_pdf(tmp_path / "big.pdf", 2 * MB)
    response = alice_client.post("/scans/upload/", {"files": [SimpleUploadedFile("big.pdf", pdf.read_bytes())]}, follow=True)
    assert response.redirect_chain == [("/scans/upload/", 303)]
    assert upload_page_messages(response) == ["The server's disk is full; nothing was uploaded. Try again later."]
    assert_nothing_kept(settings)


def test_moving_into_media_on_a_full_disk_keeps_no_partial_copy_and_not_the_other_files(
    alice_client, settings, small_filesystem, tmp_path
) -> None:
    # media on its own filesystem: the spooled file is copied there, not renamed
    settings.MEDIA_ROOT = small_filesystem(tmp_path / "media", 1 * MB)
    big = write_padded_pdf(tmp_path / "big.pdf", 2 * MB)
    small = make_pdf(tmp_path / "small.pdf", 1)
    files = [SimpleUploadedFile("big.pdf", big.read_bytes()), SimpleUploadedFile("small.pdf", small.read_bytes())]
    response = alice_client.post("/scans/upload/", {"files": files})
    assert response.status_code == 200
    assert upload_page_messages(response) == [f"big.pdf: {DISK_FULL}", "Queued small.pdf (1 page)."]
    assert_nothing_kept(settings, except_names=("small.pdf",))


def test_the_ocr_command_s_upload_on_a_full_disk(user, settings, small_filesystem, tmp_path) -> None:
    settings.FILE_UPLOAD_TEMP_DIR = str(small_filesystem(tmp_path / "tmp", 1 * MB))
    pdf = write_padded_pdf(tmp_path / "big.pdf", 2 * MB)
    with pytest.raises(UploadRejected, match="disk is full"):
        create_scan_from_path(owner=user, path=pdf)
    assert_nothing_kept(settings)


def test_a_thumbnail_is_served_when_its_cache_cannot_be_written(alice_client, user, settings, small_filesystem, tmp_path) -> None:
    scan = create_scan_from_path(owner=user, path=make_pdf(tmp_path / "doc.pdf", 1))
    settings.DATA_DIR = tmp_path / "data"
    fill(small_filesystem(tmp_path / "data" / "thumbs", 64 * 1024))
    response = alice_client.get(reverse("scans:thumbnail", args=[scan.pk, 1]))
    assert response.status_code == 200 and response["Content-Type"] == "image/png"
    assert b"".join(response.streaming_content if response.streaming else [response.content]).startswith(b"\x89PNG")
    assert [p.name for p in (tmp_path / "data" / "thumbs").iterdir()] == ["filler"]


def test_the_server_s_request_spool_on_a_full_disk_answers_507(tmp_path, small_filesystem) -> None:
    """Django spools a request body over FILE_UPLOAD_MAX_MEMORY_SIZE (10 MB) to a temporary file
    before any view runs; `manage.py serve` keeps those in the data directory's tmp/."""
    data = tmp_path / "site"
    data.mkdir()
    with running_site(data, {"OCRSITE_MAX_UPLOAD_MB": "50"}, before_start=lambda d: small_filesystem(d / "tmp", 2 * MB)) as site:
        session = site.login()
        reply = multipart_upload(session, [("big.pdf", [bytes(16 * MB)], 16 * MB)])
        assert reply.status == 507
        assert "The server's disk is full; nothing was stored. Try again later." in html.unescape(reply.body.decode())
        assert site.files("tmp") == [] and site.files("media") == [] and site.scan_count() == 0
        # Space comes back: the spool was anonymous and is gone with the request.
        assert subprocess.run(["df", "--output=used", str(data / "tmp")], capture_output=True, text=True).stdout.split()[-1] == "0"
