"""The live WebSockets against the real ASGI application (origin check, session auth, routing)."""

from __future__ import annotations

import json
import logging
import time

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.db import transaction
from django.test import Client
from django.utils import timezone

from ocrsite import live
from ocrsite.asgi import application
from scans import events as scan_events
from scans import progress
from scans.models import Page, Scan
from tests.support import free_port
from tests.test_live_schema import EVENTS_BY_TYPE, check_event
from vllm_control import events
from vllm_control.status import ServerState, ServerStatus

pytestmark = pytest.mark.django_db(transaction=True)

ORIGIN = b"http://127.0.0.1"
TIMEOUT = 5


def session_headers(user, origin: bytes = ORIGIN) -> list[tuple[bytes, bytes]]:
    """A real session for `user`, as the browser would send it to the socket."""
    client = Client()
    client.force_login(user)
    return [(b"cookie", f"sessionid={client.cookies['sessionid'].value}".encode()), (b"origin", origin)]


def make_scan(owner, pages: int = 3, **fields) -> Scan:
    values = dict(
        owner=owner,
        file="scans/none.pdf",
        original_filename="letters.pdf",
        content_type="application/pdf",
        size=1234,
        sha256="0" * 64,
        page_count=pages,
    )
    values.update(fields)
    scan = Scan.objects.create(**values)
    Page.objects.bulk_create(Page(scan=scan, number=n) for n in range(1, pages + 1))
    return scan


@pytest.fixture
def alice_scan(user) -> Scan:
    return make_scan(user)


@pytest.fixture
def bob_scan(other_user) -> Scan:
    return make_scan(other_user, pages=2, original_filename="bob.pdf")


async def connect(path: str, headers) -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(application, path, headers=headers)
    connected, _ = await communicator.connect(timeout=TIMEOUT)
    assert connected
    return communicator


async def receive(communicator: WebsocketCommunicator) -> dict:
    payload = await communicator.receive_json_from(timeout=TIMEOUT)
    check_event(payload)
    return payload


async def closed_with(communicator: WebsocketCommunicator) -> int:
    message = await communicator.receive_output(timeout=TIMEOUT)
    assert message["type"] == "websocket.close", message
    return message["code"]


async def finish_page(page_id: int, text: str, **fields) -> Page:
    now = timezone.now()
    values = dict(status=Page.Status.DONE, text=text, attempts=1, latency_ms=420, finished_at=now)
    values.update(fields)
    await Page.objects.filter(pk=page_id).aupdate(**values)
    return await Page.objects.aget(pk=page_id)


# --- authentication and authorization ----------------------------------------------------------------


@pytest.mark.parametrize("path", ["/ws/scans/", "/ws/scans/1/", "/ws/server/"])
async def test_anonymous_sockets_are_closed_with_4401(path):
    communicator = await connect(path, [(b"origin", ORIGIN)])
    assert await closed_with(communicator) == 4401


async def test_foreign_origin_is_refused(user, alice_scan):
    headers = await sync_to_async(session_headers)(user, origin=b"http://evil.example")
    communicator = WebsocketCommunicator(application, f"/ws/scans/{alice_scan.pk}/", headers=headers)
    connected, _ = await communicator.connect(timeout=TIMEOUT)
    assert not connected


async def test_another_users_scan_is_closed_with_4403(user, bob_scan):
    headers = await sync_to_async(session_headers)(user)
    communicator = await connect(f"/ws/scans/{bob_scan.pk}/", headers)
    assert await closed_with(communicator) == 4403
    missing = await connect("/ws/scans/999999/", headers)
    assert await closed_with(missing) == 4403


async def test_a_superuser_may_watch_anyone_s_scan(staff_user, bob_scan):
    headers = await sync_to_async(session_headers)(staff_user)
    communicator = await connect(f"/ws/scans/{bob_scan.pk}/", headers)
    snapshot = await receive(communicator)
    assert snapshot["type"] == "scan.snapshot" and snapshot["scan"]["id"] == bob_scan.pk
    await communicator.disconnect()


