"""Real ocrsite processes: `manage.py serve` (lifespan), `manage.py vllm_server`, `vllm_status`."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.support import free_port, manage, pid_alive, port_open, vllm_pids, vllm_record, wait_until
from tests.vllm_control.conftest import read_until
from vllm_control.processes import group_members

pytestmark = pytest.mark.timeout(120)


def test_serve_runs_the_lifespan_and_sigterm_leaves_no_process(site):
    env, vllm_port, spawn = site
    web_port = free_port()
    server = spawn("serve", "--port", str(web_port))
    wait_until(lambda: port_open(web_port), 30, message="the web server")
    wait_until(lambda: len(vllm_pids(env)) >= 3, 30, message="vLLM, its EngineCore and its worker")
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
    assert group_members(vllm) == [] and vllm_pids(env) == []
    assert manage(["vllm_status"], env).returncode == 1


def test_vllm_server_restarts_after_a_crash_and_prints_ready_again(site):
    env, port, spawn = site
    manager = spawn("vllm_server", "--report-interval", "60", "--restart-delay", "1", "--log-file", "")
    read_until(manager, "vLLM server is ready and accepting requests", 30)
    wait_until(lambda: len(vllm_pids(env)) >= 3, 10, message="vLLM, its EngineCore and its worker")
    first = vllm_pids(env)
    os.kill(vllm_record(env).pgid, signal.SIGKILL)
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
