"""The request limits' configuration (environment -> settings) and their rule per path."""

from __future__ import annotations

import runpy

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.files.uploadedfile import SimpleUploadedFile

from ocrsite.limits import body_limit
from scans.models import Scan
from tests.conftest import stored_files
from tests.support import REPO

MB = 1024 * 1024


def settings_of(tmp_path, monkeypatch, **environ: str) -> list:
    """ocrsite/settings.py evaluated afresh under `environ`: the limits it derives."""
    for name in ("OCRSITE_MAX_UPLOAD_MB", "OCRSITE_MAX_UPLOAD_REQUEST_MB", "OCRSITE_MAX_UPLOAD_FILES",
                 "OCRSITE_HEADER_TIMEOUT_MS", "OCRSITE_BODY_TIMEOUT_MS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OCRSITE_DATA_DIR", str(tmp_path))
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    s = runpy.run_path(str(REPO / "ocrsite" / "settings.py"))
    return [s["DATA_UPLOAD_MAX_NUMBER_FILES"], s["OCRSITE_BODY_LIMITS"], s["OCRSITE_HEADER_TIMEOUT_MS"], s["OCRSITE_BODY_TIMEOUT_MS"]]


def test_the_environment_sets_the_limits(tmp_path, monkeypatch) -> None:
    assert settings_of(tmp_path, monkeypatch) == [100, [("/scans/upload/", 201 * MB), ("/api/v1/scans/", 201 * MB)], 10_000, 20_000]
    assert settings_of(
        tmp_path, monkeypatch, OCRSITE_MAX_UPLOAD_MB="5", OCRSITE_MAX_UPLOAD_FILES="3",
        OCRSITE_HEADER_TIMEOUT_MS="1500", OCRSITE_BODY_TIMEOUT_MS="4000",
    ) == [3, [("/scans/upload/", 6 * MB), ("/api/v1/scans/", 6 * MB)], 1500, 4000]
    # One upload request may carry more than one file's limit.
    limits = settings_of(tmp_path, monkeypatch, OCRSITE_MAX_UPLOAD_MB="5", OCRSITE_MAX_UPLOAD_REQUEST_MB="50")[1]
    assert limits == [("/scans/upload/", 51 * MB), ("/api/v1/scans/", 51 * MB)]


def test_a_header_timeout_granian_cannot_take_fails_fast(tmp_path, monkeypatch) -> None:
    with pytest.raises(ImproperlyConfigured, match="OCRSITE_HEADER_TIMEOUT_MS=90000 is above the maximum of 60000"):
        settings_of(tmp_path, monkeypatch, OCRSITE_HEADER_TIMEOUT_MS="90000")


def test_the_first_matching_prefix_gives_the_limit_and_other_paths_get_the_default(settings) -> None:
    settings.OCRSITE_BODY_LIMITS = [("/scans/upload/", 201 * MB), ("/api/v1/scans/", 50 * MB)]
    assert body_limit("/scans/upload/") == 201 * MB
    assert body_limit("/api/v1/scans/") == 50 * MB
    assert body_limit("/scans/upload") == body_limit("/login/") == body_limit("/api/v1/") == settings.DATA_UPLOAD_MAX_MEMORY_SIZE


@pytest.mark.django_db
def test_more_files_than_the_setting_allows_go_back_to_the_upload_page_with_a_message(alice_client, settings) -> None:
    settings.DATA_UPLOAD_MAX_NUMBER_FILES = 3
    files = [SimpleUploadedFile(f"f{n}.png", b"x" * 100) for n in range(4)]
    response = alice_client.post("/scans/upload/", {"files": files}, follow=True)
    assert response.redirect_chain == [("/scans/upload/", 303)]
    assert [str(m) for m in response.context["messages"]] == [
        "Too many files at once: one upload takes at most 3. Nothing was uploaded; choose fewer files."
    ]
    assert Scan.objects.count() == 0 and stored_files(settings.FILE_UPLOAD_TEMP_DIR) == []