# --- the scan socket ---------------------------------------------------------------------------------


async def test_snapshot_on_connect_and_again_on_reconnect(user, alice_scan):
    headers = await sync_to_async(session_headers)(user)
    pages = [p async for p in Page.objects.filter(scan=alice_scan).order_by("number")]
    await finish_page(pages[0].pk, "PAGE 1\n\nHello")
    await Page.objects.filter(pk=pages[1].pk).aupdate(status=Page.Status.FAILED, error="timed out", attempts=3)

    communicator = await connect(f"/ws/scans/{alice_scan.pk}/", headers)
    snapshot = await receive(communicator)
    assert snapshot["type"] == "scan.snapshot"
    assert [(p["number"], p["status"]) for p in snapshot["pages"]] == [(1, "done"), (2, "failed"), (3, "pending")]
    assert snapshot["pages"][0]["preview"] == "PAGE 1\n\nHello"
    assert snapshot["pages"][1]["error"] == "timed out"
    totals = snapshot["totals"]
    assert (totals["total"], totals["done"], totals["failed"], totals["pending"]) == (3, 1, 1, 1)
    await communicator.disconnect()

    # Whatever happened while disconnected is in the next snapshot.
    await finish_page(pages[2].pk, "PAGE 3")
    again = await connect(f"/ws/scans/{alice_scan.pk}/", headers)
    snapshot = await receive(again)
    assert [p["status"] for p in snapshot["pages"]] == ["done", "failed", "done"]
    await again.send_json_to({"type": "resync"})
    assert (await receive(again))["type"] == "scan.snapshot"
    await again.disconnect()


async def test_page_update_and_totals_after_a_page_commit(user, alice_scan):
    headers = await sync_to_async(session_headers)(user)
    communicator = await connect(f"/ws/scans/{alice_scan.pk}/", headers)
    await receive(communicator)
    first = await Page.objects.aget(scan=alice_scan, number=1)

    page = await finish_page(first.pk, "PAGE 1 " + "x" * 1000)
    await progress.apublish_page(page)

    update = await receive(communicator)
    assert update["type"] == "page.update" and update["scan_id"] == alice_scan.pk
    assert update["page"]["number"] == 1 and update["page"]["status"] == "done"
    assert update["page"]["latency_ms"] == 420 and update["page"]["attempts"] == 1
    assert update["page"]["preview"] == page.text[: scan_events.PREVIEW_CHARS]
    assert update["page"]["text_length"] == len(page.text)
    totals = await receive(communicator)
    assert totals["type"] == "scan.progress" and totals["totals"]["done"] == 1
    assert totals["totals"]["pages_per_s"] is not None and totals["totals"]["pages_per_s"] > 0
    assert totals["totals"]["eta_s"] is not None
    assert await communicator.receive_nothing(timeout=0.2)
    await communicator.disconnect()


async def test_script_in_page_text_arrives_as_data(user, alice_scan):
    headers = await sync_to_async(session_headers)(user)
    communicator = await connect(f"/ws/scans/{alice_scan.pk}/", headers)
    await receive(communicator)
    evil = '<script>window.pwned = 1</script><img src=x onerror="window.pwned=2">'
    first = await Page.objects.aget(scan=alice_scan, number=1)
    await progress.apublish_page(await finish_page(first.pk, evil))
    raw = await communicator.receive_from(timeout=TIMEOUT)
    assert json.loads(raw)["page"]["preview"] == evil  # a JSON string: the browser decides how to show it
    await communicator.disconnect()


