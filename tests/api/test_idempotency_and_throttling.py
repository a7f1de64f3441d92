"""A retried upload with the same Idempotency-Key returns the same scans; uploads are throttled per user."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone

from api import idempotency
from api.models import IdempotencyKey
from scans.models import Scan
from tests.api.conftest import token_caller
from tests.conftest import stored_files

pytestmark = pytest.mark.django_db

SCANS = "/api/v1/scans/"


def upload(caller, pdf_bytes: bytes, key: str | None = None, name: str = "report.pdf", **fields):
    headers = {"Idempotency-Key": key} if key is not None else {}
    return caller.post(SCANS, {"files": [SimpleUploadedFile(name, pdf_bytes)], **fields}, headers=headers)


def test_a_retried_upload_gets_the_same_scans_and_creates_nothing_more(caller, pdf_bytes):
    first = upload(caller, pdf_bytes, key="7f1c-retry-me", prompt="olmocr")
    assert first.status_code == 201
    again = upload(caller, pdf_bytes, key="7f1c-retry-me", prompt="olmocr")
    assert again.status_code == 201
    assert again["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    assert Scan.objects.count() == 1
    assert len(stored_files(settings.MEDIA_ROOT)) == 1
    # Without the key (or with another one) it is a new upload.
    assert upload(caller, pdf_bytes, key="another").json()["scans"][0]["id"] != first.json()["scans"][0]["id"]
    assert upload(caller, pdf_bytes).status_code == 201
    assert Scan.objects.count() == 3


def test_a_rejected_upload_is_replayed_as_rejected(caller):
    first = caller.post(SCANS, {"files": [SimpleUploadedFile("x.pdf", b"")]}, headers={"Idempotency-Key": "k"})
    again = caller.post(SCANS, {"files": [SimpleUploadedFile("x.pdf", b"")]}, headers={"Idempotency-Key": "k"})
    assert (first.status_code, again.status_code) == (400, 400)
    assert again.json() == first.json() and again["Idempotent-Replayed"] == "true"


def test_keys_belong_to_their_user(user, other_user, pdf_bytes):
    alice, bob = token_caller(user), token_caller(other_user)
    mine = upload(alice, pdf_bytes, key="shared-key").json()["scans"][0]
    theirs = upload(bob, pdf_bytes, key="shared-key").json()["scans"][0]
    assert mine["id"] != theirs["id"]
    assert Scan.objects.get(pk=theirs["id"]).owner == other_user


def test_the_same_key_for_a_different_request_is_refused(caller, pdf_bytes):
    upload(caller, pdf_bytes, key="k1")
    other_file = upload(caller, pdf_bytes, key="k1", name="other.pdf")
    assert other_file.status_code == 422
    assert "different request" in other_file.json()["detail"]
    other_options = upload(caller, pdf_bytes, key="k1", prompt="olmocr")
    assert other_options.status_code == 422
    assert Scan.objects.count() == 1


def test_a_key_still_in_progress_answers_409(caller, pdf_bytes):
    IdempotencyKey.objects.create(
        user=caller.user, key="busy", fingerprint="x", expires_at=timezone.now() + idempotency.KEY_TTL
    )
    response = upload(caller, pdf_bytes, key="busy")
    assert response.status_code == 409 and "still being processed" in response.json()["detail"]
    assert Scan.objects.count() == 0


def test_keys_expire_and_abandoned_ones_are_released(caller, pdf_bytes):
    first = upload(caller, pdf_bytes, key="old").json()["scans"][0]
    IdempotencyKey.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    second = upload(caller, pdf_bytes, key="old").json()["scans"][0]
    assert second["id"] != first["id"]
    # A first request whose process died long ago does not hold its key for a day.
    IdempotencyKey.objects.create(
        user=caller.user, key="dead", fingerprint="x", expires_at=timezone.now() + idempotency.KEY_TTL
    )
    IdempotencyKey.objects.filter(key="dead").update(created_at=timezone.now() - idempotency.IN_PROGRESS_TTL - timedelta(seconds=1))
    assert upload(caller, pdf_bytes, key="dead").status_code == 201


def test_a_request_that_fails_releases_its_key(caller, pdf_bytes, monkeypatch):
    def broken(**kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("api.views.upload_scans", broken)
    caller.client.raise_request_exception = False
    assert upload(caller, pdf_bytes, key="fails").status_code == 500
    assert not IdempotencyKey.objects.filter(key="fails").exists()


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", "tab\there"])
def test_malformed_keys_are_a_400(caller, pdf_bytes, key):
    response = upload(caller, pdf_bytes, key=key)
    assert response.status_code == 400 and "Idempotency-Key" in response.json()["detail"]
    assert Scan.objects.count() == 0


# --- throttling ------------------------------------------------------------------------------------


def test_uploads_are_throttled_per_user(settings, caller, other_user, pdf_bytes):
    settings.OCRSITE_API_UPLOAD_RATE = "2/hour"
    assert upload(caller, pdf_bytes).status_code == 201
    assert upload(caller, pdf_bytes).status_code == 201
    refused = upload(caller, pdf_bytes)
    assert refused.status_code == 429
    assert int(refused["Retry-After"]) > 3000
    assert "throttled" in refused.json()["detail"]
    assert Scan.objects.count() == 2
    # Reading is not throttled, and another user has an allowance of their own.
    assert caller.get(SCANS).status_code == 200
    assert upload(token_caller(other_user), pdf_bytes).status_code == 201


def test_token_and_session_share_one_users_allowance(settings, user, pdf_bytes):
    from tests.api.conftest import session_caller

    settings.OCRSITE_API_UPLOAD_RATE = "1/minute"
    assert upload(token_caller(user), pdf_bytes).status_code == 201
    assert upload(session_caller(user), pdf_bytes).status_code == 429


def test_an_empty_rate_turns_throttling_off(settings, caller, pdf_bytes):
    settings.OCRSITE_API_UPLOAD_RATE = ""
    assert all(upload(caller, pdf_bytes).status_code == 201 for _ in range(5))
