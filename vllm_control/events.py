"""Model-server status events: typed payloads and the publisher.

Two variants of every status go out: the full one (with the server's recent log lines) to staff, and a
public one without log lines to everyone else. Publishing never raises into the caller.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone
from typing import Any, Literal, TypedDict

from channels.layers import get_channel_layer

logger = logging.getLogger(__name__)

SERVER_STATUS_GROUP = "server-status"
SERVER_STATUS_STAFF_GROUP = "server-status-staff"
EVENT_HANDLER = "live.event"
SEND_TIMEOUT_S = 5.0

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
    last_health_check: str | None
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


def _as_dict(status: Any) -> dict:
    if isinstance(status, dict):
        return dict(status)
    return status.to_dict()


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _opt_str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, tz=timezone.utc).isoformat()
    return str(value)


def status_data(status: Any, *, staff: bool) -> ServerStatusData:
    """The status as the payload a viewer may see (log lines only for staff)."""
    raw = _as_dict(status)
    return ServerStatusData(
        mode=str(raw.get("mode") or ""),
        state=str(raw.get("state") or "stopped"),  # type: ignore[typeddict-item]
        model=str(raw.get("model") or ""),
        base_url=str(raw.get("base_url") or ""),
        port=_opt_int(raw.get("port")),
        pid=_opt_int(raw.get("pid")),
        restart_count=int(raw.get("restart_count") or 0),
        uptime_s=_opt_float(raw.get("uptime_s")),
        last_health_check=_opt_str(raw.get("last_health_check")),
        last_error=_opt_str(raw.get("last_error")),
        log_tail=[str(line) for line in raw.get("log_tail") or []] if staff else [],
        served_models=[str(name) for name in raw.get("served_models") or []],
        server_version=_opt_str(raw.get("server_version")),
        latency_ms=_opt_float(raw.get("latency_ms")),
        supervised_here=bool(raw.get("supervised_here", False)),
    )


def status_event(status: Any, *, staff: bool) -> ServerStatusEvent:
    return ServerStatusEvent(type="server.status", status=status_data(status, staff=staff))


def snapshot_event(status: Any, *, staff: bool) -> ServerSnapshotEvent:
    return ServerSnapshotEvent(type="server.snapshot", status=status_data(status, staff=staff))


async def publish_server_status(status: Any) -> None:
    """Send a status change to the settings pages and header indicators (never raises)."""
    try:
        layer = get_channel_layer()
        if layer is None:
            return
        for group, staff in ((SERVER_STATUS_STAFF_GROUP, True), (SERVER_STATUS_GROUP, False)):
            message = {"type": EVENT_HANDLER, "payload": status_event(status, staff=staff)}
            await asyncio.wait_for(layer.group_send(group, message), SEND_TIMEOUT_S)
    except Exception:
        logger.warning("Could not publish the model server's status", exc_info=True)
