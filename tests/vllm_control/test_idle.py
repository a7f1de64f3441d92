"""Idle unload and on-demand start (Local): the real supervisor, the vLLM double, the real runner and the
database as the shared truth. Time is the supervisor's injected clock, never a sleep."""

from __future__ import annotations

import asyncio
import time

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model

from scans import events, selectors
from scans.models import Page, Scan
from scans.pipeline.runner import Runner
from scans.uploads import create_scan_from_path
from tests.fakes.pages import make_pdf
from tests.support import FAKE_VLLM
from tests.vllm_control.conftest import MODEL
from tests.vllm_control.test_startup_phases import ManualClock
from tests.vllm_control.test_supervisor import send_page
from vllm_control import runtime
from vllm_control.config import describe_options, resolve_config
from vllm_control.events import status_payload
from vllm_control.models import VLMSettings
from vllm_control.processes import group_members
from vllm_control.status import ServerState
from vllm_control.supervisor import REQUEST_LINE, TRANSITIONS, Supervisor

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(120)]


async def wait_for(predicate, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        await asyncio.sleep(0.02)


def local_row(port: int, **fields) -> VLMSettings:
    row = VLMSettings.load()
    row.mode, row.port, row.host, row.served_model_name = "local", port, "127.0.0.1", MODEL
    row.stop_grace_ms, row.health_check_interval_s, row.restart_delay_s, row.page_retries = 1000, 1, 1, 0
    for name, value in fields.items():
        setattr(row, name, value)
    row.save()
    return row


def new_scan(owner, folder, pages: int, options: dict | None = None) -> Scan:
    return create_scan_from_path(owner=owner, path=make_pdf(folder / "doc.pdf", pages), options=options)


@pytest.fixture
def owner():
    return get_user_model().objects.create_user("alice", password="x")


@pytest.fixture
async def idle_supervisor(tmp_path, test_marker, monkeypatch, settings):
    """The process's Local supervisor (runtime's), with a 1-minute idle timeout and a clock the test moves."""
    monkeypatch.setenv("VLLM_BIN", str(FAKE_VLLM))
    monkeypatch.setenv("OCRSITE_RUNNER_POLL_MS", "200")
    settings.DATA_DIR = tmp_path
    settings.MEDIA_ROOT = tmp_path / "media"
    clock = ManualClock()
    created: list[Supervisor] = []

    async def make(port: int) -> Supervisor:
        await sync_to_async(local_row)(port, idle_timeout_min=1)
        config = await sync_to_async(resolve_config)()
        assert config.local.idle_timeout_s == 60
        supervisor = Supervisor(config.local, data_dir=tmp_path, clock=clock)
        checks = {"count": 0}
        counted = supervisor._pages_waiting

        async def pages_waiting():  # count the supervisor's looks at the queue
            checks["count"] += 1
            return await counted()

        supervisor._pages_waiting = pages_waiting
        supervisor.checks = checks
        runtime.bind_loop()
        runtime._supervisor = supervisor
        created.append(supervisor)
        return supervisor

    make.clock = clock
    yield make
    for supervisor in created:
        await supervisor.stop()
    runtime._supervisor = None


async def checked_twice_more(supervisor: Supervisor) -> None:
    """Two more looks at the queue: the idle check has run at least once since now."""
    target = supervisor.checks["count"] + 2
    await wait_for(lambda: _true(supervisor.checks["count"] >= target), 30, "two more idle checks")


async def _true(value: bool) -> bool:
    return value


def test_the_idle_stop_is_a_stop_in_the_one_state_machine():
    assert ServerState.STOPPING in TRANSITIONS[ServerState.READY]
    assert TRANSITIONS[ServerState.STOPPING] == frozenset({ServerState.STOPPED})
    assert TRANSITIONS[ServerState.STOPPED] == frozenset({ServerState.STARTING})


@pytest.mark.parametrize(("line", "is_request"), [
    ('(APIServer pid=2261) INFO:     127.0.0.1:52544 - "POST /v1/chat/completions HTTP/1.1" 200 OK', True),
    ("(APIServer pid=2261) INFO 10-26 21:49:02 [loggers.py:127] Engine 000: Avg prompt throughput: 1290.4 tokens/s, "
     "Avg generation throughput: 310.2 tokens/s, Running: 12 reqs, Waiting: 0 reqs, GPU KV cache usage: 9.6%", True),
    ("(APIServer pid=2261) INFO 10-26 21:49:12 [loggers.py:127] Engine 000: Avg prompt throughput: 0.0 tokens/s, "
     "Avg generation throughput: 0.0 tokens/s, Running: 0 reqs, Waiting: 3 reqs, GPU KV cache usage: 0.0%", True),
    ("(APIServer pid=2261) INFO 10-26 21:49:22 [loggers.py:127] Engine 000: Avg prompt throughput: 0.0 tokens/s, "
     "Avg generation throughput: 0.0 tokens/s, Running: 0 reqs, Waiting: 0 reqs, GPU KV cache usage: 0.0%", False),
    ('(APIServer pid=2261) INFO:     127.0.0.1:52546 - "GET /health HTTP/1.1" 200 OK', False),  # the supervisor's own
    ('(APIServer pid=2261) INFO:     127.0.0.1:52548 - "GET /v1/models HTTP/1.1" 200 OK', False),
])
def test_requests_in_vllms_log(line, is_request):
    """Another client's requests keep the server up too: vLLM's access log and engine statistics show them."""
    assert bool(REQUEST_LINE.search(line)) is is_request


def test_the_idle_timeout_setting(monkeypatch):
    row = VLMSettings(mode="local")
    assert resolve_config(row, environ={}).local.idle_timeout_s is None  # off by default
    assert resolve_config(row, environ={"VLLM_IDLE_TIMEOUT_MIN": "15"}).local.idle_timeout_s == 900
    shown = {option.field: option for option in describe_options(row, {"VLLM_IDLE_TIMEOUT_MIN": "15"})}
    assert (shown["idle_timeout_min"].env_var, shown["idle_timeout_min"].value) == ("VLLM_IDLE_TIMEOUT_MIN", "15")
    row.idle_timeout_min = 0  # saved 0: never, whatever the environment says
    assert resolve_config(row, environ={"VLLM_IDLE_TIMEOUT_MIN": "15"}).local.idle_timeout_s is None
    row.idle_timeout_min = 2
    assert resolve_config(row, environ={}).local.idle_timeout_s == 120


def test_pages_waiting_counts_the_configured_servers_pages_only(owner, tmp_path):
    for index, options in enumerate([None, {"engine": "tesseract"}, {"base_url": "http://elsewhere:8000/v1"}]):
        folder = tmp_path / str(index)
        folder.mkdir()
        new_scan(owner, folder, 2, options)
    assert selectors.pages_waiting_for_model_server(mode="local") == 2
    assert selectors.pages_waiting_for_model_server(mode="builtin") == 0
    Scan.objects.filter(options={}).update(status=Scan.Status.CANCELLED)
    assert selectors.pages_waiting_for_model_server(mode="local") == 0


async def test_idle_stop_then_a_queued_page_starts_it_again(idle_supervisor, port, owner, tmp_path):
    supervisor = await idle_supervisor(port)
    clock = idle_supervisor.clock
    await supervisor.start()
    pgid = (await supervisor.wait_ready(30)).pid
    assert group_members(pgid)

    clock.advance(59)  # a minute less a second without a request: still up
    await checked_twice_more(supervisor)
    assert supervisor.state == ServerState.READY

    clock.advance(2)
    await wait_for(lambda: _true(supervisor.state == ServerState.STOPPED), 30, "the idle stop")
    status = supervisor.status()
    assert status.idle and status.pid is None and status.supervised_here
    assert group_members(pgid) == []  # the whole process group is gone: the GPU is free
    assert status_payload(status, detailed=False)["idle"] is True
    assert supervisor.running  # still supervising the port, waiting for work

    # A page queued by any process (here: only the database knows) starts it again.
    scan = await sync_to_async(new_scan)(owner, tmp_path, 2)
    await wait_for(lambda: _true(supervisor.state != ServerState.STOPPED), 30, "the start on demand")
    assert not supervisor.idle
    second = (await supervisor.wait_ready(30)).pid
    assert second != pgid

    assert await Runner(max_in_flight=2).run_scan(scan.pk) == Scan.Status.DONE
    assert [page.status async for page in Page.objects.filter(scan=scan)] == [Page.Status.DONE] * 2


async def test_the_scan_says_it_waits_for_the_idle_server(idle_supervisor, port, owner, tmp_path, monkeypatch):
    gate = tmp_path / "let-it-start"
    gate.touch()
    monkeypatch.setenv("FAKE_VLLM_HOLD_UNTIL", str(gate))
    supervisor = await idle_supervisor(port)
    await supervisor.start()
    await supervisor.wait_ready(30)
    idle_supervisor.clock.advance(61)
    await wait_for(lambda: _true(supervisor.idle), 30, "the idle stop")
    gate.unlink()  # the next start stays in `starting` until the test lets it go

    scan = await sync_to_async(new_scan)(owner, tmp_path, 3)
    run = asyncio.create_task(Runner(max_in_flight=3).run_scan(scan.pk))

    async def waiting() -> bool:
        return (await Scan.objects.aget(pk=scan.pk)).waiting_for_server

    await wait_for(waiting, 30, "the scan to say it waits for the model server")
    assert supervisor.state == ServerState.STARTING
    totals = await sync_to_async(selectors.scan_totals)(await Scan.objects.aget(pk=scan.pk))
    assert totals["waiting_for_server"] is True
    listed = await sync_to_async(lambda: events.list_item(Scan.objects.get(pk=scan.pk), selectors.scan_counts(scan), ""))()
    assert listed["waiting_for_server"] is True  # the scan list says so too
    gate.touch()
    assert await asyncio.wait_for(run, 60) == Scan.Status.DONE
    scan = await Scan.objects.aget(pk=scan.pk)
    assert not scan.waiting_for_server


async def test_a_manual_stop_is_not_idle(idle_supervisor, port):
    supervisor = await idle_supervisor(port)
    await supervisor.start()
    await supervisor.wait_ready(30)
    idle_supervisor.clock.advance(61)
    await wait_for(lambda: _true(supervisor.idle), 30, "the idle stop")
    await supervisor.stop()
    assert supervisor.state == ServerState.STOPPED and not supervisor.idle and not supervisor.running


async def test_another_clients_requests_keep_it_up(idle_supervisor, port):
    """No page of ours waits, but someone else uses the server (an External-mode instance, a script)."""
    supervisor = await idle_supervisor(port)
    clock = idle_supervisor.clock
    await supervisor.start()
    await supervisor.wait_ready(30)
    clock.advance(50)
    await send_page(port, MODEL)  # its access-log line reaches the supervisor
    await wait_for(lambda: _true(supervisor._last_request == clock.now), 30, "the request to be seen")
    clock.advance(20)  # 70 s since the start, 20 s since the request
    await checked_twice_more(supervisor)
    assert supervisor.state == ServerState.READY and not supervisor.idle
    clock.advance(41)
    await wait_for(lambda: _true(supervisor.idle), 30, "the idle stop a minute after the request")
