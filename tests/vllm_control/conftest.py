from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import replace
import pytest

from tests.support import FAKE_VLLM, REPO, free_port, kill_group, kill_test_processes, manage, project_env
from vllm_control.config import LocalServerConfig

MODEL = "Qwen/Qwen3-VL-2B-Instruct"


def make_local_config(port: int, **overrides) -> LocalServerConfig:
    config = LocalServerConfig(
        vllm_bin=str(FAKE_VLLM),
        model=MODEL,
        served_model_name=MODEL,
        host="127.0.0.1",
        port=port,
        protocol="http",
        base_url=f"http://127.0.0.1:{port}/v1",
        api_key="",
        serve_args=(),
        stop_signal=signal.SIGTERM,
        stop_grace_ms=1000,
        start_timeout_s=30,
        health_check_interval_s=1,
        max_restart_attempts=3,
        restart_delay_s=1,
        gpu_memory_utilization=None,
        max_model_len=None,
        tensor_parallel_size=None,
        data_parallel_size=None,
        autostart=True,
        hf_token="",
    )
    return replace(config, **overrides)


@pytest.fixture
def test_marker(monkeypatch, tmp_path):
    """Every process started by the test carries this marker; whatever is left at the end is killed
    (with the vLLM groups recorded in tmp_path, the data directory of the supervisors tests create)."""
    marker = f"ocrsite-test-{uuid.uuid4().hex}"
    monkeypatch.setenv("OCRSITE_TEST_MARKER", marker)
    monkeypatch.setenv("FAKE_VLLM_STARTUP_DELAY", "0.3")
    monkeypatch.setenv("FAKE_VLLM_MAX_LIFETIME", "120")
    yield marker
    kill_test_processes(marker, tmp_path)


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def fake_server(test_marker):
    """Start the double as an external server: fake_server(port, *extra_args) -> port."""
    import subprocess

    from tests.support import kill_group, port_open, wait_until

    started: list[subprocess.Popen] = []

    def start(port: int, *args: str, model: str = MODEL) -> int:
        proc = subprocess.Popen(
            [str(FAKE_VLLM), "serve", model, "--host", "127.0.0.1", "--port", str(port), *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        started.append(proc)
        wait_until(lambda: port_open(port), 15, message="the double to listen")
        return port

    yield start
    for proc in started:
        kill_group(proc.pid)
        proc.wait(timeout=10)


def external_config(base_url: str, *, api_key: str = "", model: str = MODEL):
    from vllm_control.config import resolve_config
    from vllm_control.models import VLMSettings

    row = VLMSettings(mode="external", external_base_url=base_url, external_api_key=api_key, model=model)
    return resolve_config(row, environ={})


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
    kill_test_processes(env["OCRSITE_TEST_MARKER"], tmp_path)


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
