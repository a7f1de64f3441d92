"""The permission model (README, "Permissions"), role by role, on pages, control endpoints, admin and WebSockets.

Roles: a plain user; a staff user without permissions (the staff flag alone must grant nothing); staff with
`vllm_control.change_vlmsettings` (manages the model server); staff with `scans.view_all_scans` (sees every
user's scans); a superuser (everything).
"""

from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async
from django.test import Client

from scans.models import Scan
from tests.foundation.test_settings_page import form_data
from tests.test_live_consumers import closed_with, connect, make_scan, receive, session_headers
from vllm_control import events
from vllm_control.models import VLMSettings
from vllm_control.status import ServerState, ServerStatus

pytestmark = pytest.mark.django_db
SOCKETS = pytest.mark.django_db(transaction=True)  # the consumers read the database from other threads

MANAGE = "vllm_control.change_vlmsettings"
VIEW_ALL = "scans.view_all_scans"
ROLES = ("plain", "staff", "manager", "viewer", "superuser")
CONTROL = ("start", "stop", "restart", "test")


@pytest.fixture
def people(user_with, django_user_model) -> dict:
    return {
        "plain": user_with("plain"),
        "staff": user_with("staffer", staff=True),
        "manager": user_with("manager", MANAGE, staff=True),
        "viewer": user_with("viewer", VIEW_ALL, staff=True),
        "superuser": django_user_model.objects.create_superuser("boss", password=None),
    }


@pytest.fixture
def bobs_scan(other_user) -> Scan:
    return make_scan(other_user, pages=2, original_filename="bobs-private.pdf")


def client_for(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def header_links(page: str) -> set[str]:
    nav = page.split("<nav>", 1)[1].split("</nav>", 1)[0]
    return {name for name in ("Settings", "Admin") if f">{name}</a>" in nav}


# --- pages ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "settings_status", "links"),
    [
        ("plain", 403, set()),
        ("staff", 403, set()),  # the admin would be empty for them: no link to it either
        ("manager", 200, {"Settings", "Admin"}),
        ("viewer", 403, set()),
        ("superuser", 200, {"Settings", "Admin"}),
    ],
)
def test_settings_page_and_header_links(people, role, settings_status, links):
    client = client_for(people[role])
    assert client.get("/settings/").status_code == settings_status
    assert header_links(client.get("/scans/").content.decode()) == links


@pytest.mark.parametrize("role", ["plain", "staff", "viewer"])
def test_saving_settings_without_the_permission_changes_nothing(people, role):
    before = VLMSettings.load()
    response = client_for(people[role]).post("/settings/", form_data(serve_args="--trust-remote-code"))
    assert response.status_code == 403
    assert VLMSettings.load().serve_args == before.serve_args == ""


@pytest.mark.parametrize("role", ["manager", "superuser"])
def test_saving_settings_with_the_permission(people, role):
    response = client_for(people[role]).post("/settings/", form_data(serve_args="--enforce-eager"))
    assert response.status_code == 302
    assert VLMSettings.load().serve_args == "--enforce-eager"


@pytest.mark.parametrize(
    ("role", "sees_all"),
    [("plain", False), ("staff", False), ("manager", False), ("viewer", True), ("superuser", True)],
)
def test_other_peoples_scans_need_the_view_all_permission(people, bobs_scan, role, sees_all):
    client = client_for(people[role])
    assert ("bobs-private.pdf" in client.get("/scans/").content.decode()) is sees_all
    for url in (f"/scans/{bobs_scan.pk}/", f"/scans/{bobs_scan.pk}/download.json", f"/scans/{bobs_scan.pk}/pages/1/text.txt"):
        assert client.get(url).status_code == (200 if sees_all else 404), url


def test_seeing_a_scan_is_not_acting_on_it(people, bobs_scan):
    viewer = client_for(people["viewer"])
    page = viewer.get(f"/scans/{bobs_scan.pk}/").content.decode()
    assert "/cancel/" not in page and "/delete/" not in page  # no buttons for what would be refused
    for action in ("cancel", "retry", "delete"):
        assert viewer.post(f"/scans/{bobs_scan.pk}/{action}/").status_code == 403
    bobs_scan.refresh_from_db()
    assert bobs_scan.status == Scan.Status.QUEUED
    boss = client_for(people["superuser"])
    assert "/delete/" in boss.get(f"/scans/{bobs_scan.pk}/").content.decode()
    assert boss.post(f"/scans/{bobs_scan.pk}/cancel/").status_code == 302
    bobs_scan.refresh_from_db()
    assert bobs_scan.status == Scan.Status.CANCELLED


