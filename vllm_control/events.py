"""Model-server status events: typed payloads, the one function that turns a status into its payload,
and the publisher.

Two variants of every status go out: the detailed one (the server's error messages and recent log lines)
to people who may manage the server (`vllm_control.permissions`), and a public one to everyone else, whose
error is a generic sentence: vLLM's output can hold paths, hosts and anything else it printed. Credentials
inside URLs are hidden in both. Publishing never raises into the caller.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Literal, TypedDict

from ocrsite import live
from vllm_control.redaction import redact_urls
from vllm_control.status import EndpointStatus, ServerStatus

SERVER_STATUS_GROUP = "server-status"
SERVER_STATUS_DETAILED_GROUP = "server-status-detailed"
PUBLIC_ERROR = "The model server has a problem; someone who manages it can see the details on the settings page."

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
    last_error: str | None  # detailed: the message; public: PUBLIC_ERROR (or None when there is none)
    log_tail: list[str]  # empty in the public variant
    served_models: list[str]
    server_version: str | None
    latency_ms: float | None
    supervised_here: bool
    phase: str | None  # vLLM's start-up phase while starting (vllm_control.startup_phases.StartupPhase)
    phase_label: str | None
    phase_started_at: str | None  # ISO 8601, UTC
    phase_elapsed_s: float | None
    idle: bool  # stopped by the idle timeout; the next page that needs it starts it


class ServerStatusEvent(TypedDict):
    type: Literal["server.status"]
    status: ServerStatusData


class ServerSnapshotEvent(TypedDict):
    type: Literal["server.snapshot"]
    status: ServerStatusData


class EndpointStatusData(TypedDict):
    key: str
    name: str
    kind: Literal["local", "external"]
    base_url: str
    state: ServerStateName
    capacity: int
    in_flight: int | None
    pages_per_s: float | None
    latency_ms: float | None
    last_error: str | None  # detailed only (the endpoints event goes to people who manage the server)
    last_health_check: str | None
    port: int | None
    cuda_visible_devices: str


class EndpointsEvent(TypedDict):
    """The endpoints as this process's router sees them (sent at most every second while they change)."""

    type: Literal["server.endpoints"]
    endpoints: list[EndpointStatusData]


SERVER_EVENT_TYPES: tuple[type, ...] = (ServerStatusEvent, ServerSnapshotEvent, EndpointsEvent)


def status_payload(status: ServerStatus, *, detailed: bool) -> ServerStatusData:
    """The status as a viewer may see it: error details and log lines only when `detailed`."""
    data = asdict(status)
    data["state"] = str(status.state)
    data["base_url"] = redact_urls(status.base_url)
    if detailed:
        data["last_error"] = redact_urls(status.last_error) if status.last_error else status.last_error
        data["log_tail"] = [redact_urls(line) for line in status.log_tail]
    else:
        data["last_error"] = PUBLIC_ERROR if status.last_error else None
        data["log_tail"] = []
    return data  # type: ignore[return-value]


def endpoint_payload(status: EndpointStatus) -> EndpointStatusData:
    """An endpoint as the settings page and `vllm_status --json` show it: credentials in URLs hidden
    (an API key is never part of it)."""
    data = asdict(status)
    data["state"] = str(status.state)
    data["name"] = redact_urls(status.name)
    data["base_url"] = redact_urls(status.base_url)
    data["last_error"] = redact_urls(status.last_error) if status.last_error else None
    return data  # type: ignore[return-value]


def endpoints_event(statuses: list[EndpointStatus]) -> EndpointsEvent:
    return EndpointsEvent(type="server.endpoints", endpoints=[endpoint_payload(status) for status in statuses])


def status_event(status: ServerStatus, *, detailed: bool) -> ServerStatusEvent:
    return ServerStatusEvent(type="server.status", status=status_payload(status, detailed=detailed))


def snapshot_event(status: ServerStatus, *, detailed: bool) -> ServerSnapshotEvent:
    return ServerSnapshotEvent(type="server.snapshot", status=status_payload(status, detailed=detailed))


async def publish_server_status(status: ServerStatus) -> None:
    """Send a status change to the settings pages and header indicators (never raises)."""
    messages = [
        (SERVER_STATUS_DETAILED_GROUP, status_event(status, detailed=True)),
        (SERVER_STATUS_GROUP, status_event(status, detailed=False)),
    ]
    await live.publish(messages, read_at=time.time(), what="the model server's status")


async def publish_endpoints(statuses: list[EndpointStatus]) -> None:
    """Send the endpoints' figures to the settings pages of people who manage the server (never raises)."""
    await live.publish(
        [(SERVER_STATUS_DETAILED_GROUP, endpoints_event(statuses))], read_at=time.time(), what="the endpoints' status"
    )
