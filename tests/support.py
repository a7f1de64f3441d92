"""Helpers shared by tests that start real processes and talk to real services on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

import psutil

from vllm_control.processes import GroupRecord, group_members, is_live, signal_group

REPO = Path(__file__).resolve().parent.parent
FAKE_VLLM = REPO / "tests" / "fakes" / "vllm"
POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def wait_until(predicate, timeout: float, interval: float = 0.05, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


def pid_alive(pid: int) -> bool:
    """`pid` is a running process (not one that exited and waits for its parent: `is_live`)."""
    try:
        return is_live(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


def processes_with_marker(marker: str) -> list[int]:
    """Live pids whose environment holds OCRSITE_TEST_MARKER=`marker` (tests tag every process they start).

    A process that renamed itself with setproctitle (the double's EngineCore and workers, as vLLM's) has
    lost its environment block: `kill_test_processes` also finds those through the supervisor's record.
    """
    pids = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("OCRSITE_TEST_MARKER") == marker and is_live(process):
                pids.append(process.pid)
        except psutil.Error:
            continue
    return pids


def kill_test_processes(marker: str, data_dir: Path | None = None) -> None:
    """Safety net after a test: SIGKILL its tagged processes and the vLLM groups recorded in `data_dir`."""
    for record_file in data_dir.glob("vllm-*.pgid") if data_dir is not None else ():
        with contextlib.suppress(ValueError):
            record = GroupRecord.read(record_file)
            if record is not None and record.survivors():
                signal_group(record.pgid, signal.SIGKILL)
    for pid in set(processes_with_marker(marker)) - {os.getpid()}:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def vllm_record(env: Mapping[str, str]) -> GroupRecord | None:
    """The record of the vLLM group that a supervisor with this environment (OCRSITE_DATA_DIR, VLLM_PORT)
    runs or left behind."""
    return GroupRecord.read(Path(env["OCRSITE_DATA_DIR"]) / f"vllm-{env['VLLM_PORT']}.pgid")


def vllm_pids(env: Mapping[str, str]) -> list[int]:
    """The live processes of that recorded vLLM group: the double's API server, EngineCore and workers."""
    record = vllm_record(env)
    return group_members(record.pgid) if record is not None else []


def watchdogs_of(supervisor_pid: int) -> list[psutil.Process]:
    """The watchdogs a supervising process started (one per local server it runs); vLLM runs under them."""
    children = psutil.Process(supervisor_pid).children()
    return [child for child in children if "vllm_control.watchdog" in child.cmdline()]


def service_available(host: str, port: int) -> bool:
    return port_open(port, host)


def project_env(data_dir: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a child ocrsite process with its own data directory (and SQLite file)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(
        OCRSITE_DATA_DIR=str(data_dir),
        DJANGO_SETTINGS_MODULE="ocrsite.settings",
        PYTHONUNBUFFERED="1",
        VLLM_BIN=str(FAKE_VLLM),
        OCRSITE_TEST_MARKER=f"ocrsite-test-{uuid.uuid4().hex}",
    )
    env.update(extra or {})
    return env


def manage(args: list[str], env: Mapping[str, str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "manage.py"), *args],
        env=dict(env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
