"""Helpers shared by tests that start real processes and talk to real services on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

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
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def processes_in_group(pgid: int) -> list[int]:
    from vllm_control.supervisor import group_members  # needs Django set up; bench imports this module before

    return group_members(pgid)


def processes_with_marker(marker: str) -> list[int]:
    """Live pids whose environment holds `marker` (tests tag every process they start with one)."""
    pids = []
    needle = marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if needle in handle.read() and pid_alive(int(entry)):
                    pids.append(int(entry))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return pids


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