async def test_status_change_resyncs_with_a_snapshot(user, alice_scan):
    headers = await sync_to_async(session_headers)(user)
    communicator = await connect(f"/ws/scans/{alice_scan.pk}/", headers)
    await receive(communicator)
    # Work starting changes no page: its totals go through as they are.
    await Scan.objects.filter(pk=alice_scan.pk).aupdate(status=Scan.Status.PROCESSING, started_at=timezone.now())
    await progress.apublish_scan(alice_scan.pk)
    progress_event = await receive(communicator)
    assert progress_event["type"] == "scan.progress" and progress_event["totals"]["status"] == "processing"
    # Any other change may have touched many pages at once: a snapshot.
    await Scan.objects.filter(pk=alice_scan.pk).aupdate(status=Scan.Status.CANCELLED, finished_at=timezone.now())
    await progress.apublish_scan(alice_scan.pk)
    snapshot = await receive(communicator)
    assert snapshot["type"] == "scan.snapshot" and snapshot["scan"]["status"] == "cancelled"
    assert snapshot["totals"]["eta_s"] == 0
    await communicator.disconnect()


async def test_events_older_than_the_snapshot_are_dropped(user, alice_scan):
    headers = await sync_to_async(session_headers)(user)
    communicator = await connect(f"/ws/scans/{alice_scan.pk}/", headers)
    await receive(communicator)
    layer = get_channel_layer()
    stale = {"type": "page.update", "scan_id": alice_scan.pk, "page": {}}
    await layer.group_send(scan_events.scan_group(alice_scan.pk), {"type": "live.event", "payload": stale, "read_at": 0.0})
    assert await communicator.receive_nothing(timeout=0.3)
    await communicator.disconnect()


# --- the scan list socket ----------------------------------------------------------------------------


async def test_list_snapshot_holds_only_the_users_scans(user, staff_user, alice_scan, bob_scan):
    communicator = await connect("/ws/scans/", await sync_to_async(session_headers)(user))
    snapshot = await receive(communicator)
    assert snapshot["type"] == "scans.snapshot"
    assert [item["id"] for item in snapshot["scans"]] == [alice_scan.pk]
    assert snapshot["scans"][0]["page_count"] == 3 and snapshot["scans"][0]["owner"] == "alice"
    await communicator.disconnect()

    staff = await connect("/ws/scans/", await sync_to_async(session_headers)(staff_user))
    snapshot = await receive(staff)
    assert {item["id"] for item in snapshot["scans"]} == {alice_scan.pk, bob_scan.pk}
    await staff.disconnect()


async def test_publish_on_commit_from_a_sync_thread(user, staff_user, alice_scan, bob_scan):
    """Sync views under ASGI run in a thread without a loop: the event goes out once, after commit."""
    own = await connect("/ws/scans/", await sync_to_async(session_headers)(user))
    staff = await connect("/ws/scans/", await sync_to_async(session_headers)(staff_user))
    await receive(own)
    await receive(staff)

    class Rollback(Exception):
        pass

    def change(scan: Scan, commit: bool) -> None:
        try:
            with transaction.atomic():
                Scan.objects.filter(pk=scan.pk).update(status=Scan.Status.PROCESSING)
                progress.publish_scan_on_commit(scan.pk)
                if not commit:
                    raise Rollback
        except Rollback:
            pass

    await sync_to_async(change)(alice_scan, False)
    assert await own.receive_nothing(timeout=0.3)

    await sync_to_async(change)(alice_scan, True)
    item = await receive(own)
    assert item["type"] == "scans.list_item" and item["scan"]["id"] == alice_scan.pk
    assert item["scan"]["status"] == "processing"
    assert (await receive(staff))["scan"]["id"] == alice_scan.pk

    await sync_to_async(change)(bob_scan, True)
    assert (await receive(staff))["scan"]["id"] == bob_scan.pk
    assert await own.receive_nothing(timeout=0.3)  # alice never hears about bob's scan
    await own.disconnect()
    await staff.disconnect()


# --- the server status socket ------------------------------------------------------------------------


def _status(**overrides) -> ServerStatus:
    values = dict(mode="local", state=ServerState.STARTING, model="m", pid=4321, port=8000, log_tail=["INFO booting"])
    values.update(overrides)
    return ServerStatus(**values)


