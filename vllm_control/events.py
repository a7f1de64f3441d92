"""Model-server status events: typed payloads, the one function that turns a status into its payload,
and the publisher.

Two variants of every status go out: the full one (with the server's recent log lines) to staff, and a
public one without log lines to everyone else. Publishing never raises into the caller.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Literal, TypedDict

from ocrsite import live
from vllm_control.status import ServerStatus

SERVER_STATUS_GROUP = "server-status"
SERVER_STATUS_STAFF_GROUP = "server-status-staff"

ServerStateName = Literal["stopped", "starting", "ready", "unhealthy", "stopping", "failed"]


class ServerStatusData(TypedDict):
    mode: str
    state: ServerStateName
    model: str
    base_url: str
    port: int | None
    pid: int | None
    restart_count: int
    uptime_s: float | None
    last_health_check: str | None  # ISO 8601, UTC
    last_error: str | None
    log_tail: list[str]  # empty for non-staff
    served_models: list[str]
    server_version: str | None
    latency_ms: float | None
    supervised_here: bool


class ServerStatusEvent(TypedDict):
    type: Literal["server.status"]
    status: ServerStatusData


class ServerSnapshotEvent(TypedDict):
    type: Literal["server.snapshot"]
    status: ServerStatusData


SERVER_EVENT_TYPES: tuple[type, ...] = (ServerStatusEvent, ServerSnapshotEvent)


def status_payload(status: ServerStatus, *, staff: bool) -> ServerStatusData:
    """The status as a viewer may see it: log lines only for staff."""
    data = asdict(status)
    data["state"] = str(status.state)
    if not staff:
        data["log_tail"] = []
    return data  # type: ignore[return-value]


def status_event(status: ServerStatus, *, staff: bool) -> ServerStatusEvent:
    return ServerStatusEvent(type="server.status", status=status_payload(status, staff=staff))


def snapshot_event(status: ServerStatus, *, staff: bool) -> ServerSnapshotEvent:
    return ServerSnapshotEvent(type="server.snapshot", status=status_payload(status, staff=staff))


async def publish_server_status(status: ServerStatus) -> None:
    """Send a status change to the settings pages and header indicators (never raises)."""
    messages = [
        (SERVER_STATUS_STAFF_GROUP, status_event(status, staff=True)),
        (SERVER_STATUS_GROUP, status_event(status, staff=False)),
    ]
    await live.publish(messages, read_at=time.time(), what="the model server's status")
