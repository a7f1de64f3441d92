"""Supervise one local `vllm serve`: spawn, readiness, health monitoring, restart, stop.

One explicit state machine (TRANSITIONS below). vLLM spawns children of its own (EngineCore, workers)
that keep the GPU when only the parent dies, so everything acts on the whole process group:
  - vLLM runs in its own session/process group under a watchdog (vllm_control.watchdog), which stops the
    group when this process dies, however it dies; to the supervisor the watchdog looks like vLLM (its
    output, its exit status);
  - stop = close the watchdog's lifeline: stop signal to the group, SIGKILL to the group after the grace
    period; then confirm the group is empty;
  - the group and the start time of each of its processes are recorded in DATA_DIR
    (processes.GroupRecord), so the next start kills whatever survived a watchdog killed too, and a
    reused pid never.
Only one process supervises a port (an flock in DATA_DIR); another process that cannot take the lock
observes the server over HTTP instead of spawning a second one, and takes over when the lock frees.
All methods must run on the event loop the supervisor was started on (see vllm_control.runtime).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from asgiref.sync import sync_to_async
from django.conf import settings

from vllm_control import demand, watchdog
from vllm_control.command import build_command, redact, server_environment
from vllm_control.config import LocalServerConfig
from vllm_control.errors import ModelServerUnavailable
from vllm_control.events import publish_server_status
from vllm_control.external import probe
from vllm_control.processes import GroupRecord, await_group_gone, group_members, signal_group
from vllm_control.startup_errors import classify, not_found
from vllm_control.startup_phases import StartupPhase, label, phase_of
from vllm_control.status import ServerState, ServerStatus

logger = logging.getLogger(__name__)
vllm_logger = logging.getLogger("vllm_control.vllm")

S = ServerState
TRANSITIONS: dict[ServerState, frozenset[ServerState]] = {
    # STOPPED -> STARTING: start(), or, stopped by the idle timeout (`idle`), a page that needs the server.
    S.STOPPED: frozenset({S.STARTING}),
    # STARTING -> STARTING: the next attempt after a start-up failure.
    S.STARTING: frozenset({S.STARTING, S.READY, S.UNHEALTHY, S.FAILED, S.STOPPING}),
    # READY -> STOPPING: stop(), or the idle timeout (then STOPPED with `idle`, still supervised).
    S.READY: frozenset({S.UNHEALTHY, S.STOPPING}),
    # UNHEALTHY -> STARTING: restart after a crash or a hang.
    S.UNHEALTHY: frozenset({S.UNHEALTHY, S.READY, S.STARTING, S.FAILED, S.STOPPING}),
    S.STOPPING: frozenset({S.STOPPED}),
    S.FAILED: frozenset({S.STARTING, S.STOPPED}),
}

# A request vLLM served or is serving, from its log: uvicorn's access line for an API call (not the
# supervisor's own GETs of /health and /v1/models), or the engine's statistics with requests running or waiting.
REQUEST_LINE = re.compile(r'"POST /v1/|(Running|Waiting): [1-9]\d* reqs')

LOG_TAIL_LINES = 200
STABLE_RUN_S = 300.0  # a run that stayed ready this long resets the restart count
HEALTH_FAILURES = 3  # consecutive failed health checks that count as a hang
READINESS_POLL_S = 0.5
IDLE_POLL_S = 1.0  # how often an idle-stopped server asks the database whether pages wait for it
GROUP_EXIT_WAIT_S = 10.0


_KEEP = object()  # _set_state: leave last_error as it is


class InvalidTransition(RuntimeError):
    pass


@dataclass(frozen=True)
class RunEnd:
    """Why one run of the server ended."""

    reason: str
    retryable: bool
    ready_for_s: float = 0.0
    idle: bool = False  # the idle timeout: stopped on purpose, started again when a page needs it


async def _exited(proc: asyncio.subprocess.Process) -> int:
    # Not proc.wait(): before Python 3.12 it also waits for the output pipe to close, which vLLM's
    # orphaned children keep open. The return code is set as soon as the child is reaped.
    while proc.returncode is None:
        await asyncio.sleep(0.05)
    return proc.returncode


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def read_shared_state(data_dir: Path, port: int) -> dict | None:
    """What the process supervising `port` last recorded (Supervisor.state_file), if it still runs."""
    try:
        data = json.loads((Path(data_dir) / f"vllm-{port}.state.json").read_text())
        os.kill(int(data["supervisor_pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return data if isinstance(data, dict) else None


# --- the supervisor ---------------------------------------------------------------------------------------


class Supervisor:
    def __init__(
        self,
        config: LocalServerConfig,
        *,
        data_dir: Path | None = None,
        stable_run_s: float = STABLE_RUN_S,
        health_failures: int = HEALTH_FAILURES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._clock = clock  # every duration the supervisor judges (start timeout, phases); tests inject one
        self.data_dir = Path(data_dir or settings.DATA_DIR)
        self.stable_run_s = stable_run_s
        self.health_failures = health_failures
        self.loop: asyncio.AbstractEventLoop | None = None
        self.state = ServerState.STOPPED
        self.owner = False  # holds the port lock (this process runs the server)
        self.restart_count = 0
        self.last_error: str | None = None
        self.last_health_check: str | None = None
        self.served_models: list[str] = []
        self.server_version: str | None = None
        self.latency_ms: float | None = None
        self.idle = False  # STOPPED by the idle timeout, waiting for a page that needs the server
        self._last_request: float | None = None  # self._clock() of the last sign of a request
        self._wake = asyncio.Event()  # a page in this process needs the idle-stopped server
        self.phase: StartupPhase | None = None  # vLLM's start-up phase (this process's run only)
        self._phase_since: float | None = None  # self._clock() when it began
        self._phase_started_at: datetime | None = None
        self.log_tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self._run_lines: deque[str] = deque(maxlen=2 * LOG_TAIL_LINES)
        self._listeners: list[Callable[[ServerStatus], None]] = []
        self._vllm: watchdog.Supervised | None = None  # the current run: vLLM's pid is its group's number
        self._spawned_at: float | None = None
        self._ready_since: float | None = None
        self._run_task: asyncio.Task | None = None
        self._spawn_task: asyncio.Task | None = None
        self._exit_task: asyncio.Task | None = None
        self._reader_task: asyncio.Task | None = None
        self._lock_fd: int | None = None
        self._control: asyncio.Lock | None = None
        self._change = asyncio.Event()
        self._check_now = asyncio.Event()
        self._background: set[asyncio.Task] = set()
        self._log_publish_pending = False
        atexit.register(self._kill_at_exit)

    # --- paths -----------------------------------------------------------------------------------------
    @property
    def pgid_file(self) -> Path:
        return self.data_dir / f"vllm-{self.config.port}.pgid"

    @property
    def lock_file(self) -> Path:
        return self.data_dir / f"vllm-{self.config.port}.lock"

    @property
    def state_file(self) -> Path:
        """What the owner last published (state, start-up phase, idle), for other processes' status."""
        return self.data_dir / f"vllm-{self.config.port}.state.json"

    @property
    def connect_host(self) -> str:
        return urlsplit(self.config.base_url).hostname or "127.0.0.1"

    @property
    def running(self) -> bool:
        return self._run_task is not None and not self._run_task.done()

    # --- status and notifications ----------------------------------------------------------------------
    def status(self) -> ServerStatus:
        vllm = self._vllm
        alive = vllm is not None and vllm.process.returncode is None
        return ServerStatus(
            mode="local",
            state=self.state,
            model=self.config.served_model_name,
            base_url=self.config.base_url,
            port=self.config.port,
            pid=vllm.pid if alive and vllm is not None else None,
            restart_count=self.restart_count,
            uptime_s=round(self._clock() - self._spawned_at, 1) if alive and self._spawned_at else None,
            last_health_check=self.last_health_check,
            last_error=self.last_error,
            log_tail=list(self.log_tail),
            served_models=list(self.served_models),
            server_version=self.server_version,
            latency_ms=self.latency_ms,
            supervised_here=self.owner,
            phase=str(self.phase) if self.phase else None,
            phase_label=label(self.phase),
            phase_started_at=self._phase_started_at.isoformat() if self._phase_started_at else None,
            phase_elapsed_s=round(self.phase_elapsed_s, 1) if self.phase_elapsed_s is not None else None,
            idle=self.idle,
        )

    @property
    def phase_elapsed_s(self) -> float | None:
        return self._clock() - self._phase_since if self._phase_since is not None else None

    def _enter_phase(self, phase: StartupPhase | None) -> None:
        if phase == self.phase:
            return
        self.phase = phase
        self._phase_since = self._clock() if phase else None
        self._phase_started_at = datetime.now(UTC) if phase else None
        if phase:
            logger.info("vLLM server on port %s: %s", self.config.port, label(phase))
        self._changed()

    def _phase_detail(self) -> str:
        """"; it was in phase 'capturing CUDA graphs' for 95 s" (empty before vLLM printed anything)."""
        elapsed = self.phase_elapsed_s
        if self.phase is None or elapsed is None:
            return ""
        return f"; it was in phase '{label(self.phase)}' for {elapsed:.0f} s"

    def add_listener(self, callback: Callable[[ServerStatus], None]) -> None:
        self._listeners.append(callback)

    def _set_state(self, new: ServerState, *, error: object = _KEEP, idle: bool = False) -> None:
        """`idle` only with STOPPED: stopped by the idle timeout; any other change clears it."""
        if new not in TRANSITIONS[self.state] and new != self.state:
            raise InvalidTransition(f"{self.state} -> {new}")
        if idle and new != ServerState.STOPPED:
            raise InvalidTransition(f"{new} cannot be idle")
        if new != self.state or idle != self.idle:
            logger.info("vLLM server on port %s: %s -> %s%s", self.config.port, self.state, new, " (idle)" if idle else "")
        self.state = new
        self.idle = idle
        if error is not _KEEP:
            self.last_error = error  # type: ignore[assignment]
        self._changed()

    def _changed(self) -> None:
        status = self.status()
        for callback in list(self._listeners):
            try:
                callback(status)
            except Exception:
                logger.exception("vLLM status listener failed")
        self._publish(status)
        self._write_state_file(status)
        self._change.set()
        self._change = asyncio.Event()

    def _publish(self, status: ServerStatus) -> None:
        task = asyncio.get_running_loop().create_task(publish_server_status(status))
        self._background.add(task)
        task.add_done_callback(self._publish_done)

    def _write_state_file(self, status: ServerStatus) -> None:
        """The owner's status for `vllm_status` and the ocrsite processes that only observe this port."""
        if not self.owner:
            return
        data = {
            "state": str(status.state), "phase": status.phase, "phase_started_at": status.phase_started_at,
            "idle": status.idle, "last_error": status.last_error, "supervisor_pid": os.getpid(),
        }
        try:
            temporary = self.state_file.with_suffix(".tmp")
            temporary.write_text(json.dumps(data))
            temporary.replace(self.state_file)
        except OSError as exc:
            logger.warning("Could not record the vLLM status in %s: %s", self.state_file, exc)

    def _publish_done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("Publishing the vLLM status failed: %s", task.exception())

    def _publish_log_soon(self) -> None:
        """New log lines reach the settings page at most once a second."""
        if self._log_publish_pending:
            return
        self._log_publish_pending = True

        def fire() -> None:
            self._log_publish_pending = False
            self._publish(self.status())

        asyncio.get_running_loop().call_later(1.0, fire)

    # --- control ------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Begin supervising; returns at once (`wait_ready` waits for readiness)."""
        self.loop = asyncio.get_running_loop()
        if self._control is None:
            self._control = asyncio.Lock()
        async with self._control:
            if self.running:
                if self.idle:
                    self.wake()
                return
            if self.state == ServerState.FAILED:
                self.restart_count = 0
            self._set_state(ServerState.STARTING, error=None)
            self._run_task = asyncio.create_task(self._run(), name=f"vllm-supervisor-{self.config.port}")

    async def stop(self) -> None:
        """Stop the server and wait until nothing of its process group is left."""
        if self._control is None:
            self._control = asyncio.Lock()
        async with self._control:
            run, self._run_task = self._run_task, None
            if run is not None:
                run.cancel()
                await asyncio.gather(run, return_exceptions=True)
            if self._spawn_task is not None:  # a spawn in progress completes, so its process is known
                await asyncio.gather(self._spawn_task, return_exceptions=True)
            if self.state in (ServerState.STARTING, ServerState.READY, ServerState.UNHEALTHY):
                self._set_state(ServerState.STOPPING)
            if self._vllm is not None:
                await self._terminate(graceful=True)
            self._release_lock()
            if self.state != ServerState.STOPPED or self.idle:
                self._set_state(ServerState.STOPPED)  # stopped by a person: no longer idle

    async def restart(self, config: LocalServerConfig | None = None) -> None:
        await self.stop()
        if config is not None:
            self.config = config
        self.restart_count = 0
        await self.start()

    def check_health_now(self) -> None:
        """Run a health check at once (a request to the server just failed)."""
        self._check_now.set()

    def wake(self) -> None:
        """A page in this process needs the server: start it now if the idle timeout stopped it."""
        self._wake.set()

    async def wait_ready(self, timeout: float) -> ServerStatus:
        """Wait for READY; raise ModelServerUnavailable when it failed, was stopped or took too long."""
        deadline = time.monotonic() + timeout
        while True:
            if self.state == ServerState.READY:
                return self.status()
            if self.state == ServerState.STOPPED and self.idle and self.running:
                self.wake()  # the caller needs the server: start it again, and wait for it
            elif self.state in (ServerState.FAILED, ServerState.STOPPED):
                raise ModelServerUnavailable(self.last_error or f"The vLLM server is {self.state}.")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                detail = f" Last error: {self.last_error}" if self.last_error else ""
                raise ModelServerUnavailable(
                    f"The vLLM server did not become ready within {timeout:g} s{self._phase_detail()}.{detail}"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._change.wait(), remaining)

    # --- the supervision loop -----------------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            while True:
                if not self._take_lock():
                    await self._observe()
                    continue
                end = await self._run_once()
                if end.idle:
                    self._set_state(ServerState.STOPPED, error=None, idle=True)
                    await self._until_needed()
                    self._set_state(ServerState.STARTING)
                    continue
                if end.ready_for_s >= self.stable_run_s:
                    self.restart_count = 0
                if not end.retryable:
                    self._set_state(ServerState.FAILED, error=end.reason)
                    return
                limit = self.config.max_restart_attempts
                if self.restart_count >= limit:
                    self._set_state(
                        ServerState.FAILED,
                        error=f"Gave up after {self.restart_count} restart attempt(s) (the maximum is {limit}). "
                        f"Last error: {end.reason}",
                    )
                    return
                self.restart_count += 1
                delay = self.config.restart_delay_s
                self._set_state(
                    self.state,
                    error=f"{end.reason} Restarting in {delay} s (attempt {self.restart_count} of {limit}).",
                )
                logger.warning("%s", self.last_error)
                await asyncio.sleep(delay)
                self._set_state(ServerState.STARTING)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("The vLLM supervisor failed")
            with contextlib.suppress(Exception):
                if self._vllm is not None:
                    await self._terminate(graceful=False)
            if self.state != ServerState.FAILED:
                self._set_state(ServerState.FAILED, error=f"The vLLM supervisor failed: {exc}")

    async def _run_once(self) -> RunEnd:
        await self._kill_leftover()
        if port_in_use(self.connect_host, self.config.port):
            return RunEnd(
                f"Port {self.config.port} is already in use by another server; stop it or choose another port "
                "for vLLM.",
                retryable=False,
            )
        self._spawn_task = asyncio.ensure_future(self._spawn())
        try:
            # Shielded: a stop() arriving now waits for the spawn, so the new process is always known.
            vllm = await asyncio.shield(self._spawn_task)
        except (FileNotFoundError, PermissionError, NotADirectoryError):
            return RunEnd(not_found(self.config.vllm_bin).message, retryable=False)
        end = await self._wait_for_readiness(vllm)
        if end is None:
            self._ready_since = self._last_request = self._clock()
            self.phase, self._phase_since, self._phase_started_at = None, None, None
            self._set_state(ServerState.READY, error=None)
            end = await self._monitor(vllm)
        if end.idle:
            logger.info("%s", end.reason)
            self._set_state(ServerState.STOPPING)
        await self._terminate(graceful=vllm.process.returncode is None)
        return end

    async def _spawn(self) -> watchdog.Supervised:
        argv = build_command(self.config)
        env = server_environment(self.config, os.environ)
        logger.info("Starting vLLM: %s", " ".join(redact(argv)))
        self._run_lines.clear()
        vllm = await watchdog.start(
            argv,
            env=env,
            stop_signal=self.config.stop_signal,
            grace_ms=self.config.stop_grace_ms,
            record=self.pgid_file,
            output_limit=1 << 20,
        )
        self._vllm, self._spawned_at = vllm, self._clock()
        self._exit_task = asyncio.create_task(_exited(vllm.process))
        self._reader_task = asyncio.create_task(self._read_output(vllm))
        self.phase = None
        self._enter_phase(StartupPhase.LAUNCHING)  # publishes the new process
        return vllm

    async def _wait_for_readiness(self, vllm: watchdog.Supervised) -> RunEnd | None:
        deadline = self._clock() + self.config.start_timeout_s
        assert self._exit_task is not None
        while True:
            await asyncio.wait({self._exit_task}, timeout=READINESS_POLL_S)
            if self._exit_task.done():
                return await self._startup_failure(vllm)
            if self._clock() >= deadline:
                return RunEnd(
                    f"vLLM did not become ready within {self.config.start_timeout_s} s{self._phase_detail()}.",
                    retryable=True,
                )
            result = await self._probe(timeout=2.0, fetch_version=True)
            if result.ok:
                return None

    async def _startup_failure(self, vllm: watchdog.Supervised) -> RunEnd:
        if self._reader_task is not None:  # the watchdog killed what vLLM left, which may hold the pipe
            await asyncio.wait({self._reader_task}, timeout=2.0)
        returncode = vllm.process.returncode
        error = classify(self._run_lines, model=self.config.model, port=self.config.port, returncode=returncode)
        return RunEnd(error.message, retryable=error.retryable)

    async def _monitor(self, vllm: watchdog.Supervised) -> RunEnd:
        assert self._exit_task is not None
        failures = 0
        interval = self.config.health_check_interval_s
        while True:
            self._check_now.clear()
            woken = asyncio.create_task(self._check_now.wait())
            try:
                await asyncio.wait({self._exit_task, woken}, timeout=interval, return_when=asyncio.FIRST_COMPLETED)
            finally:
                woken.cancel()
            ready_for = self._clock() - (self._ready_since or self._clock())
            if self._exit_task.done():
                reason = f"vLLM (pid {vllm.pid}) exited with code {vllm.process.returncode}."
                self._set_state(ServerState.UNHEALTHY, error=reason)
                return RunEnd(reason, retryable=True, ready_for_s=ready_for)
            result = await self._probe(timeout=float(min(5, max(1, interval))), fetch_version=False)
            if not result.ok:  # a dying process fails its check before its exit is reported
                await asyncio.wait({self._exit_task}, timeout=0.5)
            if self._exit_task.done():
                continue
            if result.ok:
                failures = 0
                if self.restart_count and ready_for >= self.stable_run_s:
                    self.restart_count = 0
                if self.state != ServerState.READY:
                    self._set_state(ServerState.READY, error=None)
                if (idle_for := await self._idle_for()) is not None:
                    return RunEnd(
                        f"vLLM on port {self.config.port} had no request for {idle_for:.0f} s (the idle timeout is "
                        f"{self.config.idle_timeout_s:g} s); stopping it until a page needs it.",
                        retryable=True, ready_for_s=ready_for, idle=True,
                    )
                continue
            failures += 1
            self._set_state(
                ServerState.UNHEALTHY,
                error=f"Health check failed ({failures} of {self.health_failures}): {result.message}",
            )
            if failures >= self.health_failures:
                return RunEnd(
                    f"vLLM (pid {vllm.pid}) stopped answering health checks ({failures} consecutive failures).",
                    retryable=True,
                    ready_for_s=ready_for,
                )

    # --- the idle timeout ------------------------------------------------------------------------------------
    async def _pages_waiting(self) -> int | None:
        return await sync_to_async(demand.pages_waiting)()

    async def _idle_for(self) -> float | None:
        """How long the server has had no request, once that reaches the idle timeout (None: not idle).

        A request is a page waiting for the server in the database (queued, or being read by any runner
        process), or one vLLM logged (its access log, its "Running: N reqs" statistics): another client's
        too. Unknown (the database could not say) counts as busy."""
        timeout = self.config.idle_timeout_s
        if not timeout:
            return None
        waiting = await self._pages_waiting()
        now = self._clock()
        if waiting is None or waiting > 0 or self._last_request is None:
            self._last_request = now
        idle_for = now - self._last_request
        return idle_for if idle_for >= timeout else None

    async def _until_needed(self) -> None:
        """Stopped by the idle timeout: wait until a page needs the server (the database says so, for the
        runners of every process) or this process asks for it (`wake`)."""
        while True:
            self._wake.clear()
            waiting = await self._pages_waiting()
            if waiting:
                logger.info("%d page(s) wait for the model server on port %s; starting it.", waiting, self.config.port)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), IDLE_POLL_S)
            if self._wake.is_set():
                return

    async def _observe(self) -> None:
        """Another process supervises this port: follow its server over HTTP until the lock frees."""
        self.owner = False
        waiting = f"Another ocrsite process supervises vLLM on port {self.config.port}; waiting for it."
        self._set_state(self.state, error=waiting if self.state == ServerState.STARTING else self.last_error)
        while not self._take_lock():
            result = await self._probe(timeout=2.0, fetch_version=self.server_version is None)
            if result.ok and self.state != ServerState.READY:
                self._set_state(ServerState.READY, error=None)
            elif not result.ok and self.state == ServerState.READY:
                self._set_state(ServerState.UNHEALTHY, error=result.message)
            self._check_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._check_now.wait(), min(self.config.health_check_interval_s, 2))
        if self.state == ServerState.READY:  # the other supervisor is gone, and so is its server
            self._set_state(ServerState.UNHEALTHY)
        if self.state != ServerState.STARTING:
            self._set_state(ServerState.STARTING)

    async def _probe(self, *, timeout: float, fetch_version: bool):
        result = await probe(
            self.config.base_url,
            api_key=self.config.api_key,
            model=self.config.served_model_name,
            timeout=timeout,
            check_health=True,
            fetch_version=fetch_version,
        )
        self.last_health_check = result.checked_at
        if result.ok:
            self.served_models = result.served_models
            self.latency_ms = result.latency_ms
            self.server_version = result.server_version or self.server_version
        return result

    async def _read_output(self, vllm: watchdog.Supervised) -> None:
        output = vllm.process.stdout
        assert output is not None
        while True:
            try:
                raw = await output.readline()
            except ValueError:  # a line longer than the buffer limit: take it in pieces
                raw = await output.read(1 << 16)
            if not raw:
                return
            line = self._redact(raw.decode(errors="replace").rstrip("\r\n"))
            vllm_logger.info("[vllm:%d] %s", vllm.pid, line)
            self.log_tail.append(line)
            self._run_lines.append(line)
            if self._ready_since is not None and REQUEST_LINE.search(line):
                self._last_request = self._clock()
            if self._ready_since is None and vllm is self._vllm and (phase := phase_of(line)) is not None:
                self._enter_phase(phase)  # publishes at once: phases are few, and people wait for them
            else:
                self._publish_log_soon()

    def _redact(self, line: str) -> str:
        """Some vLLM versions log their arguments, API key included; the log tail reaches the browser."""
        for secret in (self.config.api_key, self.config.hf_token):
            if secret:
                line = line.replace(secret, "***")
        return line

    # --- stopping and cleaning up process groups -----------------------------------------------------------
    async def _terminate(self, *, graceful: bool) -> None:
        """Stop the current process group: stop signal, SIGKILL after the grace period, confirm it is empty.

        The watchdog does it when its lifeline closes, as it would if this process died; not `graceful`
        (vLLM crashed or hung) sends SIGKILL first. While the watchdog lives it has not reaped vLLM, so
        vLLM's pid still names this group and no other.
        """
        vllm = self._vllm
        if vllm is None:
            return
        assert self._exit_task is not None
        watchdog_alive = vllm.process.returncode is None
        if watchdog_alive and not graceful:
            signal_group(vllm.pid, signal.SIGKILL)
        vllm.release()
        if watchdog_alive:
            await asyncio.wait({self._exit_task}, timeout=self.config.stop_grace_ms / 1000 + 2 * GROUP_EXIT_WAIT_S)
        if group_members(vllm.pid):  # the watchdog was killed, or is stuck: do its work
            logger.error("vLLM process group %d outlived its watchdog; sending SIGKILL.", vllm.pid)
            signal_group(vllm.pid, signal.SIGKILL)
            if not await await_group_gone(vllm.pid, GROUP_EXIT_WAIT_S):
                logger.error("vLLM process group %d survived SIGKILL: %s", vllm.pid, group_members(vllm.pid))
        if self._reader_task is not None:
            await asyncio.wait({self._reader_task}, timeout=1.0)
            self._reader_task.cancel()
        logger.info("vLLM (pid %d) stopped with code %s.", vllm.pid, vllm.process.returncode)
        self._vllm = None
        self._spawned_at = None
        self._ready_since = None
        self.phase, self._phase_since, self._phase_started_at = None, None, None
        with contextlib.suppress(FileNotFoundError):
            self.pgid_file.unlink()
        self._changed()

    async def _kill_leftover(self) -> None:
        """Kill what is left of a group recorded by an earlier supervisor that did not stop it.

        That supervisor and its watchdog were both killed (or the machine lost power mid-stop). Only
        processes the record names, by pid and start time, make the group count as ours.
        """
        try:
            record = GroupRecord.read(self.pgid_file)
        except ValueError as exc:
            logger.warning("Ignoring a damaged record: %s", exc)
            record = None
        if record is not None and (survivors := record.survivors()):
            logger.warning(
                "Killing leftover vLLM process group %d (pids %s) of an earlier supervisor (pid %d, started %s).",
                record.pgid,
                [process.pid for process in survivors],
                record.supervisor_pid,
                record.started_at,
            )
            signal_group(record.pgid, signal.SIGKILL)
            if not await await_group_gone(record.pgid, GROUP_EXIT_WAIT_S):
                logger.error("Leftover vLLM process group %d survived SIGKILL.", record.pgid)
        self.pgid_file.unlink(missing_ok=True)

    def _kill_at_exit(self) -> None:
        """Synchronous last resort (atexit; a supervisor whose loop is gone): SIGKILL the group, close the lifeline.

        Also runs on the development autoreloader's sys.exit(3), where no lifespan shutdown happens.
        """
        vllm, self._vllm = self._vllm, None
        if vllm is not None:
            if vllm.process.returncode is None:  # the watchdog lives, so vLLM's pid names its group
                signal_group(vllm.pid, signal.SIGKILL)
            vllm.release()

    def _take_lock(self) -> bool:
        if self._lock_fd is not None:
            return True
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        self.owner = True
        return True

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            self.state_file.unlink(missing_ok=True)  # no longer this process's to report
            os.close(self._lock_fd)
            self._lock_fd = None
        self.owner = False