async def test_server_status_snapshot_then_updates_with_logs_for_staff_only(user, staff_user):
    plain = await connect("/ws/server/", await sync_to_async(session_headers)(user))
    staff = await connect("/ws/server/", await sync_to_async(session_headers)(staff_user))
    for communicator in (plain, staff):
        snapshot = await receive(communicator)
        assert snapshot["type"] == "server.snapshot"

    await events.publish_server_status(_status(state=ServerState.READY))
    staff_event, plain_event = await receive(staff), await receive(plain)
    assert staff_event["type"] == plain_event["type"] == "server.status"
    assert staff_event["status"]["state"] == plain_event["status"]["state"] == "ready"
    assert staff_event["status"]["log_tail"] == ["INFO booting"]
    assert plain_event["status"]["log_tail"] == []
    assert staff_event["status"]["pid"] == 4321
    await plain.disconnect()
    await staff.disconnect()


# --- robustness and the schema ----------------------------------------------------------------------


async def test_publishing_never_raises_when_the_channel_layer_is_down(settings, user, alice_scan):
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [f"redis://127.0.0.1:{free_port()}/0"]},
        }
    }
    page = await Page.objects.aget(scan=alice_scan, number=1)
    started = time.monotonic()
    await progress.apublish_page(page)
    await progress.apublish_scan(alice_scan.pk)
    await events.publish_server_status(_status())
    await sync_to_async(progress.publish_scan_on_commit)(alice_scan.pk)
    assert time.monotonic() - started < 60  # bounded by the send timeout, not hanging


async def test_every_event_type_the_code_emits_is_declared_and_matches(user, staff_user, alice_scan):
    headers = await sync_to_async(session_headers)(user)
    seen: set[str] = set()
    scan_socket = await connect(f"/ws/scans/{alice_scan.pk}/", headers)
    list_socket = await connect("/ws/scans/", headers)
    server_socket = await connect("/ws/server/", headers)
    for communicator in (scan_socket, list_socket, server_socket):
        seen.add((await receive(communicator))["type"])

    first = await Page.objects.aget(scan=alice_scan, number=1)
    await progress.apublish_page(await finish_page(first.pk, "PAGE 1", fallback=True))
    for _ in range(2):
        seen.add((await receive(scan_socket))["type"])
    seen.add((await receive(list_socket))["type"])
    await events.publish_server_status(_status(state=ServerState.FAILED, last_error="boom"))
    seen.add((await receive(server_socket))["type"])
    await server_socket.send_to(text_data="not json")
    seen.add((await receive(server_socket))["type"])
    manager_socket = await connect("/ws/server/", await sync_to_async(session_headers)(staff_user))
    await receive(manager_socket)
    await events.publish_endpoints([])  # the endpoints' figures: to people who manage the server
    seen.add((await receive(manager_socket))["type"])
    await manager_socket.disconnect()

    assert seen == set(EVENTS_BY_TYPE)
    for communicator in (scan_socket, list_socket, server_socket):
        await communicator.disconnect()


# --- frames the browser should not send, and signing out ---------------------------------------------


