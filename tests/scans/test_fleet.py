"""Several model servers: each page request goes to the healthy endpoint with the least work in flight for
its capacity; a server that dies mid-request has its pages resent to another (not counted as attempts,
finished pages never redone); an endpoint taken out comes back when its health checks pass."""

from __future__ import annotations

import asyncio
import json

import pytest
from asgiref.sync import sync_to_async
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from scans.models import Page, Scan
from scans.pipeline.runner import Runner
from tests.scans.conftest import new_scan, use_external
from tests.scans.pipeline.helpers import MODEL, stop_fake_vllm
from vllm_control import router as router_module
from vllm_control.config import Endpoint, resolve_config
from vllm_control.external import ProbeResult
from vllm_control.models import ModelServer
from vllm_control.router import Router
from vllm_control.status import ServerState

pytestmark = [pytest.mark.timeout(60)]


def endpoint(key: str, capacity: int, url: str | None = None) -> Endpoint:
    return Endpoint(key=key, name=key, kind="external", base_url=url or f"http://{key}:8000/v1", capacity=capacity)


class Health:
    """A probe the test controls: every endpoint passes unless named in `down`."""

    def __init__(self) -> None:
        self.down: set[str] = set()
        self.calls: list[str] = []

    async def __call__(self, endpoint: Endpoint, model: str) -> ProbeResult:
        self.calls.append(endpoint.key)
        if endpoint.key in self.down:
            return ProbeResult(False, False, True, f"Cannot connect to {endpoint.base_url}.")
        return ProbeResult(True, True, False)


@pytest.fixture
async def fresh_router(monkeypatch):
    """This process's router, new for the test (and its health loop stopped after it)."""
    router = Router()
    monkeypatch.setattr(router_module, "_router", router)
    yield router
    await router.stop()


# --- the choice ----------------------------------------------------------------------------------------------


async def test_requests_go_to_the_least_loaded_endpoint_for_its_capacity():
    health = Health()
    router = Router(probe=health)
    router.configure((endpoint("big", 4), endpoint("small", 2)), model=MODEL)
    await router.check_now()

    leases = [await router.acquire(timeout=1) for _ in range(6)]

    chosen = [lease.endpoint.key for lease in leases]
    assert chosen.count("big") == 4 and chosen.count("small") == 2
    # Equal loads alternate: the first two requests went to different endpoints.
    assert set(chosen[:2]) == {"big", "small"}
    router.release(next(lease for lease in leases if lease.endpoint.key == "small"), answered=True)
    assert (await router.acquire(timeout=1)).endpoint.key == "small"  # 1/2 free beats 0/4 free
    statuses = {status.key: status for status in router.statuses()}
    assert statuses["big"].in_flight == 4 and statuses["small"].in_flight == 2
    assert statuses["small"].pages_per_s > 0 and statuses["small"].latency_ms is not None
    await router.stop()


async def test_an_endpoint_taken_out_is_skipped_and_comes_back_when_its_health_check_passes():
    health = Health()
    router = Router(probe=health)
    router.configure((endpoint("a", 2), endpoint("b", 2)), model=MODEL)
    await router.check_now()
    lease = await router.acquire(timeout=1)
    assert lease.endpoint.key == "a"

    health.down.add("a")
    router.release(lease, answered=False, connection_lost=True, error="Cannot connect to a.")
    assert {s.key: s.state for s in router.statuses()}["a"] == ServerState.UNHEALTHY
    assert [(await router.acquire(timeout=1)).endpoint.key for _ in range(3)] == ["b", "b", "b"]

    health.down.clear()
    router._endpoints["a"].next_probe = 0  # due now (the loop would probe it within DOWN_PROBE_S)
    await router.check_now()
    assert {s.key: s.state for s in router.statuses()}["a"] == ServerState.READY
    # Back in the rotation, its status no longer shows why it was out (found by hand: the settings page
    # showed "ready" beside "Cannot connect to the model server ...").
    assert {s.key: s.last_error for s in router.statuses()}["a"] is None
    assert (await router.acquire(timeout=1)).endpoint.key == "a"
    await router.stop()


async def test_requests_wait_while_no_endpoint_is_healthy_then_go_to_the_first_back():
    health = Health()
    health.down = {"a", "b"}
    router = Router(probe=health)
    router.configure((endpoint("a", 2), endpoint("b", 2)), model=MODEL)
    waiting = asyncio.create_task(router.acquire(timeout=30))
    await asyncio.sleep(0.2)  # (the outcome does not depend on this: the request must not have been served)
    assert not waiting.done()
    health.down = {"a"}  # b answers its next health check (the loop probes endpoints that are out every second)
    lease = await asyncio.wait_for(waiting, 10)
    assert lease.endpoint.key == "b"
    with pytest.raises(router_module.NoEndpointAvailable, match="No model server is available"):
        health.down = {"a", "b"}
        router._endpoints["b"].state = ServerState.UNHEALTHY
        await router.acquire(timeout=0.1)
    await router.stop()


# --- the pipeline, against two doubles -------------------------------------------------------------------------


def add_external_server(base_url: str, capacity: int) -> ModelServer:
    return ModelServer.objects.create(kind="external", base_url=base_url, capacity=capacity, api_key="sk-second-secret")


