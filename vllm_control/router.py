"""Which model server a page request goes to: the healthy endpoint with the least work in flight for its
capacity (MinerU's router score), ties to the one chosen least recently.

One `Router` per process (`router()`): its counts are this process's requests, and its health loop probes
every endpoint itself, so the web server's embedded runner and each `ocr_worker` route on their own.
- an endpoint starts `starting` (not checked yet) and enters the rotation (`ready`) when a probe passes;
- a request whose connection failed (refused, reset, the server died mid-request) takes its endpoint out
  at once (`unhealthy`); the health loop probes it every DOWN_PROBE_S and puts it back when it answers;
- a ready endpoint is probed every `health_check_interval_s`; a failed probe takes it out too;
- `acquire` waits while no endpoint is in the rotation (pages wait, they do not fail), up to a deadline.
Per-endpoint figures (in flight, pages/s over the last RATE_WINDOW_S, mean latency, last error) are what
the settings page, `vllm_status --json` and the metrics show; changes go out live at most every second.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from vllm_control.config import Endpoint
from vllm_control.events import publish_endpoints
from vllm_control.external import ProbeResult, now_iso, probe
from vllm_control.status import EndpointStatus, ServerState

logger = logging.getLogger(__name__)

DOWN_PROBE_S = 1.0  # how often an endpoint out of the rotation (or not checked yet) is probed
DEFAULT_HEALTH_INTERVAL_S = 10.0
RATE_WINDOW_S = 10.0
PUBLISH_EVERY_S = 1.0

Probe = Callable[[Endpoint, str], Awaitable[ProbeResult]]


class NoEndpointAvailable(Exception):
    """No endpoint came into the rotation before the deadline; `str()` says why."""


async def probe_endpoint(endpoint: Endpoint, model: str) -> ProbeResult:
    """The default health check: a Local server's /health and /v1/models, an External's /v1/models; both
    must list `model`."""
    return await probe(
        endpoint.base_url, api_key=endpoint.api_key, model=model, timeout=5.0,
        check_health=endpoint.kind == "local", fetch_version=False,
    )


@dataclass
class _Endpoint:
    endpoint: Endpoint
    state: ServerState = ServerState.STARTING
    in_flight: int = 0
    chosen_at: int = 0  # the router's choice counter when it was last chosen (ties go to the oldest)
    answered: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=4096))  # (when, seconds)
    last_error: str | None = None
    last_health_check: str | None = None
    next_probe: float = 0.0

    @property
    def load(self) -> float:
        return self.in_flight / max(1, self.endpoint.capacity)

    def status(self, now: float) -> EndpointStatus:
        recent = [(when, seconds) for when, seconds in self.answered if now - when <= RATE_WINDOW_S]
        local = self.endpoint.local
        return EndpointStatus(
            key=self.endpoint.key,
            name=self.endpoint.name,
            kind=self.endpoint.kind,
            base_url=self.endpoint.base_url,
            state=self.state,
            capacity=self.endpoint.capacity,
            in_flight=self.in_flight,
            pages_per_s=round(len(recent) / RATE_WINDOW_S, 2),
            latency_ms=round(1000 * sum(s for _, s in recent) / len(recent), 1) if recent else None,
            last_error=self.last_error,
            last_health_check=self.last_health_check,
            port=local.port if local else None,
            cuda_visible_devices=local.cuda_visible_devices if local else "",
        )


@dataclass
class Lease:
    """One request's hold on an endpoint; give it back with `Router.release`."""

    endpoint: Endpoint
    started: float
    released: bool = False