async def test_malformed_frames_are_answered_and_the_socket_stays_open(user, alice_scan, caplog, monkeypatch):
    monkeypatch.setattr(live, "_refused_frames", live._LogThrottle(live.LOG_INTERVAL_S))
    caplog.set_level(logging.WARNING, logger="ocrsite.live")
    communicator = await connect(f"/ws/scans/{alice_scan.pk}/", await sync_to_async(session_headers)(user))
    await receive(communicator)
    for frame, reason in (
        ({"text_data": "not json"}, "the frame is not JSON"),
        ({"text": ""}, "the frame is not JSON"),  # the communicator's send_to refuses an empty text
        ({"text_data": "[1, 2]"}, "the frame is not a JSON object"),
        ({"text_data": '"resync"'}, "the frame is not a JSON object"),
        ({"bytes_data": b"\x00\xff"}, "binary frames are not accepted"),
        ({"text_data": '{"type": "delete_everything"}'}, "unknown message type 'delete_everything'"),
        ({"text_data": '{"no": "type"}'}, "unknown message type 'None'"),
    ):
        if "text" in frame:
            await communicator.send_input({"type": "websocket.receive", **frame})
        else:
            await communicator.send_to(**frame)
        answer = await receive(communicator)
        assert answer["type"] == "socket.error" and answer["message"].startswith(reason), (frame, answer)

    # Still open and working: a resync, then a live event.
    await communicator.send_json_to({"type": "resync"})
    assert (await receive(communicator))["type"] == "scan.snapshot"
    first = await Page.objects.aget(scan=alice_scan, number=1)
    await progress.apublish_page(await finish_page(first.pk, "PAGE 1"))
    assert [(await receive(communicator))["type"] for _ in range(2)] == ["page.update", "scan.progress"]

    # One log line for the lot, without a traceback; the next one counts what was left out.
    refused = [record for record in caplog.records if "Refused a WebSocket frame" in record.getMessage()]
    assert len(refused) == 1 and refused[0].exc_info is None
    assert refused[0].getMessage() == f"Refused a WebSocket frame on /ws/scans/{alice_scan.pk}/: the frame is not JSON"
    live._refused_frames.next_at = 0.0
    await communicator.send_to(text_data="{")
    assert (await receive(communicator))["type"] == "socket.error"
    refused = [record for record in caplog.records if "Refused a WebSocket frame" in record.getMessage()]
    assert len(refused) == 2 and refused[1].getMessage().endswith("(and 6 more in the previous 60 s)")
    await communicator.disconnect()


async def test_signing_out_closes_that_sessions_sockets(user, alice_scan):
    browser, other_browser = Client(), Client()
    await sync_to_async(browser.force_login)(user)
    await sync_to_async(other_browser.force_login)(user)

    def headers(client: Client):
        return [(b"cookie", f"sessionid={client.cookies['sessionid'].value}".encode()), (b"origin", ORIGIN)]

    sockets = [await connect(path, headers(browser)) for path in (f"/ws/scans/{alice_scan.pk}/", "/ws/scans/", "/ws/server/")]
    elsewhere = await connect(f"/ws/scans/{alice_scan.pk}/", headers(other_browser))
    for communicator in (*sockets, elsewhere):
        await receive(communicator)

    response = await sync_to_async(browser.post)("/logout/")
    assert response.status_code == 302
    for communicator in sockets:
        assert await closed_with(communicator) == 4401

    # No page text reaches the signed-out sockets; the other session's socket carries on.
    first = await Page.objects.aget(scan=alice_scan, number=1)
    await progress.apublish_page(await finish_page(first.pk, "PAGE 1 private text"))
    assert (await receive(elsewhere))["page"]["preview"] == "PAGE 1 private text"
    assert await sockets[0].receive_nothing(timeout=0.3)
    await elsewhere.disconnect()


async def test_endpoint_figures_reach_the_managers_settings_page_live(user, staff_user):
    from vllm_control.config import Endpoint
    from vllm_control.external import ProbeResult
    from vllm_control.router import Router

    async def healthy(endpoint, model):
        return ProbeResult(True, True, False)

    plain = await connect("/ws/server/", await sync_to_async(session_headers)(user))
    staff = await connect("/ws/server/", await sync_to_async(session_headers)(staff_user))
    for communicator in (plain, staff):
        assert (await receive(communicator))["type"] == "server.snapshot"
    router = Router(probe=healthy)
    router.configure((
        Endpoint(key="main", name="gpu1", kind="external", base_url="http://gpu1:8000/v1", capacity=4, api_key="sk-LIVE"),
        Endpoint(key="server-1", name="gpu2", kind="external", base_url="http://gpu2:8000/v1", capacity=4),
    ), model="m")
    await router.check_now()  # both come into the rotation: a change, published

    event = await receive(staff)
    check_event(event)
    assert event["type"] == "server.endpoints"
    assert [(e["key"], e["state"], e["in_flight"]) for e in event["endpoints"]] == [("main", "ready", 0), ("server-1", "ready", 0)]
    assert "sk-LIVE" not in json.dumps(event)
    assert await plain.receive_nothing(timeout=0.2), "endpoint details go to people who manage the server only"
    await plain.disconnect()
    await staff.disconnect()
