"""The process-wide model-server registry and the entry points the rest of the project uses.

The Local supervisor lives on one event loop for the life of the process: the ASGI server's loop (bound
by the lifespan), the loop of a command's `asyncio.run`, or, when a sync caller (a view under a WSGI
server, a test client) needs it first, a background thread's loop. The supervisor's subprocess and tasks
belong to that loop, so it must run as long as the supervisor. Calls from other loops or threads are run
on that loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from django.conf import settings

from vllm_control.command import build_command, server_environment
from vllm_control.config import EffectiveConfig, Endpoint, LocalServerConfig
from vllm_control.errors import ModelServerUnavailable
from vllm_control.events import publish_server_status
from vllm_control.external import ProbeResult, probe, status_from_probe, verify_external
from vllm_control.redaction import redact_urls
from vllm_control.router import probe_endpoint, router
from vllm_control.startup_phases import label
from vllm_control.status import EndpointStatus, ServerState, ServerStatus
from vllm_control.supervisor import Supervisor, read_shared_state

logger = logging.getLogger(__name__)
T = TypeVar("T")

EXTERNAL_VERIFY_CACHE_S = 5.0
SYNC_CALL_TIMEOUT_S = 120.0

_supervisor: Supervisor | None = None
_fleet: dict[int, Supervisor] = {}  # the extra Local servers (ModelServer rows), by port
_loop: asyncio.AbstractEventLoop | None = None
_registry_lock = threading.Lock()
_external_verified: dict[tuple[str, str, str], float] = {}
_external_status: tuple[float, ServerStatus] | None = None


def get_supervisor() -> Supervisor | None:
    """The Local supervisor of this process, if one was created."""
    return _supervisor


def known_statuses() -> list[ServerStatus]:
    """The statuses this process knows without asking anyone: its Local supervisor's, and the last
    check of the External server (for metrics; thread-safe reads)."""
    statuses = []
    if _supervisor is not None:
        statuses.append(_supervisor.status())
    statuses.extend(supervisor.status() for supervisor in list(_fleet.values()))
    if _external_status is not None:
        statuses.append(_external_status[1])
    return statuses


# --- the loop that hosts the supervisor --------------------------------------------------------------------


def bind_loop(loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Host the supervisor on `loop` (the running loop by default): the ASGI server calls this at start-up."""
    _rebind(loop or asyncio.get_running_loop())


def _rebind(loop: asyncio.AbstractEventLoop) -> None:
    global _loop, _supervisor
    with _registry_lock:
        if _loop is loop:
            return
        old = _supervisor
        if old is not None and (_loop is None or _loop.is_closed() or not _loop.is_running()):
            # Its loop is gone (e.g. the previous asyncio.run ended): nothing supervises its server any more.
            old._kill_at_exit()
            _supervisor = None
        if _fleet and (_loop is None or _loop.is_closed() or not _loop.is_running()):
            for supervisor in _fleet.values():
                supervisor._kill_at_exit()
            _fleet.clear()
        _loop = loop


def _usable(loop: asyncio.AbstractEventLoop | None) -> bool:
    return loop is not None and not loop.is_closed() and loop.is_running()


async def _on_home(fn: Callable[[], Awaitable[T]]) -> T:
    current = asyncio.get_running_loop()
    if _loop is not current and not _usable(_loop):
        _rebind(current)
    home = _loop
    assert home is not None
    if home is current:
        return await fn()
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(fn(), home))


def _background_loop() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    started = threading.Event()
    thread = threading.Thread(target=lambda: (loop.call_soon(started.set), loop.run_forever()), daemon=True, name="vllm-supervisor")
    thread.start()
    started.wait()
    return loop


