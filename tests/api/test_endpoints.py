"""Every endpoint of /api/v1/, as a program (token) and as the site's JavaScript (session with CSRF)."""

from __future__ import annotations

import json
from pathlib import Path

import pypdfium2 as pdfium
import pytest

from scans import exports, services
from scans.uploads import SUPPORTED
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.utils import timezone

from api import tokens
from scans.exports import FORMATS
from scans.models import Page, Scan
from tests.api.conftest import finish, make_scan, session_caller, token_caller
from tests.conftest import stored_files

pytestmark = pytest.mark.django_db

SCANS = "/api/v1/scans/"


def scan_url(scan: Scan, tail: str = "") -> str:
    return f"{SCANS}{scan.pk}/{tail}"


def scan_endpoints(scan: Scan) -> list[tuple[str, str]]:
    """(method, path) of every endpoint about one scan."""
    exports = [("get", scan_url(scan, f"export.{fmt}")) for fmt in FORMATS]
    return [
        ("get", scan_url(scan)), ("get", scan_url(scan, "pages/")), *exports,
        ("post", scan_url(scan, "cancel/")), ("post", scan_url(scan, "retry/")), ("delete", scan_url(scan)),
    ]


# --- upload ----------------------------------------------------------------------------------------


def test_upload_creates_one_scan_per_file_with_its_options_and_urls(caller, pdf_bytes, png_bytes):
    response = caller.post(
        SCANS,
        {
            "files": [SimpleUploadedFile("report.pdf", pdf_bytes), SimpleUploadedFile("photo.png", png_bytes)],
            "prompt": "olmocr", "engine": "builtin", "language": "eng+deu", "priority": "2",
        },
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["errors"] == []
    assert [item["filename"] for item in body["scans"]] == ["report.pdf", "photo.png"]
    scans = [Scan.objects.get(pk=item["id"]) for item in body["scans"]]
    assert [scan.page_count for scan in scans] == [2, 1]
    for scan in scans:
        assert scan.owner == caller.user
        assert scan.status == Scan.Status.QUEUED
        assert scan.options == {"prompt": "olmocr", "engine": "builtin", "language": "eng+deu"}
        assert scan.priority == 2
    first = body["scans"][0]
    assert first["status"] == "queued"
    assert first["pages"] == {"total": 2, "done": 0, "failed": 0, "running": 0, "pending": 2, "fallback": 0, "warned": 0}
    assert first["urls"]["self"] == f"http://testserver{SCANS}{first['id']}/"
    assert first["urls"]["exports"] == {fmt: f"http://testserver{SCANS}{first['id']}/export.{fmt}" for fmt in FORMATS}
    assert first["urls"]["websocket"] == f"ws://testserver/ws/scans/{first['id']}/"
    # The URLs it gives are the API's own.
    assert caller.get(first["urls"]["self"]).json()["id"] == first["id"]


def test_each_file_is_judged_alone_and_the_rejected_one_leaves_nothing(caller, pdf_bytes):
    response = caller.post(
        SCANS, {"files": [SimpleUploadedFile("notes.pdf", b"plain text, not a PDF\n" * 20), SimpleUploadedFile("ok.pdf", pdf_bytes)]}
    )
    assert response.status_code == 201
    body = response.json()
    assert [item["filename"] for item in body["scans"]] == ["ok.pdf"]
    assert body["errors"] == [
        {"index": 0, "filename": "notes.pdf", "message": f"This is not a supported file type (judged by its content); upload a {SUPPORTED}."}
    ]
    assert Scan.objects.count() == 1
    assert len(stored_files(settings.MEDIA_ROOT)) == 1


def test_an_upload_whose_every_file_is_rejected_is_a_400_with_each_reason(caller):
    response = caller.post(SCANS, {"files": [SimpleUploadedFile("empty.pdf", b""), SimpleUploadedFile("x.png", b"PK\x03\x04" + b"\0" * 100)]})
    assert response.status_code == 400
    assert [(e["index"], e["filename"]) for e in response.json()["errors"]] == [(0, "empty.pdf"), (1, "x.png")]
    assert "empty" in response.json()["errors"][0]["message"]
    assert Scan.objects.count() == 0
    assert stored_files(settings.MEDIA_ROOT) == []


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"prompt": "custom"}, "prompt", "is not a valid choice"),
        ({"engine": "gpt"}, "engine", "is not a valid choice"),
        ({"language": "eng; rm -rf"}, "language", "is not a Tesseract language"),
        # Not installed: a 400 before anything is queued, saying what is installed and how to add it.
        ({"language": "eng+fra"}, "language", "Tesseract language fra is not installed (installed in"),
        ({"language": "fra"}, "language", "To add it: copy fra.traineddata"),
        ({"priority": "99"}, "priority", "is not a valid choice"),
        ({"priority": "high"}, "priority", "is not a valid choice"),
        ({"promt": "olmocr"}, "promt", "Unknown field"),
        ({"callback_url": "ftp://example.com/x"}, "callback_url", "must start with http:// or https://"),
        ({"callback_url": "http://10.1.2.3/hook"}, "callback_url", "not among the hosts"),
    ],
)
def test_invalid_options_are_a_400_naming_the_field_and_nothing_is_stored(caller, pdf_bytes, fields, field, message):
    response = caller.post(SCANS, {"files": [SimpleUploadedFile("ok.pdf", pdf_bytes)], **fields})
    assert response.status_code == 400
    assert message in " ".join(response.json()[field])
    assert Scan.objects.count() == 0
    assert stored_files(settings.MEDIA_ROOT) == []


