"""Personal API tokens: stored as digests, shown once, listed and revoked on the page, in admin and
from the command line."""

from __future__ import annotations

import hashlib
import re
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils import timezone

from api import tokens
from api.models import ApiToken

pytestmark = pytest.mark.django_db

TOKEN = re.compile(r"ocr_[0-9a-f]{8}_[A-Za-z0-9_-]{43}")


def test_only_the_prefix_and_a_digest_are_stored(user):
    created = tokens.create_token(user=user, name="scanner", expires_in_days=30)
    assert TOKEN.fullmatch(created.token)
    row = ApiToken.objects.get()
    assert created.token.startswith(f"ocr_{row.prefix}_")
    assert row.digest == hashlib.sha256(created.token.encode()).hexdigest()
    assert created.token not in str(ApiToken.objects.values().get())
    assert timedelta(days=29, hours=23) < row.expires_at - timezone.now() <= timedelta(days=30)
    assert tokens.authenticate_token(created.token).user == user


def test_two_tokens_differ_and_each_finds_its_own_row(user, other_user):
    first = tokens.create_token(user=user, name="a")
    second = tokens.create_token(user=other_user, name="b")
    assert first.token != second.token and first.row.prefix != second.row.prefix
    assert tokens.authenticate_token(second.token).user == other_user
    # The right prefix with another token's secret is not a token.
    forged = f"ocr_{first.row.prefix}_{second.token[-43:]}"
    with pytest.raises(tokens.TokenInvalid, match="Invalid token"):
        tokens.authenticate_token(forged)


def test_last_used_is_recorded_at_most_once_a_minute(user):
    created = tokens.create_token(user=user, name="a")
    now = timezone.now()
    tokens.authenticate_token(created.token, now=now)
    assert ApiToken.objects.get().last_used_at == now
    tokens.authenticate_token(created.token, now=now + timedelta(seconds=30))
    assert ApiToken.objects.get().last_used_at == now
    later = now + timedelta(minutes=2)
    tokens.authenticate_token(created.token, now=later)
    assert ApiToken.objects.get().last_used_at == later


# --- the page ---------------------------------------------------------------------------------------


@pytest.fixture
def browser(user) -> Client:
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    return client


def csrf(client: Client) -> str:
    client.get("/account/api-tokens/")
    return client.cookies["csrftoken"].value


def test_the_page_needs_a_login_and_is_linked_from_the_header(alice_client):
    response = Client().get("/account/api-tokens/")
    assert response.status_code == 302 and response["Location"].startswith("/login/")
    assert 'href="/account/api-tokens/"' in alice_client.get("/scans/").content.decode()


def test_a_token_created_on_the_page_is_shown_once_then_listed_and_revocable(browser, user):
    response = browser.post(
        "/account/api-tokens/", {"name": "paperless", "expires_in_days": "7", "csrfmiddlewaretoken": csrf(browser)}
    )
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    shown = TOKEN.findall(response.content.decode())
    assert len(shown) == 1
    token = shown[0]
    assert tokens.authenticate_token(token).user == user
    row = ApiToken.objects.get()
    assert (row.name, row.expires_at is not None) == ("paperless", True)

    listing = browser.get("/account/api-tokens/").content.decode()
    assert token not in listing  # never again
    assert f"ocr_{row.prefix}_…" in listing and "paperless" in listing and "active" in listing

    # Revoking needs the CSRF token.
    assert browser.post(f"/account/api-tokens/{row.pk}/revoke/").status_code == 403
    response = browser.post(f"/account/api-tokens/{row.pk}/revoke/", {"csrfmiddlewaretoken": csrf(browser)})
    assert response.status_code == 302
    assert ApiToken.objects.get().revoked_at is not None
    assert "revoked" in browser.get("/account/api-tokens/").content.decode()
    assert Client().get("/api/v1/scans/", headers={"Authorization": f"Bearer {token}"}).status_code == 401


def test_the_page_refuses_a_bad_expiry_and_creates_nothing(browser):
    response = browser.post("/account/api-tokens/", {"name": "x", "expires_in_days": "0", "csrfmiddlewaretoken": csrf(browser)})
    assert response.status_code == 200
    assert "greater than or equal to 1" in response.content.decode()
    assert ApiToken.objects.count() == 0


def test_nobody_revokes_or_sees_another_users_token(browser, other_user):
    theirs = tokens.create_token(user=other_user, name="bob's secret tool")
    assert "bob&#x27;s secret tool" not in browser.get("/account/api-tokens/").content.decode()
    response = browser.post(f"/account/api-tokens/{theirs.row.pk}/revoke/", {"csrfmiddlewaretoken": csrf(browser)})
    assert response.status_code == 404
    assert ApiToken.objects.get().revoked_at is None


# --- admin -------------------------------------------------------------------------------------------


def test_admin_lists_tokens_without_the_secret_and_revokes_them(staff_client, user):
    created = tokens.create_token(user=user, name="ci")
    listing = staff_client.get("/admin/api/apitoken/").content.decode()
    assert "ci" in listing and created.row.prefix in listing
    assert created.token not in listing and created.row.digest not in listing
    assert staff_client.get("/admin/api/apitoken/add/").status_code == 403
    staff_client.post(
        "/admin/api/apitoken/", {"action": "revoke", "_selected_action": [created.row.pk], "index": 0}
    )
    assert ApiToken.objects.get().revoked_at is not None


# --- the command ----------------------------------------------------------------------------------


def run(*args: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("api_token", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_the_command_creates_prints_once_lists_and_revokes(user):
    out, err = run("create", "alice", "--name", "scanner", "--expires-days", "3")
    token = out.strip()
    assert TOKEN.fullmatch(token)
    assert "shown only this once" in err and "scanner" in err
    row = ApiToken.objects.get()
    assert tokens.authenticate_token(token).user == user
    assert timedelta(days=2, hours=23) < row.expires_at - timezone.now() <= timedelta(days=3)

    listing, _ = run("list", "alice")
    assert listing.startswith(f"{row.prefix}\talice\tscanner\tactive\texpires ")
    assert token not in listing

    out, _ = run("revoke", f"ocr_{row.prefix}")
    assert f"Revoked {row.prefix}" in out
    assert "revoked" in run("list")[0]
    assert "already revoked" in run("revoke", row.prefix)[0]


def test_the_command_refuses_unknown_users_prefixes_and_expiries(user):
    with pytest.raises(CommandError, match="no user named 'nobody'"):
        run("create", "nobody")
    with pytest.raises(CommandError, match="between 1 and 3650"):
        run("create", "alice", "--expires-days", "0")
    with pytest.raises(CommandError, match="no token with the prefix"):
        run("revoke", "deadbeef")
    assert ApiToken.objects.count() == 0