# --- control endpoints ---------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_server_control_needs_the_permission(people, role):
    """Built-in mode: a permitted call reaches the action (which explains why it does nothing here)."""
    client = client_for(people[role])
    for action in CONTROL:
        answer = client.post(f"/settings/server/{action}/")
        if role in ("manager", "superuser"):
            assert answer.status_code in (200, 400), action
            assert "permission" not in answer.json()["message"]
        else:
            assert answer.status_code == 403, action
            assert answer.json() == {
                "ok": False, "message": "You do not have the permission to manage the model server.", "status": None
            }


def test_server_control_answers_401_to_anonymous_clients(client):
    for action in CONTROL:
        assert client.post(f"/settings/server/{action}/").status_code == 401


# --- admin ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "expected"), [("staff", 403), ("viewer", 403), ("manager", 200), ("superuser", 200)]
)
def test_admin_settings_need_the_permission(people, role, expected):
    VLMSettings.load()
    assert client_for(people[role]).get("/admin/vllm_control/vlmsettings/1/change/").status_code == expected


def test_admin_settings_cannot_be_read_or_created_with_view_or_no_permission(user_with):
    reader = client_for(user_with("reader", "vllm_control.view_vlmsettings", staff=True))
    nobody = client_for(user_with("nobody", staff=True))
    assert not VLMSettings.objects.exists()
    assert nobody.get("/admin/vllm_control/vlmsettings/add/").status_code == 403
    assert nobody.post("/admin/vllm_control/vlmsettings/add/", {"serve_args": "--trust-remote-code"}).status_code == 403
    assert not VLMSettings.objects.exists()
    row = VLMSettings.load()
    row.local_api_key = "sk-LOCAL-SECRET"
    row.save()
    # A read-only change page would print the write-only secrets: viewing needs the change permission too.
    assert reader.get("/admin/vllm_control/vlmsettings/1/change/").status_code == 403


def test_admin_lists_other_peoples_scans_only_with_view_all(user_with, other_user, bobs_scan):
    own = user_with("clerk", "scans.view_scan", "scans.view_page", staff=True)
    make_scan(own, original_filename="clerks-own.pdf")
    clerk = client_for(own)
    listing = clerk.get("/admin/scans/scan/").content.decode()
    assert "clerks-own.pdf" in listing and "bobs-private.pdf" not in listing
    assert clerk.get(f"/admin/scans/scan/{bobs_scan.pk}/change/").status_code == 302  # "does not exist"
    assert "bobs-private.pdf" not in clerk.get("/admin/scans/page/").content.decode()
    chief = client_for(user_with("chief", "scans.view_scan", VIEW_ALL, staff=True))
    assert "bobs-private.pdf" in chief.get("/admin/scans/scan/").content.decode()


# --- WebSockets ---------------------------------------------------------------------------------------------


@SOCKETS
@pytest.mark.parametrize(
    ("role", "sees_all"),
    [("plain", False), ("staff", False), ("manager", False), ("viewer", True), ("superuser", True)],
)
async def test_scan_sockets_follow_the_view_all_permission(people, bobs_scan, role, sees_all):
    headers = await sync_to_async(session_headers)(people[role])
    scan_socket = await connect(f"/ws/scans/{bobs_scan.pk}/", headers)
    if sees_all:
        assert (await receive(scan_socket))["scan"]["id"] == bobs_scan.pk
        await scan_socket.disconnect()
    else:
        assert await closed_with(scan_socket) == 4403
    list_socket = await connect("/ws/scans/", headers)
    snapshot = await receive(list_socket)
    assert (bobs_scan.pk in {item["id"] for item in snapshot["scans"]}) is sees_all
    await list_socket.disconnect()


@SOCKETS
@pytest.mark.parametrize(
    ("role", "detailed"),
    [("plain", False), ("staff", False), ("manager", True), ("viewer", False), ("superuser", True)],
)
async def test_server_socket_details_need_the_permission(people, role, detailed):
    communicator = await connect("/ws/server/", await sync_to_async(session_headers)(people[role]))
    await receive(communicator)
    failure = ServerStatus(
        mode="local", state=ServerState.FAILED, model="m", last_error="vLLM exited. Last output: /opt/secret/path",
        log_tail=["Traceback ...", "/opt/secret/path"],
    )
    await events.publish_server_status(failure)
    shown = (await receive(communicator))["status"]
    if detailed:
        assert shown["last_error"] == failure.last_error and shown["log_tail"] == failure.log_tail
    else:
        assert shown["last_error"] == events.PUBLIC_ERROR and shown["log_tail"] == []
    await communicator.disconnect()
