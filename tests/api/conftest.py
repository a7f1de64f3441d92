"""Clients of the REST API as a program (Bearer token) and as the site's JavaScript (session + CSRF)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from django.core.cache import cache
from django.test import Client

from api import tokens
from scans.models import Page, Scan
from tests.fakes.pages import make_image, make_pdf


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    """The users' passwords play no part here; PBKDF2 would spend a second per test on them."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def _fresh_throttles():
    """DRF's throttles count in the cache, which outlives a test (user ids are reused)."""
    cache.clear()
    yield
    cache.clear()


@dataclass
class Caller:
    """One user's way of calling the API: `mode` "token" (Authorization: Bearer) or "session"
    (a logged-in browser session with its CSRF token, enforced)."""

    mode: str
    user: object
    client: Client
    headers: dict

    def get(self, path: str, data=None, **kwargs):
        return self.client.get(path, data, headers=self.headers, **kwargs)

    def post(self, path: str, data=None, *, headers: dict | None = None, **kwargs):
        return self.client.post(path, data if data is not None else {}, headers={**self.headers, **(headers or {})}, **kwargs)

    def delete(self, path: str, **kwargs):
        return self.client.delete(path, headers=self.headers, **kwargs)


def token_caller(user, name: str = "test") -> Caller:
    return Caller("token", user, Client(), {"Authorization": f"Bearer {tokens.create_token(user=user, name=name).token}"})


def session_caller(user) -> Caller:
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    client.get("/account/api-tokens/")  # sets the CSRF cookie, as any page the JavaScript runs on does
    return Caller("session", user, client, {"X-CSRFToken": client.cookies["csrftoken"].value})


@pytest.fixture(params=["token", "session"])
def caller(request, user) -> Caller:
    """Alice, through each of the two ways of authenticating."""
    return token_caller(user) if request.param == "token" else session_caller(user)


@pytest.fixture
def bob(other_user) -> Caller:
    return token_caller(other_user, "bob's")


def make_scan(owner, pages: int = 3, **fields) -> Scan:
    """A scan row with pending pages (no file: for reads, exports and state changes)."""
    values = dict(
        owner=owner, file="scans/none.pdf", original_filename="letters.pdf", content_type="application/pdf",
        size=1234, sha256="0" * 64, page_count=pages,
    )
    values.update(fields)
    scan = Scan.objects.create(**values)
    Page.objects.bulk_create(Page(scan=scan, number=n) for n in range(1, pages + 1))
    return scan


def finish(scan: Scan, *, failed: tuple[int, ...] = ()) -> Scan:
    """Mark every page done (text "Page N text") except `failed`, and the scan finished accordingly."""
    for page in scan.pages.all():
        if page.number in failed:
            page.status, page.error = Page.Status.FAILED, "The model server answered 500."
        else:
            page.status, page.text = Page.Status.DONE, f"# Page {page.number}\n\nPage {page.number} **text**"
        page.save()
    scan.status = Scan.Status.DONE_WITH_ERRORS if failed else Scan.Status.DONE
    scan.save()
    return scan


@pytest.fixture
def pdf_bytes(tmp_path: Path) -> bytes:
    return make_pdf(tmp_path / "two.pdf", 2).read_bytes()


@pytest.fixture
def png_bytes(tmp_path: Path) -> bytes:
    return make_image(tmp_path / "one.png", 1, size=(300, 400)).read_bytes()
