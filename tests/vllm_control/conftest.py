from __future__ import annotations

import os
import signal
import uuid
from dataclasses import replace

import pytest

from tests.support import FAKE_VLLM, free_port, processes_with_marker
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
def test_marker(monkeypatch):
    """Every process started by the test carries this marker; whatever is left at the end is killed."""
    marker = f"ocrsite-test-{uuid.uuid4().hex}"
    monkeypatch.setenv("OCRSITE_TEST_MARKER", marker)
    monkeypatch.setenv("FAKE_VLLM_STARTUP_DELAY", "0.3")
    monkeypatch.setenv("FAKE_VLLM_MAX_LIFETIME", "120")
    yield marker
    for pid in set(processes_with_marker(marker)) - {os.getpid()}:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


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