def run_sync(fn: Callable[[], Awaitable[T]], timeout: float = SYNC_CALL_TIMEOUT_S) -> T:
    """Run `fn()` on the supervisor's loop from synchronous code and wait for the result."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is not None:
        raise RuntimeError("run_sync() called on a running event loop; await the async function instead.")
    if not _usable(_loop):
        _rebind(_background_loop())
    assert _loop is not None
    return asyncio.run_coroutine_threadsafe(fn(), _loop).result(timeout)


# --- Local ---------------------------------------------------------------------------------------------------


def _supervisor_for(local: LocalServerConfig) -> Supervisor:
    """Must run on the home loop."""
    global _supervisor
    if _supervisor is None or (not _supervisor.running and _supervisor.config.port != local.port):
        _supervisor = Supervisor(local)
    return _supervisor


def needs_restart(old: LocalServerConfig, new: LocalServerConfig) -> bool:
    """The running server no longer matches the configuration (command line or environment)."""
    return build_command(old) != build_command(new) or server_environment(old, {}) != server_environment(new, {})


def _ready_timeout(local: LocalServerConfig) -> float:
    return local.start_timeout_s + local.restart_delay_s + 5


async def start_local(config: EffectiveConfig) -> ServerStatus:
    """Start supervising the Local server (returns at once; the status says `starting`)."""

    async def go() -> ServerStatus:
        supervisor = _supervisor_for(config.local)
        if not supervisor.running:
            supervisor.config = config.local
        await supervisor.start()
        return supervisor.status()

    return await _on_home(go)


async def stop_local() -> ServerStatus | None:
    """Stop the Local server of this process and wait until it is gone."""

    async def go() -> ServerStatus | None:
        if _supervisor is None:
            return None
        await _supervisor.stop()
        return _supervisor.status()

    if _supervisor is None:
        return None
    return await _on_home(go)


async def restart_local(config: EffectiveConfig) -> ServerStatus:
    async def go() -> ServerStatus:
        supervisor = _supervisor_for(config.local)
        await supervisor.restart(config.local)
        return supervisor.status()

    return await _on_home(go)


async def shutdown() -> None:
    """Stop everything this module started (ASGI lifespan shutdown)."""
    await router().stop()
    await stop_fleet()
    await stop_local()


# --- several model servers ---------------------------------------------------------------------------------


def fleet_supervisors() -> dict[int, Supervisor]:
    """The supervisors of the extra Local servers of this process, by port."""
    return dict(_fleet)


async def sync_fleet(config: EffectiveConfig, *, start: bool = True) -> None:
    """Supervise the extra Local servers `config.endpoints` lists: each its own `vllm serve` (its port, its
    CUDA_VISIBLE_DEVICES). Stops those no longer listed, restarts a running one whose command line or
    environment changed, and starts the others when `start` (returns at once: the router waits for them)."""

    async def go() -> None:
        wanted = {e.local.port: e.local for e in config.endpoints[1:] if e.kind == "local" and e.local is not None}
        for port in [port for port in _fleet if port not in wanted]:
            await _fleet.pop(port).stop()
        for port, local in wanted.items():
            supervisor = _fleet.get(port)
            if supervisor is None:
                supervisor = _fleet[port] = Supervisor(local)
            if supervisor.running and supervisor.owner and needs_restart(supervisor.config, local):
                logger.info("The settings of the vLLM server on port %s changed; restarting it.", port)
                await supervisor.restart(local)
            elif not supervisor.running:
                supervisor.config = local
                if start:
                    await supervisor.start()
        if start and config.mode == "local":
            main = _supervisor_for(config.local)
            if not main.running:
                main.config = config.local
                await main.start()

    await _on_home(go)


async def stop_fleet() -> None:
    if not _fleet:
        return

    async def go() -> None:
        await asyncio.gather(*(supervisor.stop() for supervisor in list(_fleet.values())))

    await _on_home(go)


def route_endpoints(config: EffectiveConfig) -> None:
    """Let this process's router check the endpoints (the settings page shows their health); a router that
    routes already follows every change (a server removed, the settings' own server changed)."""
    routed = config.endpoints if len(config.endpoints) > 1 else ()  # one server: not routed, not probed here
    if routed or router().endpoints:
        router().configure(routed, model=config.served_model_name, health_interval_s=config.local.health_check_interval_s)
    if routed:
        router().ensure_health_loop()


def watch_endpoints(config: EffectiveConfig) -> None:
    """`route_endpoints` on the home loop, from any thread (a settings change in a sync view)."""
    loop = _loop
    if (len(config.endpoints) > 1 or router().endpoints) and _usable(loop):
        assert loop is not None
        loop.call_soon_threadsafe(route_endpoints, config)


def _unchecked(endpoint: Endpoint) -> EndpointStatus:
    return EndpointStatus(
        key=endpoint.key, name=endpoint.name, kind=endpoint.kind, base_url=endpoint.base_url,
        state=ServerState.STARTING, capacity=endpoint.capacity,
        port=endpoint.local.port if endpoint.local else None,
        cuda_visible_devices=endpoint.local.cuda_visible_devices if endpoint.local else "",
    )


def known_endpoint_statuses(config: EffectiveConfig) -> list[EndpointStatus]:
    """Each endpoint of `config` as this process's router sees it (`starting`: not checked here yet)."""
    known = {status.key: status for status in router().statuses()}
    return [
        known[e.key] if e.key in known and known[e.key].base_url == e.base_url else _unchecked(e) for e in config.endpoints
    ]


async def endpoint_statuses(config: EffectiveConfig) -> list[EndpointStatus]:
    """Each endpoint of `config`: as this process's router sees it, else as a probe finds it now."""
    known = {status.key: status for status in router().statuses()}
    results = []
    for endpoint in config.endpoints:
        status = known.get(endpoint.key)
        if status is not None and status.base_url == endpoint.base_url and status.state != ServerState.STARTING:
            results.append(status)
            continue
        result = await probe_endpoint(endpoint, config.served_model_name)
        status = _unchecked(endpoint)
        status.state = ServerState.READY if result.ok else ServerState.UNHEALTHY
        status.latency_ms, status.last_health_check = result.latency_ms, result.checked_at
        status.last_error = None if result.ok else result.message
        results.append(status)
    return results


# --- the entry points of the OCR runner ------------------------------------------------------------------------


async def ensure_ready(config: EffectiveConfig) -> None:
    """Make sure the model server can take requests, or raise ModelServerUnavailable saying why.

    Local: start the supervisor if needed (on demand) and wait for readiness; in a process that does not
    hold the port lock this waits for the other process's server. External: verify (cached briefly).
    """
    if len(config.endpoints) > 1:  # several servers: start the Local ones; each request waits for one
        await sync_fleet(config)
        return
    if config.mode == "local":

        async def go() -> None:
            supervisor = _supervisor_for(config.local)
            if supervisor.running and supervisor.owner and needs_restart(supervisor.config, config.local):
                logger.info("The vLLM settings changed; restarting the server.")
                await supervisor.restart(config.local)
            elif not supervisor.running:
                supervisor.config = config.local
                await supervisor.start()
            await supervisor.wait_ready(_ready_timeout(config.local))

        await _on_home(go)
    elif config.mode == "external":
        key = (config.external_base_url, config.api_key, config.served_model_name)
        verified = _external_verified.get(key)
        if verified is not None and time.monotonic() - verified < EXTERNAL_VERIFY_CACHE_S:
            return
        result = await verify_external(config)
        await _remember_external(config, result)
        if not result.ok:
            _external_verified.pop(key, None)
            raise ModelServerUnavailable(result.message or "The external model server is not available.")
        _external_verified[key] = time.monotonic()


async def report_request_failure(config: EffectiveConfig) -> None:
    """A request to the model server failed with a connection error: check its health now."""
    if config.mode == "local":
        supervisor = _supervisor
        if supervisor is not None and _usable(_loop):
            assert _loop is not None
            _loop.call_soon_threadsafe(supervisor.check_health_now)
    elif config.mode == "external":
        _external_verified.clear()
        result = await probe(config.external_base_url, api_key=config.api_key, model=config.served_model_name)
        await _remember_external(config, result)


async def _remember_external(config: EffectiveConfig, result: ProbeResult) -> ServerStatus:
    global _external_status
    status = status_from_probe(config, result, mode="external")
    previous = _external_status[1] if _external_status else None
    _external_status = (time.monotonic(), status)
    if previous is None or (previous.state, previous.last_error) != (status.state, status.last_error):
        await publish_server_status(status)
    return status


# --- status ----------------------------------------------------------------------------------------------------


async def current_status(config: EffectiveConfig, *, fresh: bool = False) -> ServerStatus:
    """The configured server's status. Local: the supervisor's when this process runs one, else a probe."""
    if config.mode == "local":
        supervisor = _supervisor
        if supervisor is not None and supervisor.config.port == config.local.port and _usable(_loop):
            status = await _on_home(_status_of(supervisor))
            if supervisor.running or status.state == ServerState.FAILED:
                return status
        result = await probe(config.local.base_url, api_key=config.api_key, model=config.served_model_name, timeout=2.0, check_health=True)
        status = status_from_probe(config, result, mode="local")
        if not result.ok:
            _merge_shared_state(status, config.local)
        if supervisor is not None and not result.ok and supervisor.last_error:
            status.last_error = supervisor.last_error
            status.log_tail = list(supervisor.log_tail)
        return status
    if config.mode == "external":
        if not fresh and _external_status and time.monotonic() - _external_status[0] < EXTERNAL_VERIFY_CACHE_S:
            return _external_status[1]
        result = await probe(config.external_base_url, api_key=config.api_key, model=config.served_model_name)
        return await _remember_external(config, result)
    return ServerStatus(mode=config.mode, state=ServerState.STOPPED, model=config.model)  # Built-in: no server


def _merge_shared_state(status: ServerStatus, local: LocalServerConfig) -> None:
    """Another process supervises this port: its state, start-up phase and idle stop (from its state file)."""
    shared = read_shared_state(settings.DATA_DIR, local.port)
    if shared is None:
        return
    try:
        status.state = ServerState(shared["state"])
    except (KeyError, ValueError):
        return
    status.idle = bool(shared.get("idle"))
    status.last_error = shared.get("last_error") or status.last_error
    if shared.get("phase") and shared.get("phase_started_at"):
        status.phase = shared["phase"]
        status.phase_label = label(status.phase)
        status.phase_started_at = shared["phase_started_at"]
        started = datetime.fromisoformat(shared["phase_started_at"])
        status.phase_elapsed_s = round(max(0.0, (datetime.now(UTC) - started).total_seconds()), 1)


def _status_of(supervisor: Supervisor) -> Callable[[], Awaitable[ServerStatus]]:
    async def get() -> ServerStatus:
        return supervisor.status()

    return get


async def test_connection(config: EffectiveConfig) -> tuple[bool, str, ServerStatus]:
    """One fresh check of the configured server, for the settings page's "Test connection"."""
    status = await current_status(config, fresh=True)
    if status.state == ServerState.READY:
        detail = f" (vLLM {status.server_version})" if status.server_version else ""
        latency = f" in {status.latency_ms:g} ms" if status.latency_ms is not None else ""
        return True, f"Connected to {redact_urls(status.base_url)}{detail}{latency}; it serves '{status.model}'.", status
    return False, status.last_error or f"The model server is {status.state}.", status


@dataclass(frozen=True)
class CandidateTest:
    """The answer to "Test connection" on the unsaved settings form."""

    ok: bool
    reachable: bool
    message: str
    served_models: list[str]
    base_url: str  # without credentials


async def test_candidate(config: EffectiveConfig) -> CandidateTest:
    """Check the server of a configuration that is not saved (the settings form as it is now): one probe of
    its /v1/models, nothing cached, published or started. External: the URL with its key. Local: the local
    server at the form's address (it answers only when running; ocrsite starts it after a save, or on Start)."""
    if config.mode == "external":
        result = await probe(config.external_base_url, api_key=config.api_key, model=config.served_model_name)
        base_url = config.external_base_url
    else:
        base_url = config.local.base_url
        result = await probe(base_url, api_key=config.api_key, model=config.served_model_name, timeout=2.0, check_health=True)
    shown = redact_urls(base_url)
    if result.ok:
        detail = f" (vLLM {result.server_version})" if result.server_version else ""
        latency = f" in {result.latency_ms:g} ms" if result.latency_ms is not None else ""
        message = f"Connected to {shown}{detail}{latency}; it serves '{config.served_model_name}'."
    elif config.mode == "local" and not result.reachable:
        supervisor = _supervisor
        starting = supervisor is not None and supervisor.running and supervisor.config.port == config.local.port
        message = (
            f"The local vLLM server at {shown} is still starting ({supervisor.state}); try again when it is ready."
            if starting and supervisor is not None
            else f"No local vLLM server is running at {shown}. Save the settings, then Start it (or enable autostart)."
        )
    else:
        message = result.message or f"The model server at {shown} did not answer as expected."
        if result.served_models:
            message += " Pick one of them below."
    return CandidateTest(result.ok, result.reachable, message, result.served_models, shown)


# --- settings changes ------------------------------------------------------------------------------------------


async def apply_settings_change(old: EffectiveConfig, new: EffectiveConfig) -> None:
    """Restart the Local server when its command line changed; stop it when the mode left Local. The
    extra Local servers follow (started when a Local server runs already)."""
    _external_verified.clear()
    global _external_status
    _external_status = None
    running = (_supervisor is not None and _supervisor.running) or any(s.running for s in _fleet.values())
    if _fleet or running:
        await sync_fleet(new, start=running)
    supervisor = _supervisor
    if supervisor is None:
        return

    async def go() -> None:
        if new.mode != "local":
            if supervisor.running or supervisor.state != ServerState.STOPPED:
                logger.info("The mode left Local; stopping the vLLM server.")
                await supervisor.stop()
        elif supervisor.running and not supervisor.idle and needs_restart(supervisor.config, new.local):
            logger.info("The vLLM settings changed; restarting the server.")
            await supervisor.restart(new.local)
        else:  # an idle-stopped server starts with the new settings when a page needs it
            supervisor.config = new.local

    await _on_home(go)


def settings_changed(*, old: EffectiveConfig, new: EffectiveConfig) -> None:
    """Sync wrapper for the settings view: apply the change on the supervisor's loop."""
    if _supervisor is None and not _fleet:
        _external_verified.clear()
        return
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is not None:  # called from async code: do not block its loop
        running.create_task(apply_settings_change(old, new))
        return
    run_sync(lambda: apply_settings_change(old, new), timeout=new.local.stop_grace_ms / 1000 + 60)
