"""The one status type for every mode; `vllm_control.events.status_payload` turns it into what the
settings page, the live events and `vllm_status --json` show."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class ServerState(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    STOPPING = "stopping"
    FAILED = "failed"


@dataclass
class ServerStatus:
    mode: str
    state: ServerState
    model: str = ""
    base_url: str = ""
    port: int | None = None
    pid: int | None = None
    restart_count: int = 0
    uptime_s: float | None = None
    last_health_check: str | None = None  # ISO 8601, UTC
    last_error: str | None = None
    log_tail: list[str] = field(default_factory=list)
    served_models: list[str] = field(default_factory=list)
    server_version: str | None = None
    latency_ms: float | None = None
    supervised_here: bool = False  # this process runs the server (Local mode, holds the port lock)
    # While starting: vLLM's start-up phase read from its log (vllm_control.startup_phases), since when.
    phase: str | None = None  # a StartupPhase value
    phase_label: str | None = None  # e.g. "capturing CUDA graphs"
    phase_started_at: str | None = None  # ISO 8601, UTC
    phase_elapsed_s: float | None = None  # at the time of this status (the browser counts on from it)
    # Stopped by the idle timeout (state STOPPED): the next page that needs it starts it again.
    idle: bool = False


@dataclass
class EndpointStatus:
    """One endpoint as the router of a process sees it (vllm_control.router), or as a probe found it
    (`in_flight`, `pages_per_s` None: no router here has sent it anything)."""

    key: str  # "main" (the settings' own server) or "server-<pk>"
    name: str
    kind: str  # local | external
    base_url: str
    state: ServerState  # ready: in the rotation; unhealthy: taken out; starting: not checked yet
    capacity: int
    in_flight: int | None = None
    pages_per_s: float | None = None
    latency_ms: float | None = None  # mean time of this process's requests over the last seconds
    last_error: str | None = None
    last_health_check: str | None = None  # ISO 8601, UTC
    port: int | None = None  # Local
    cuda_visible_devices: str = ""  # Local