def test_an_upload_without_files_is_a_400(caller):
    response = caller.post(SCANS, {"prompt": "markdown"})
    assert response.status_code == 400
    assert "files" in response.json()


def test_a_callback_url_needs_a_webhook_secret_first(caller, pdf_bytes, settings):
    settings.OCRSITE_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]
    upload = {"files": [SimpleUploadedFile("ok.pdf", pdf_bytes)], "callback_url": "http://127.0.0.1:9/hook"}
    response = caller.post(SCANS, upload)
    assert response.status_code == 400
    assert "webhook secret" in response.json()["callback_url"][0]
    from api import webhooks

    webhooks.save_webhook(user=caller.user, url="")
    upload["files"] = [SimpleUploadedFile("ok.pdf", pdf_bytes)]
    response = caller.post(SCANS, upload)
    assert response.status_code == 201
    assert Scan.objects.get().options["callback_url"] == "http://127.0.0.1:9/hook"


# --- reads -----------------------------------------------------------------------------------------


def test_list_is_newest_first_paginated_and_filtered_by_status(caller, other_user):
    mine = [make_scan(caller.user, original_filename=f"{n}.pdf") for n in range(5)]
    make_scan(other_user, original_filename="bob.pdf")
    finish(mine[1])
    body = caller.get(SCANS, {"page_size": 2}).json()
    assert body["count"] == 5
    assert [item["filename"] for item in body["results"]] == ["4.pdf", "3.pdf"]
    assert body["next"].endswith("page=2&page_size=2")
    assert [item["filename"] for item in caller.get(body["next"]).json()["results"]] == ["2.pdf", "1.pdf"]
    done = caller.get(SCANS, {"status": "done"}).json()
    assert [item["filename"] for item in done["results"]] == ["1.pdf"]
    assert done["results"][0]["pages"]["done"] == 3
    bad = caller.get(SCANS, {"status": "finished"})
    assert bad.status_code == 400 and "status" in bad.json()