@pytest.mark.django_db(transaction=True)
async def test_a_server_killed_mid_request_has_its_pages_resent_to_the_other(fake, owner, tmp_path, fresh_router, monkeypatch, settings):
    monkeypatch.setenv("OCRSITE_RUNNER_POLL_MS", "200")
    settings.MEDIA_ROOT = tmp_path / "media"
    hold_all = json.dumps({str(n): ["hold"] for n in range(1, 7)})
    first = fake(FAKE_VLLM_SCRIPT=hold_all)
    second = fake(FAKE_VLLM_SCRIPT=hold_all)
    await sync_to_async(use_external)(first.base_url, max_in_flight=3, page_retries=2)
    await sync_to_async(add_external_server)(second.base_url, 3)
    config = await sync_to_async(resolve_config)()
    assert [e.capacity for e in config.endpoints] == [3, 3]
    scan = await sync_to_async(new_scan)(owner, tmp_path, 6)

    run = asyncio.create_task(Runner().run_scan(scan.pk))
    # Three pages each (least loaded for equal capacities), all held by the doubles.
    await eventually(lambda: len(first.requests()) == 3 and len(second.requests()) == 3)
    on_first = sorted(r["page_marker"] for r in first.requests())
    finished = on_first[0]
    (first.state_dir / f"release-{finished}").touch()  # the first server answers one page ...
    await eventually_async(lambda: Page.objects.filter(scan=scan, number=finished, status=Page.Status.DONE).aexists())
    stop_fake_vllm(first)  # ... then dies (SIGKILL) with two pages in flight

    await eventually(lambda: len(second.requests()) == 5)  # both resent to the second server
    (second.state_dir / "release").touch()
    assert await asyncio.wait_for(run, 30) == Scan.Status.DONE

    pages = [page async for page in Page.objects.filter(scan=scan).order_by("number")]
    assert all(page.status == Page.Status.DONE and f"PAGE {page.number}" in page.text for page in pages)
    assert [page.attempts for page in pages] == [1] * 6  # a resend is not an attempt
    on_second = sorted(r["page_marker"] for r in second.requests())
    assert finished not in on_second  # a finished page is never redone
    assert on_second == sorted(set(range(1, 7)) - {finished})
    statuses = {status.key: status for status in fresh_router.statuses()}
    assert statuses["main"].state == ServerState.UNHEALTHY and statuses["main"].last_error
    assert statuses[config.endpoints[1].key].state == ServerState.READY


@pytest.mark.django_db(transaction=True)
async def test_a_server_that_returns_is_used_again(fake, owner, tmp_path, fresh_router, monkeypatch, settings):
    monkeypatch.setenv("OCRSITE_RUNNER_POLL_MS", "200")
    settings.OCRSITE_METRICS_TOKEN = ""
    settings.MEDIA_ROOT = tmp_path / "media"
    first = fake()
    second = fake()
    await sync_to_async(use_external)(first.base_url, max_in_flight=2)
    await sync_to_async(add_external_server)(second.base_url, 2)
    port = first.port
    stop_fake_vllm(first)
    scan = await sync_to_async(new_scan)(owner, tmp_path, 4)
    assert await Runner().run_scan(scan.pk) == Scan.Status.DONE  # all on the second
    assert sorted(r["page_marker"] for r in second.requests()) == [1, 2, 3, 4]
    assert {s.key: s.state for s in fresh_router.statuses()}["main"] != ServerState.READY
    metrics = await sync_to_async(Client(REMOTE_ADDR="127.0.0.1").get)("/metrics")
    found = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
             for family in text_string_to_metric_families(metrics.content.decode()) for sample in family.samples}
    state = ("ocrsite_endpoint_state", (("endpoint", second.base_url), ("mode", "external"), ("state", "ready")))
    assert found[state] == 1
    assert found[("ocrsite_endpoint_state", (("endpoint", first.base_url), ("mode", "external"), ("state", "ready")))] == 0

    revived = fake(port=port)  # the same server back on its port
    await eventually(lambda: {s.key: s.state for s in fresh_router.statuses()}["main"] == ServerState.READY)
    scan = await sync_to_async(new_scan)(owner, tmp_path, 8, name="more.pdf")
    assert await Runner().run_scan(scan.pk) == Scan.Status.DONE
    assert revived.requests(), "the endpoint back in the rotation takes requests again"


async def eventually(check, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def eventually_async(check, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


@pytest.mark.django_db(transaction=True)
async def test_a_lowered_max_in_flight_applies_to_a_running_runner(fake, owner, tmp_path, monkeypatch, settings):
    """Found by hand: the runner started with the default 16, the settings page then set Max requests in
    flight to 2 (one Local server of capacity 2); the runner kept sending 16 pages at once, so another
    user's 1-page scan waited 8 s in the server's queue. The budget followed raises only (max of the two)."""
    monkeypatch.setenv("OCRSITE_RUNNER_POLL_MS", "200")
    settings.MEDIA_ROOT = tmp_path / "media"
    server = fake(FAKE_VLLM_SCRIPT=json.dumps({str(n): ["hold"] for n in range(1, 7)}))
    await sync_to_async(use_external)(server.base_url, max_in_flight=4)
    scan = await sync_to_async(new_scan)(owner, tmp_path, 6)
    runner = Runner()
    run = asyncio.create_task(runner.run_scan(scan.pk))
    await eventually(lambda: len(server.requests()) == 4)

    def lower() -> None:
        from vllm_control.models import VLMSettings

        row = VLMSettings.load()
        row.max_in_flight = 1
        row.save()

    await sync_to_async(lower)()
    await eventually(lambda: runner._capacity == 1)
    for marker in sorted(r["page_marker"] for r in server.requests()):
        (server.state_dir / f"release-{marker}").touch()
    await eventually(lambda: len(server.requests()) == 5)
    (server.state_dir / "release").touch()
    assert await asyncio.wait_for(run, 30) == Scan.Status.DONE
