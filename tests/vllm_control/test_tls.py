"""Every HTTP client to a model server shares one TLS context: httpx builds (and loads a CA bundle into) a
new one per client otherwise, which stalled the event loop for up to a third of a second per probe."""

from __future__ import annotations

import httpx

from scans.pipeline.vllm_engine import VLLMEngine
from vllm_control import external
from vllm_control.tls import tls_context


def _context_of(client: httpx.AsyncClient):
    return client._transport._pool._ssl_context  # httpx 0.28 / httpcore 1.x


async def test_engines_and_probes_share_one_context(monkeypatch):
    engines = [VLLMEngine(f"http://h{n}:8000/v1", "m", timeout_s=1, max_in_flight=1) for n in range(2)]
    assert all(_context_of(engine._client) is tls_context() for engine in engines)
    for engine in engines:
        await engine.aclose()

    seen = []
    real_client = httpx.AsyncClient

    def recording_client(*args, **kwargs):
        client = real_client(*args, **kwargs)
        seen.append(_context_of(client))
        return client

    monkeypatch.setattr(external.httpx, "AsyncClient", recording_client)
    await external.probe("http://127.0.0.1:9/v1", api_key="", model="m", timeout=0.2)
    assert len(seen) == 1 and seen[0] is tls_context()