def test_detail_has_status_counts_rate_and_error(caller):
    scan = make_scan(caller.user, pages=4)
    now = timezone.now()
    Scan.objects.filter(pk=scan.pk).update(status=Scan.Status.PROCESSING, started_at=now - timezone.timedelta(seconds=10))
    Page.objects.filter(scan=scan, number__in=(1, 2)).update(status=Page.Status.DONE, finished_at=now, text="x")
    Page.objects.filter(scan=scan, number=3).update(status=Page.Status.FAILED, finished_at=now, error="timeout")
    body = caller.get(scan_url(scan)).json()
    assert body["status"] == "processing"
    assert body["pages"] == {"total": 4, "done": 2, "failed": 1, "running": 0, "pending": 1, "fallback": 0, "warned": 0}
    assert 0.2 < body["pages_per_s"] <= 0.31  # 3 pages in the ~10 s since the run started
    assert body["eta_s"] > 0
    Scan.objects.filter(pk=scan.pk).update(status=Scan.Status.FAILED, error="The model server is gone.")
    body = caller.get(scan_url(scan)).json()
    assert (body["status"], body["error"], body["eta_s"]) == ("failed", "The model server is gone.", 0.0)


def test_the_api_key_a_queued_command_kept_is_never_shown(caller):
    scan = make_scan(caller.user, options={"prompt": "olmocr", "api_key": "sk-secret"})
    assert caller.get(scan_url(scan)).json()["options"] == {"prompt": "olmocr"}
    assert "sk-secret" not in caller.get(SCANS).content.decode()


def test_pages_give_status_text_and_warnings_in_order(caller):
    scan = finish(make_scan(caller.user, pages=3), failed=(2,))
    Page.objects.filter(scan=scan, number=3).update(warnings=[{"code": "truncated", "message": "The answer was cut off."}])
    body = caller.get(scan_url(scan, "pages/")).json()
    assert body["count"] == 3
    pages = body["results"]
    assert [(p["number"], p["status"]) for p in pages] == [(1, "done"), (2, "failed"), (3, "done")]
    assert pages[0]["text"] == "# Page 1\n\nPage 1 **text**"
    assert pages[1]["error"] == "The model server answered 500."
    assert pages[2]["warnings"] == [{"code": "truncated", "message": "The answer was cut off."}]


def test_a_corrected_page_gives_the_correction_and_the_engine_s_text(caller):
    scan = finish(make_scan(caller.user, pages=2))
    services.correct_page(page=scan.pages.get(number=2), text="Page 2, as a person read it", user=caller.user)
    services.reread_page(page=scan.pages.get(number=1), options={})
    first, second = caller.get(scan_url(scan, "pages/")).json()["results"]
    assert second["text"] == "Page 2, as a person read it" and second["rereading"] is False
    assert second["correction"]["by"] == "alice" and second["correction"]["original_text"] == "# Page 2\n\nPage 2 **text**"
    assert first["text"] == "# Page 1\n\nPage 1 **text**" and first["rereading"] is True and first["correction"] is None


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_exports_download_every_format(caller, fmt, pdf_bytes):
    scan = finish(make_scan(caller.user, pages=2, original_filename="report.pdf"))
    scan.file.save("report.pdf", ContentFile(pdf_bytes), save=True)
    response = caller.get(scan_url(scan, f"export.{fmt}"))
    assert response.status_code == 200
    assert response["Content-Type"] == FORMATS[fmt][0]
    assert response["Content-Disposition"] == f'attachment; filename="report.{fmt}"'
    if fmt == "pdf":  # the searchable PDF: the scan's pages with the plain text over them
        pdf = pdfium.PdfDocument(response.content)
        try:
            assert [" ".join(page.get_textpage().get_text_range().split()) for page in pdf] == ["Page 1 Page 1 text", "Page 2 Page 2 text"]
        finally:
            pdf.close()
        Path(scan.file.path).unlink()
        gone = caller.get(scan_url(scan, "export.pdf"))
        assert gone.status_code == 409 and "could not be made" in gone.json()["detail"]
        return
    content = response.content.decode()
    assert content == exports.render(scan, fmt)  # the same document the site's download gives
    if fmt == "json":
        assert [p["text"] for p in json.loads(content)["pages"]] == [f"# Page {n}\n\nPage {n} **text**" for n in (1, 2)]
    elif fmt == "md":
        assert exports.split_markdown(content) == {n: f"# Page {n}\n\nPage {n} **text**" for n in (1, 2)}
    else:
        assert [chunk.strip() for chunk in content.split("\f")] == [f"Page {n}\n\nPage {n} text" for n in (1, 2)]