class Router:
    def __init__(self, *, probe: Probe = probe_endpoint) -> None:
        self._probe = probe
        self._endpoints: dict[str, _Endpoint] = {}
        self._model = ""
        self._health_interval = DEFAULT_HEALTH_INTERVAL_S
        self._choices = 0
        self._lock = threading.Lock()  # statuses are read from other threads (views, metrics)
        self._health_task: asyncio.Task | None = None
        self._wake_health: asyncio.Event | None = None
        self._published: tuple = ()
        self._last_publish = 0.0

    # --- configuration ------------------------------------------------------------------------------

    def configure(self, endpoints: tuple[Endpoint, ...], *, model: str, health_interval_s: float | None = None) -> None:
        """Route to these endpoints (an unchanged endpoint keeps its state and figures)."""
        with self._lock:
            if model != self._model:
                for entry in self._endpoints.values():  # whether each serves the new model is not known yet
                    entry.state, entry.next_probe = ServerState.STARTING, 0.0
            self._model = model
            if health_interval_s:
                self._health_interval = float(health_interval_s)
            kept = {}
            for endpoint in endpoints:
                entry = self._endpoints.get(endpoint.key)
                if entry is None or entry.endpoint.base_url != endpoint.base_url or entry.endpoint.api_key != endpoint.api_key:
                    entry = _Endpoint(endpoint)
                else:
                    entry.endpoint = endpoint
                kept[endpoint.key] = entry
            self._endpoints = kept

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return tuple(entry.endpoint for entry in self._endpoints.values())

    # --- choosing -----------------------------------------------------------------------------------

    def _choose(self) -> _Endpoint | None:
        ready = [entry for entry in self._endpoints.values() if entry.state == ServerState.READY]
        if not ready:
            return None
        return min(ready, key=lambda entry: (entry.load, entry.chosen_at))

    async def acquire(self, *, timeout: float) -> Lease:
        """The endpoint for one request (counted in flight until released); waits while none is in the
        rotation, and raises NoEndpointAvailable after `timeout` seconds."""
        self.ensure_health_loop()
        deadline = time.monotonic() + timeout
        waited = False
        while True:
            with self._lock:
                entry = self._choose()
                if entry is not None:
                    self._choices += 1
                    entry.chosen_at = self._choices
                    entry.in_flight += 1
                    return Lease(entry.endpoint, time.monotonic())
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                errors = "; ".join(
                    f"{entry.endpoint.name}: {entry.last_error or entry.state}" for entry in self._endpoints.values()
                )
                raise NoEndpointAvailable(f"No model server is available ({errors or 'none is configured'}).")
            if not waited:  # endpoints not checked yet are probed now, not at the loop's next round
                waited = True
                self._poke_health()
            await asyncio.sleep(min(0.05, remaining))

    def release(self, lease: Lease, *, answered: bool, connection_lost: bool = False, error: str | None = None) -> None:
        """The request ended: `answered` (the server answered, even with an unusable answer), or its
        connection was lost (the endpoint leaves the rotation until a health check passes)."""
        if lease.released:
            return
        lease.released = True
        now = time.monotonic()
        with self._lock:
            entry = self._endpoints.get(lease.endpoint.key)
            if entry is None or entry.endpoint.base_url != lease.endpoint.base_url:
                return
            entry.in_flight = max(0, entry.in_flight - 1)
            if answered:
                entry.answered.append((now, now - lease.started))
            if error:
                entry.last_error = error
            if connection_lost and entry.state == ServerState.READY:
                logger.warning("Model server %s left the rotation: %s", entry.endpoint.name, error)
                entry.state, entry.next_probe = ServerState.UNHEALTHY, now + DOWN_PROBE_S / 2
        if connection_lost:
            self._poke_health()

    # --- health ---------------------------------------------------------------------------------------

    def ensure_health_loop(self) -> None:
        """Run the health loop on the running event loop (again when the previous loop has gone)."""
        task = self._health_task
        loop = asyncio.get_running_loop()
        if task is not None and not task.done() and task.get_loop() is loop:
            return
        self._wake_health = asyncio.Event()
        self._health_task = loop.create_task(self._health_loop(), name="endpoint-health")

    async def stop(self) -> None:
        task, self._health_task = self._health_task, None
        if task is not None and not task.done():
            task.cancel()
            if task.get_loop() is asyncio.get_running_loop():
                await asyncio.gather(task, return_exceptions=True)

    def _poke_health(self) -> None:
        if self._wake_health is not None:
            self._wake_health.set()

    async def check_now(self) -> None:
        """Probe every endpoint that is due (all of them when none was checked yet)."""
        now = time.monotonic()
        due = [entry for entry in list(self._endpoints.values()) if entry.next_probe <= now]
        if due:
            await asyncio.gather(*(self._check(entry) for entry in due))
        await self._publish_if_changed()

    async def _check(self, entry: _Endpoint) -> None:
        try:
            result = await self._probe(entry.endpoint, self._model)
        except Exception as exc:  # a broken probe takes the endpoint out, never the loop down
            result = ProbeResult(False, False, True, f"The health check failed: {exc}")
        now = time.monotonic()
        with self._lock:
            if self._endpoints.get(entry.endpoint.key) is not entry:
                return
            entry.last_health_check = result.checked_at or now_iso()
            if result.ok:
                if entry.state != ServerState.READY:
                    logger.info("Model server %s is in the rotation.", entry.endpoint.name)
                    entry.last_error = None  # why it was out is over (the log keeps it)
                entry.state, entry.next_probe = ServerState.READY, now + self._health_interval
            else:
                if entry.state == ServerState.READY:
                    logger.warning("Model server %s left the rotation: %s", entry.endpoint.name, result.message)
                if entry.state != ServerState.STARTING or result.reachable:
                    entry.state = ServerState.UNHEALTHY
                entry.last_error = result.message
                entry.next_probe = now + DOWN_PROBE_S

    async def _health_loop(self) -> None:
        wake = self._wake_health
        assert wake is not None
        while True:
            try:
                await self.check_now()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("The endpoint health loop failed")
            now = time.monotonic()
            next_due = min((entry.next_probe for entry in self._endpoints.values()), default=now + DOWN_PROBE_S)
            wake.clear()
            try:
                await asyncio.wait_for(wake.wait(), max(0.0, min(next_due - now, PUBLISH_EVERY_S)))
            except TimeoutError:
                pass

    # --- status ---------------------------------------------------------------------------------------

    def statuses(self) -> list[EndpointStatus]:
        now = time.monotonic()
        with self._lock:
            return [entry.status(now) for entry in self._endpoints.values()]

    async def _publish_if_changed(self) -> None:
        statuses = self.statuses()
        shown = tuple((s.key, s.state, s.in_flight, s.pages_per_s, s.latency_ms, s.last_error) for s in statuses)
        now = time.monotonic()
        if shown == self._published or now - self._last_publish < PUBLISH_EVERY_S:
            return
        self._published, self._last_publish = shown, now
        await publish_endpoints(statuses)


_router = Router()


def router() -> Router:
    """This process's router."""
    return _router
