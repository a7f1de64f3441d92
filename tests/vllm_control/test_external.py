"""External mode checks against the double running as someone else's server."""

from __future__ import annotations

import asyncio

import pytest

from tests.support import free_port
from tests.vllm_control.conftest import MODEL, external_config
from vllm_control import runtime
from vllm_control.errors import ModelServerUnavailable
from vllm_control.external import backoff_delays, probe, verify_external
from vllm_control.status import ServerState

pytestmark = pytest.mark.timeout(60)


async def test_ready_server_reports_models_version_and_latency(fake_server, port):
    fake_server(port, "--api-key", "sekrit")
    for base in (f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/v1/"):
        config = external_config(base, api_key="sekrit")
        assert config.base_url == f"http://127.0.0.1:{port}/v1"
        result = await verify_external(config)
        assert result.ok and result.served_models == [MODEL]
        assert result.server_version and result.latency_ms is not None
    status = await runtime.current_status(config, fresh=True)
    assert status.mode == "external" and status.state == ServerState.READY
    await runtime.ensure_ready(config)


async def test_wrong_model_names_what_the_server_serves(fake_server, port):
    fake_server(port, model="someone/other-model")
    config = external_config(f"http://127.0.0.1:{port}/v1")
    with pytest.raises(ModelServerUnavailable) as raised:
        await runtime.ensure_ready(config)
    assert raised.value.message == (
        f"The model server at http://127.0.0.1:{port}/v1 does not serve the model '{MODEL}'; "
        "it serves 'someone/other-model'."
    )


async def test_rejected_api_key_is_a_clear_error(fake_server, port):
    fake_server(port, "--api-key", "right-key")
    config = external_config(f"http://127.0.0.1:{port}/v1", api_key="wrong-key")
    with pytest.raises(ModelServerUnavailable) as raised:
        await runtime.ensure_ready(config)
    assert "rejected the API key (HTTP 401)" in raised.value.message
    assert "wrong-key" not in raised.value.message


async def test_connection_is_retried_with_backoff_until_the_server_appears(fake_server):
    port = free_port()
    config = external_config(f"http://127.0.0.1:{port}")
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 3:
            await asyncio.get_running_loop().run_in_executor(None, fake_server, port)

    result = await verify_external(config, sleep=sleep)
    assert result.ok
    assert waits == [1.0, 2.0, 4.0]


async def test_unreachable_server_gives_up_after_ten_attempts():
    config = external_config(f"http://127.0.0.1:{free_port()}")
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    result = await verify_external(config, sleep=sleep)
    assert not result.ok and "Cannot connect" in result.message
    assert len(waits) == 9 and waits == backoff_delays() and max(waits) == 60.0


async def test_probe_times_out_on_a_silent_server():
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        result = await probe(f"http://127.0.0.1:{port}/v1", api_key="", model=MODEL, timeout=0.5)
    assert not result.ok and "did not answer within 0.5 s" in result.message