def test_an_export_is_served_whatever_the_client_accepts(caller):
    scan = finish(make_scan(caller.user, pages=1))
    assert caller.get(scan_url(scan, "export.md"), HTTP_ACCEPT="text/markdown").status_code == 200
    missing = caller.get(f"{SCANS}999999/export.md", HTTP_ACCEPT="text/markdown")
    assert missing.status_code == 404 and missing["Content-Type"] == "application/json"


def test_server_status_has_no_secrets_and_no_log_lines(caller):
    from vllm_control.models import VLMSettings

    row = VLMSettings.load()
    row.mode, row.external_base_url, row.external_api_key = "external", "http://127.0.0.1:9/v1", "sk-do-not-show"
    row.save()
    response = caller.get("/api/v1/server/")
    assert response.status_code == 200
    body = response.json()
    assert body["mode"] == "external" and body["state"] in ("failed", "unhealthy", "stopped")
    assert body["log_tail"] == []
    assert "sk-do-not-show" not in response.content.decode()


# --- writes ----------------------------------------------------------------------------------------


def test_cancel_stops_an_active_scan_once(caller):
    scan = make_scan(caller.user)
    response = caller.post(scan_url(scan, "cancel/"))
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert Scan.objects.get(pk=scan.pk).status == Scan.Status.CANCELLED
    again = caller.post(scan_url(scan, "cancel/"))
    assert again.status_code == 409
    assert again.json() == {"detail": "The scan has already finished (cancelled)."}


def test_retry_requeues_the_failed_pages_of_a_finished_scan(caller):
    scan = finish(make_scan(caller.user, pages=3), failed=(2, 3))
    response = caller.post(scan_url(scan, "retry/"))
    assert response.status_code == 200
    body = response.json()
    assert body["retrying_pages"] == 2
    assert body["scan"]["status"] == "queued"
    assert list(Page.objects.filter(scan=scan, status=Page.Status.PENDING).values_list("number", flat=True)) == [2, 3]
    busy = caller.post(scan_url(scan, "retry/"))
    assert busy.status_code == 409 and "queued" in busy.json()["detail"]
    clean = finish(make_scan(caller.user, pages=1))
    nothing = caller.post(scan_url(clean, "retry/"))
    assert nothing.status_code == 409 and "no failed" in nothing.json()["detail"]


def test_delete_removes_the_scan_its_pages_and_its_file(caller, pdf_bytes, django_capture_on_commit_callbacks):
    created = caller.post(SCANS, {"files": [SimpleUploadedFile("a.pdf", pdf_bytes)]}).json()["scans"][0]
    assert len(stored_files(settings.MEDIA_ROOT)) == 1
    with django_capture_on_commit_callbacks(execute=True):  # the file goes once the deletion commits
        response = caller.delete(f"{SCANS}{created['id']}/")
    assert response.status_code == 204
    assert not Scan.objects.filter(pk=created["id"]).exists()
    assert Page.objects.count() == 0
    assert stored_files(settings.MEDIA_ROOT) == []
    assert caller.get(f"{SCANS}{created['id']}/").status_code == 404


# --- isolation and authentication ------------------------------------------------------------------


def test_another_users_token_gets_404_for_every_scan_endpoint_and_changes_nothing(user, bob):
    scan = finish(make_scan(user, pages=2), failed=(2,))
    for method, path in scan_endpoints(scan):
        response = getattr(bob, method)(path)
        assert response.status_code == 404, (method, path, response.status_code)
    assert bob.get(SCANS).json()["count"] == 0
    assert Scan.objects.get(pk=scan.pk).status == Scan.Status.DONE_WITH_ERRORS
    assert Page.objects.filter(scan=scan, status=Page.Status.FAILED).count() == 1


