"""Real ocrsite processes: `manage.py serve` (lifespan), `manage.py vllm_server`, `vllm_status`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.support import (
    REPO,
    free_port,
    kill_group,
    manage,
    pid_alive,
    port_open,
    processes_in_group,
    processes_with_marker,
    project_env,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

SETTINGS = "from vllm_control.models import VLMSettings as V; r = V.load(); r.mode = 'local'; r.health_check_interval_s = 1; r.restart_delay_s = 1; r.save()"


@pytest.fixture(scope="module")
def migrated_data_dir(tmp_path_factory):
    """Migrated once per module (Local mode, 1 s health checks and restart delay), copied for each test."""
    template = tmp_path_factory.mktemp("ocrsite-data")
    env = project_env(template)
    assert manage(["migrate", "-v0"], env).returncode == 0
    done = manage(["shell", "-c", SETTINGS], env)
    assert done.returncode == 0, done.stderr
    return template


@pytest.fixture
def site(tmp_path, migrated_data_dir):
    """A fresh, migrated data directory and the environment of processes using it."""
    shutil.copytree(migrated_data_dir, tmp_path, dirs_exist_ok=True)
    port = free_port()
    env = project_env(
        tmp_path,
        {
            "VLLM_PORT": str(port),
            "VLLM_HOST": "127.0.0.1",
            "VLLM_STOP_GRACE_MS": "1000",
            "FAKE_VLLM_STARTUP_DELAY": "0.3",
            "FAKE_VLLM_MAX_LIFETIME": "120",
            "OCRSITE_EMBEDDED_RUNNER": "false",
        },
    )
    started: list[subprocess.Popen] = []

    def spawn(*args: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "manage.py"), *args],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        started.append(proc)
        return proc

    yield env, port, spawn
    for proc in started:
        kill_group(proc.pid)
        proc.wait(timeout=10)
    for pid in processes_with_marker(env["OCRSITE_TEST_MARKER"]):
        os.kill(pid, signal.SIGKILL)


def vllm_pids(env) -> list[int]:
    """The double's processes started for this test (the ocrsite processes excluded)."""
    return [pid for pid in processes_with_marker(env["OCRSITE_TEST_MARKER"]) if _is_vllm(pid)]


def _is_vllm(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            return b"OCRSITE_VLLM_INSTANCE=" in handle.read()
    except OSError:
        return False


def read_until(proc: subprocess.Popen, text: str, timeout: float) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if text in line:
            return lines
    raise AssertionError(f"{text!r} not printed; got {lines}")


def test_serve_runs_the_lifespan_and_sigterm_leaves_no_process(site):
    env, vllm_port, spawn = site
    web_port = free_port()
    server = spawn("serve", "--port", str(web_port))
    wait_until(lambda: port_open(web_port), 30, message="the web server")
    wait_until(lambda: len(vllm_pids(env)) >= 2, 30, message="vLLM and its EngineCore child")
    wait_until(lambda: manage(["vllm_status"], env).returncode == 0, 30, message="vLLM ready")
    children = vllm_pids(env)
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=30) == 0
    assert not any(pid_alive(pid) for pid in children)
    assert vllm_pids(env) == []
    assert not port_open(vllm_port)


def test_vllm_server_prints_ready_and_reports_and_exits_0_on_sigterm(site):
    env, port, spawn = site
    manager = spawn("vllm_server", "--report-interval", "0.5", "--log-file", "manager.log")
    read_until(manager, "vLLM server is ready and accepting requests", 30)
    report = json.loads(read_until(manager, '"healthy"', 10)[-1])
    assert report["healthy"] is True and report["port"] == port and report["restart_count"] == 0
    assert {"pid", "model", "uptime_seconds", "last_health_check"} <= set(report)
    assert time.strptime(report["last_health_check"][:19], "%Y-%m-%dT%H:%M:%S")
    status = manage(["vllm_status", "--json"], env)
    assert status.returncode == 0 and json.loads(status.stdout)["state"] == "ready"
    vllm = report["pid"]
    manager.send_signal(signal.SIGTERM)
    assert manager.wait(timeout=30) == 0
    assert processes_in_group(vllm) == [] and vllm_pids(env) == []
    assert manage(["vllm_status"], env).returncode == 1


def test_vllm_server_restarts_after_a_crash_and_prints_ready_again(site):
    env, port, spawn = site
    manager = spawn("vllm_server", "--report-interval", "60", "--restart-delay", "1", "--log-file", "")
    read_until(manager, "vLLM server is ready and accepting requests", 30)
    first = [pid for pid in vllm_pids(env)]
    leader = min(first)
    os.kill(leader, signal.SIGKILL)
    read_until(manager, "vLLM server is ready and accepting requests", 30)
    assert not any(pid_alive(pid) for pid in first)
    manager.send_signal(signal.SIGINT)
    assert manager.wait(timeout=30) == 0


def test_vllm_server_exits_non_zero_after_giving_up(site):
    env, port, spawn = site
    env["FAKE_VLLM_FAIL_WITH"] = "address_in_use"
    manager = spawn("vllm_server", "--max-restart-attempts", "1", "--restart-delay", "1", "--log-file", "")
    assert manager.wait(timeout=30) == 1
    assert "Gave up after 1 restart attempt(s)" in manager.stderr.read()


def test_sigkilled_manager_leaves_no_vllm_after_the_next_start(site):
    env, port, spawn = site
    manager = spawn("vllm_server", "--log-file", "")
    read_until(manager, "vLLM server is ready and accepting requests", 30)
    before = vllm_pids(env)
    assert len(before) >= 2
    manager.send_signal(signal.SIGKILL)
    manager.wait(timeout=10)
    # The parent-death signal kills vLLM itself; its EngineCore child would linger (as vLLM's does).
    again = spawn("vllm_server", "--log-file", "")
    read_until(again, "vLLM server is ready and accepting requests", 30)
    assert not any(pid_alive(pid) for pid in before)
    after = vllm_pids(env)
    assert after and not set(after) & set(before)
    again.send_signal(signal.SIGTERM)
    assert again.wait(timeout=30) == 0
    assert vllm_pids(env) == []
