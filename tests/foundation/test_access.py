"""Every page requires login; users see only their own scans. Each role's rights: tests/test_permissions.py."""

from __future__ import annotations

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from scans.uploads import create_scan_from_upload
from tests.fakes.pages import make_pdf

pytestmark = pytest.mark.django_db


@pytest.fixture
def alice_scan(user, tmp_path):
    data = make_pdf(tmp_path / "a.pdf", 1).read_bytes()
    return create_scan_from_upload(owner=user, uploaded_file=SimpleUploadedFile("alice-secret.pdf", data))


def scan_urls(scan_id: int) -> list[str]:
    return [
        f"/scans/{scan_id}/",
        f"/scans/{scan_id}/download.md",
        f"/scans/{scan_id}/download.txt",
        f"/scans/{scan_id}/download.json",
        f"/scans/{scan_id}/original/",
    ]


def test_anonymous_users_are_sent_to_login(client, alice_scan) -> None:
    for url in ["/scans/", "/scans/upload/", "/settings/", *scan_urls(alice_scan.pk)]:
        response = client.get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith("/login/"), url
    assert client.post(f"/scans/{alice_scan.pk}/cancel/").status_code == 302


def test_users_cannot_see_each_others_scans(client, other_user, alice_scan) -> None:
    client.force_login(other_user)
    assert "alice-secret.pdf" not in client.get("/scans/").content.decode()
    for url in scan_urls(alice_scan.pk):
        assert client.get(url).status_code == 404, url
    for action in ("cancel", "retry", "delete"):
        assert client.post(f"/scans/{alice_scan.pk}/{action}/").status_code == 404
    alice_scan.refresh_from_db()
    assert alice_scan.status == "queued"


def test_owner_and_staff_see_the_scan(client, user, staff_user, alice_scan) -> None:
    for who in (user, staff_user):
        client.force_login(who)
        assert "alice-secret.pdf" in client.get("/scans/").content.decode()
        assert client.get(f"/scans/{alice_scan.pk}/").status_code == 200


def test_settings_page_needs_the_permission(client, user) -> None:
    client.force_login(user)
    assert client.get("/settings/").status_code == 403


def test_admin_lists_the_three_models(staff_client) -> None:
    text = staff_client.get("/admin/").content.decode()
    for model in ("Scans", "Pages", "VLM settings"):
        assert model in text
    for url in ("/admin/scans/scan/", "/admin/scans/page/", "/admin/vllm_control/vlmsettings/"):
        assert staff_client.get(url).status_code == 200