def test_staff_see_everyones_scans_as_on_the_pages(staff_user, user):
    scan = make_scan(user)
    staff = token_caller(staff_user)
    assert staff.get(scan_url(scan)).status_code == 200
    assert staff.get(SCANS).json()["count"] == 1


def all_endpoints(scan: Scan) -> list[tuple[str, str]]:
    return [("get", SCANS), ("post", SCANS), ("get", "/api/v1/server/"), ("get", "/api/v1/schema/"), *scan_endpoints(scan)]


def assert_every_endpoint_answers_401(client: Client, scan: Scan, headers: dict, detail: str) -> None:
    for method, path in all_endpoints(scan):
        response = getattr(client, method)(path, headers={**headers, "Accept": "application/json"})
        assert response.status_code == 401, (method, path, response.status_code)
        assert response["WWW-Authenticate"] == 'Bearer realm="api"'
        assert response.json() == {"detail": detail}, (method, path)
    assert Scan.objects.get(pk=scan.pk).status == Scan.Status.QUEUED


def test_no_credentials_is_401_everywhere(user):
    assert_every_endpoint_answers_401(Client(), make_scan(user), {}, "Authentication credentials were not provided.")


@pytest.mark.parametrize(
    ("authorization", "detail"),
    [
        ("Bearer ocr_00000000_" + "A" * 43, "Invalid token."),
        ("Bearer not-a-token", "Invalid token."),
        ("Bearer ", "No token after 'Bearer'."),
    ],
)
def test_a_wrong_token_is_401_everywhere(user, authorization, detail):
    assert_every_endpoint_answers_401(Client(), make_scan(user), {"Authorization": authorization}, detail)


def test_an_expired_token_is_401_everywhere(user):
    created = tokens.create_token(user=user, name="short", expires_in_days=1)
    headers = {"Authorization": f"Bearer {created.token}"}
    scan = make_scan(user)
    assert Client().get(scan_url(scan), headers=headers).status_code == 200
    created.row.expires_at = timezone.now() - timezone.timedelta(seconds=1)
    created.row.save()
    assert_every_endpoint_answers_401(Client(), scan, headers, "This token has expired.")


def test_a_revoked_token_is_401_everywhere(user):
    created = tokens.create_token(user=user, name="gone")
    headers = {"Authorization": f"Bearer {created.token}"}
    scan = make_scan(user)
    assert Client().get(scan_url(scan), headers=headers).status_code == 200
    assert tokens.revoke_token(token=created.row)
    assert_every_endpoint_answers_401(Client(), scan, headers, "This token has been revoked.")


def test_a_token_one_character_off_is_401(user):
    created = tokens.create_token(user=user, name="t")
    wrong = created.token[:-1] + ("A" if created.token[-1] != "A" else "B")
    response = Client().get(SCANS, headers={"Authorization": f"Bearer {wrong}"})
    assert response.status_code == 401 and response.json() == {"detail": "Invalid token."}


def test_an_inactive_users_token_is_401(user):
    created = tokens.create_token(user=user, name="t")
    user.is_active = False
    user.save()
    response = Client().get(SCANS, headers={"Authorization": f"Bearer {created.token}"})
    assert response.status_code == 401


def test_a_session_needs_the_csrf_token_for_writes(user):
    session = session_caller(user)
    scan = make_scan(user)
    for method, path in [("post", scan_url(scan, "cancel/")), ("delete", scan_url(scan)), ("post", SCANS)]:
        response = getattr(session.client, method)(path)
        assert response.status_code == 403, (method, path)
        assert "CSRF" in response.json()["detail"]
    assert Scan.objects.get(pk=scan.pk).status == Scan.Status.QUEUED
    assert session.client.get(scan_url(scan)).status_code == 200  # reads need no CSRF token
    assert session.post(scan_url(scan, "cancel/")).status_code == 200


@pytest.mark.parametrize("body", ['["files"]', '{"files": "x"}', "null"])
def test_an_upload_sent_as_json_is_a_clear_400(caller, body):
    response = caller.post(SCANS, body, content_type="application/json")
    assert response.status_code == 400
    assert Scan.objects.count() == 0
