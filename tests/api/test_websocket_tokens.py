"""The live WebSockets accept an API token in the handshake's Authorization header (programs), and
keep the session and Origin check for browsers."""

from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator

from api import tokens
from ocrsite.asgi import application
from ocrsite.live import CLOSE_FORBIDDEN, CLOSE_UNAUTHENTICATED
from tests.api.conftest import make_scan
from tests.test_live_consumers import closed_with as close_code
from tests.test_live_consumers import connect as open_socket
from tests.test_live_consumers import session_headers

pytestmark = pytest.mark.django_db(transaction=True)

TIMEOUT = 5


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {token}".encode())]


async def test_a_token_follows_its_users_scan_without_an_origin(user):
    scan = await sync_to_async(make_scan)(user, pages=2)
    created = await sync_to_async(tokens.create_token)(user=user, name="ws")
    socket = await open_socket(f"/ws/scans/{scan.pk}/", bearer(created.token))
    snapshot = await socket.receive_json_from(timeout=TIMEOUT)
    assert snapshot["type"] == "scan.snapshot"
    assert snapshot["scan"]["id"] == scan.pk and [p["number"] for p in snapshot["pages"]] == [1, 2]
    await socket.disconnect()

    listing = await open_socket("/ws/scans/", bearer(created.token))
    assert [item["id"] for item in (await listing.receive_json_from(timeout=TIMEOUT))["scans"]] == [scan.pk]
    await listing.disconnect()

    server = await open_socket("/ws/server/", bearer(created.token))
    status = (await server.receive_json_from(timeout=TIMEOUT))["status"]
    assert status["log_tail"] == []
    await server.disconnect()


async def test_another_users_scan_is_forbidden_to_a_token(user, other_user):
    scan = await sync_to_async(make_scan)(user)
    theirs = await sync_to_async(tokens.create_token)(user=other_user, name="bob")
    socket = await open_socket(f"/ws/scans/{scan.pk}/", bearer(theirs.token))
    assert await close_code(socket) == CLOSE_FORBIDDEN


@pytest.mark.parametrize("state", ["wrong", "revoked", "expired", "empty"])
async def test_a_bad_token_is_closed_as_unauthenticated_even_with_a_session(user, state):
    scan = await sync_to_async(make_scan)(user)
    created = await sync_to_async(tokens.create_token)(user=user, name="ws", expires_in_days=1)
    token = created.token
    if state == "wrong":
        token = token[:-2] + "xx"
    elif state == "revoked":
        await sync_to_async(tokens.revoke_token)(token=created.row)
    elif state == "expired":
        created.row.expires_at = created.row.created_at
        await created.row.asave()
    elif state == "empty":
        token = ""
    # A valid session next to a bad token does not rescue it: the header decides.
    headers = await sync_to_async(session_headers)(user)
    socket = await open_socket(f"/ws/scans/{scan.pk}/", [*headers, *bearer(token)])
    assert await close_code(socket) == CLOSE_UNAUTHENTICATED


async def test_sessions_still_work_and_still_need_an_allowed_origin(user):
    scan = await sync_to_async(make_scan)(user)
    headers = await sync_to_async(session_headers)(user)
    socket = await open_socket(f"/ws/scans/{scan.pk}/", headers)
    assert (await socket.receive_json_from(timeout=TIMEOUT))["type"] == "scan.snapshot"
    await socket.disconnect()
    foreign = await sync_to_async(session_headers)(user, b"http://evil.example")
    communicator = WebsocketCommunicator(application, f"/ws/scans/{scan.pk}/", headers=foreign)
    connected, _ = await communicator.connect(timeout=TIMEOUT)
    assert not connected
