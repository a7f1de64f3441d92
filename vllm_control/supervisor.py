"""Supervise one local `vllm serve`: spawn, readiness, health monitoring, restart, stop.

One explicit state machine (TRANSITIONS below). vLLM spawns children of its own (EngineCore, workers)
that keep the GPU when only the parent dies, so everything acts on the whole process group:
  - the child runs in its own session/process group, with a parent-death signal;
  - its process group id is recorded in DATA_DIR so the next start kills a leftover group (checked by a
    marker variable in the processes' environment, so a reused pid is never killed);
  - stop = stop signal to the group, SIGKILL to the group after the grace period, then confirm it is empty.
Only one process supervises a port (an flock in DATA_DIR); another process that cannot take the lock
observes the server over HTTP instead of spawning a second one, and takes over when the lock frees.
All methods must run on the event loop the supervisor was started on (see vllm_control.runtime).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import fcntl
import json
import logging
import os
import signal
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from django.conf import settings

from vllm_control.command import build_command, redact, server_environment
from vllm_control.config import LocalServerConfig
from vllm_control.errors import ModelServerUnavailable
from vllm_control.events import publish_server_status
from vllm_control.external import now_iso, probe
from vllm_control.startup_errors import classify, not_found
from vllm_control.status import ServerState, ServerStatus

logger = logging.getLogger(__name__)
vllm_logger = logging.getLogger("vllm_control.vllm")

S = ServerState
TRANSITIONS: dict[ServerState, frozenset[ServerState]] = {
    S.STOPPED: frozenset({S.STARTING}),
    # STARTING -> STARTING: the next attempt after a start-up failure.
    S.STARTING: frozenset({S.STARTING, S.READY, S.UNHEALTHY, S.FAILED, S.STOPPING}),
    S.READY: frozenset({S.UNHEALTHY, S.STOPPING}),
    # UNHEALTHY -> STARTING: restart after a crash or a hang.
    S.UNHEALTHY: frozenset({S.UNHEALTHY, S.READY, S.STARTING, S.FAILED, S.STOPPING}),
    S.STOPPING: frozenset({S.STOPPED}),
    S.FAILED: frozenset({S.STARTING, S.STOPPED}),
}

INSTANCE_MARKER = "OCRSITE_VLLM_INSTANCE"
LOG_TAIL_LINES = 200
STABLE_RUN_S = 300.0  # a run that stayed ready this long resets the restart count
HEALTH_FAILURES = 3  # consecutive failed health checks that count as a hang
READINESS_POLL_S = 0.5
GROUP_EXIT_WAIT_S = 10.0

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: the pre-exec function must not load libraries


_KEEP = object()  # _set_state: leave last_error as it is


class InvalidTransition(RuntimeError):
    pass


@dataclass(frozen=True)
class RunEnd:
    """Why one run of the server ended."""

    reason: str
    retryable: bool
    ready_for_s: float = 0.0


# --- process groups -------------------------------------------------------------------------------------


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids in process group `pgid`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            pids.append(int(entry))
    return pids


def has_marker(pid: int, instance: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            return f"{INSTANCE_MARKER}={instance}".encode() in handle.read().split(b"\0")
    except OSError:
        return False


def signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def wait_group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while group_members(pgid):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    def preexec() -> None:
        # Runs in the child between fork and exec. The signal fires when the *thread* that forked exits,
        # which is why the supervisor spawns from its long-lived event-loop thread.
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


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


# --- the supervisor ---------------------------------------------------------------------------------------


class Supervisor:
    def __init__(
        self,
        config: LocalServerConfig,
        *,
        data_dir: Path | None = None,
        stable_run_s: float = STABLE_RUN_S,
        health_failures: int = HEALTH_FAILURES,
    ) -> None:
        self.config = config
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
        self.log_tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self._run_lines: deque[str] = deque(maxlen=2 * LOG_TAIL_LINES)
        self._listeners: list[Callable[[ServerStatus], None]] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._pgid: int | None = None
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
    def connect_host(self) -> str:
        return urlsplit(self.config.base_url).hostname or "127.0.0.1"

    @property
    def running(self) -> bool:
        return self._run_task is not None and not self._run_task.done()

    # --- status and notifications ----------------------------------------------------------------------
    def status(self) -> ServerStatus:
        alive = self._proc is not None and self._proc.returncode is None
        return ServerStatus(
            mode="local",
            state=self.state,
            model=self.config.served_model_name,
            base_url=self.config.base_url,
            port=self.config.port,
            pid=self._proc.pid if alive else None,
            restart_count=self.restart_count,
            uptime_s=round(time.monotonic() - self._spawned_at, 1) if alive and self._spawned_at else None,
            last_health_check=self.last_health_check,
            last_error=self.last_error,
            log_tail=list(self.log_tail),
            served_models=list(self.served_models),
            server_version=self.server_version,
            latency_ms=self.latency_ms,
            supervised_here=self.owner,
        )

    def add_listener(self, callback: Callable[[ServerStatus], None]) -> None:
        self._listeners.append(callback)

    def _set_state(self, new: ServerState, *, error: object = _KEEP) -> None:
        if new not in TRANSITIONS[self.state] and new != self.state:
            raise InvalidTransition(f"{self.state} -> {new}")
        if new != self.state:
            logger.info("vLLM server on port %s: %s -> %s", self.config.port, self.state, new)
        self.state = new
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
        self._change.set()
        self._change = asyncio.Event()

    def _publish(self, status: ServerStatus) -> None:
        task = asyncio.get_running_loop().create_task(publish_server_status(status))
        self._background.add(task)
        task.add_done_callback(self._publish_done)

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
            if self._pgid is not None:
                await self._terminate(graceful=True)
            self._release_lock()
            if self.state != ServerState.STOPPED:
                self._set_state(ServerState.STOPPED)

    async def restart(self, config: LocalServerConfig | None = None) -> None:
        await self.stop()
        if config is not None:
            self.config = config
        self.restart_count = 0
        await self.start()

    def check_health_now(self) -> None:
        """Run a health check at once (a request to the server just failed)."""
        self._check_now.set()

    async def wait_ready(self, timeout: float) -> ServerStatus:
        """Wait for READY; raise ModelServerUnavailable when it failed, was stopped or took too long."""
        deadline = time.monotonic() + timeout
        while True:
            if self.state == ServerState.READY:
                return self.status()
            if self.state in (ServerState.FAILED, ServerState.STOPPED):
                raise ModelServerUnavailable(self.last_error or f"The vLLM server is {self.state}.")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                detail = f" Last error: {self.last_error}" if self.last_error else ""
                raise ModelServerUnavailable(f"The vLLM server did not become ready within {timeout:g} s.{detail}")
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
                if self._pgid is not None:
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
            proc = await asyncio.shield(self._spawn_task)
        except (FileNotFoundError, PermissionError, NotADirectoryError):
            return RunEnd(not_found(self.config.vllm_bin).message, retryable=False)
        end = await self._wait_for_readiness(proc)
        if end is None:
            self._ready_since = time.monotonic()
            self._set_state(ServerState.READY, error=None)
            end = await self._monitor(proc)
        await self._terminate(graceful=proc.returncode is None)
        return end

    async def _spawn(self) -> asyncio.subprocess.Process:
        argv = build_command(self.config)
        instance = uuid.uuid4().hex
        env = server_environment(self.config, os.environ) | {INSTANCE_MARKER: instance}
        logger.info("Starting vLLM: %s", " ".join(redact(argv)))
        self._run_lines.clear()
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()),
            limit=1 << 20,
        )
        self._proc, self._pgid, self._spawned_at = proc, proc.pid, time.monotonic()
        self._write_pgid_file(proc.pid, instance)
        self._exit_task = asyncio.create_task(_exited(proc))
        self._reader_task = asyncio.create_task(self._read_output(proc))
        self._changed()
        return proc

    async def _wait_for_readiness(self, proc: asyncio.subprocess.Process) -> RunEnd | None:
        deadline = time.monotonic() + self.config.start_timeout_s
        assert self._exit_task is not None
        while True:
            await asyncio.wait({self._exit_task}, timeout=READINESS_POLL_S)
            if self._exit_task.done():
                return await self._startup_failure(proc)
            if time.monotonic() >= deadline:
                return RunEnd(f"vLLM did not become ready within {self.config.start_timeout_s} s.", retryable=True)
            result = await self._probe(timeout=2.0, fetch_version=True)
            if result.ok:
                return None

    async def _startup_failure(self, proc: asyncio.subprocess.Process) -> RunEnd:
        if self._pgid is not None:  # its children may hold the output pipe open
            signal_group(self._pgid, signal.SIGKILL)
        if self._reader_task is not None:
            await asyncio.wait({self._reader_task}, timeout=2.0)
        error = classify(self._run_lines, model=self.config.model, port=self.config.port, returncode=proc.returncode)
        return RunEnd(error.message, retryable=error.retryable)

    async def _monitor(self, proc: asyncio.subprocess.Process) -> RunEnd:
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
            ready_for = time.monotonic() - (self._ready_since or time.monotonic())
            if self._exit_task.done():
                reason = f"vLLM (pid {proc.pid}) exited with code {proc.returncode}."
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
                continue
            failures += 1
            self._set_state(
                ServerState.UNHEALTHY,
                error=f"Health check failed ({failures} of {self.health_failures}): {result.message}",
            )
            if failures >= self.health_failures:
                return RunEnd(
                    f"vLLM (pid {proc.pid}) stopped answering health checks ({failures} consecutive failures).",
                    retryable=True,
                    ready_for_s=ready_for,
                )

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

    async def _read_output(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            try:
                raw = await proc.stdout.readline()
            except ValueError:  # a line longer than the buffer limit: take it in pieces
                raw = await proc.stdout.read(1 << 16)
            if not raw:
                return
            line = self._redact(raw.decode(errors="replace").rstrip("\r\n"))
            vllm_logger.info("[vllm:%d] %s", proc.pid, line)
            self.log_tail.append(line)
            self._run_lines.append(line)
            self._publish_log_soon()

    def _redact(self, line: str) -> str:
        """Some vLLM versions log their arguments, API key included; the log tail reaches the browser."""
        for secret in (self.config.api_key, self.config.hf_token):
            if secret:
                line = line.replace(secret, "***")
        return line

    # --- stopping and cleaning up process groups -----------------------------------------------------------
    async def _terminate(self, *, graceful: bool) -> None:
        """Stop the current process group: stop signal, SIGKILL after the grace period, confirm it is empty."""
        pgid, proc = self._pgid, self._proc
        if pgid is None:
            return
        if graceful and group_members(pgid):
            signal_group(pgid, self.config.stop_signal)
            if not await wait_group_gone(pgid, self.config.stop_grace_ms / 1000):
                logger.warning(
                    "vLLM process group %d still running %d ms after %s; sending SIGKILL.",
                    pgid,
                    self.config.stop_grace_ms,
                    self.config.stop_signal.name,
                )
        signal_group(pgid, signal.SIGKILL)
        if not await wait_group_gone(pgid, GROUP_EXIT_WAIT_S):
            logger.error("vLLM process group %d is still alive after SIGKILL: %s", pgid, group_members(pgid))
        if self._exit_task is not None:
            await asyncio.wait({self._exit_task}, timeout=GROUP_EXIT_WAIT_S)
        if self._reader_task is not None:
            await asyncio.wait({self._reader_task}, timeout=1.0)
            self._reader_task.cancel()
        if proc is not None:
            logger.info("vLLM (pid %d) stopped with code %s.", proc.pid, proc.returncode)
        self._pgid = None
        self._spawned_at = None
        self._ready_since = None
        with contextlib.suppress(FileNotFoundError):
            self.pgid_file.unlink()
        self._changed()

    async def _kill_leftover(self) -> None:
        """Kill a process group recorded by an earlier supervisor that did not stop it (e.g. SIGKILLed)."""
        try:
            record = json.loads(self.pgid_file.read_text())
            pgid, instance = int(record["pgid"]), str(record["instance"])
        except FileNotFoundError:
            return
        except (ValueError, KeyError, TypeError):
            self.pgid_file.unlink(missing_ok=True)
            return
        ours = [pid for pid in group_members(pgid) if has_marker(pid, instance)]
        if ours:
            logger.warning("Killing leftover vLLM process group %d (pids %s) from an earlier run.", pgid, ours)
            signal_group(pgid, signal.SIGKILL)
            if not await wait_group_gone(pgid, GROUP_EXIT_WAIT_S):
                logger.error("Leftover vLLM process group %d survived SIGKILL.", pgid)
        self.pgid_file.unlink(missing_ok=True)

    def _write_pgid_file(self, pgid: int, instance: str) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        record = {"pgid": pgid, "instance": instance, "started_at": now_iso(), "supervisor_pid": os.getpid()}
        self.pgid_file.write_text(json.dumps(record))

    def _kill_at_exit(self) -> None:
        # Also runs on the development autoreloader's sys.exit(3), where no lifespan shutdown happens.
        if self._pgid is not None:
            signal_group(self._pgid, signal.SIGKILL)

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
            os.close(self._lock_fd)
            self._lock_fd = None
        self.owner = False
