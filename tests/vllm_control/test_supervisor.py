"""The Local supervisor against the vLLM test double: real processes, real sockets."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.fakes.pages import chat_request
from tests.support import pid_alive
from tests.vllm_control.conftest import make_local_config
from vllm_control.errors import ModelServerUnavailable
from vllm_control.processes import GroupRecord, ProcessIdentity, group_members
from vllm_control.status import ServerState
from vllm_control.supervisor import TRANSITIONS, Supervisor

pytestmark = pytest.mark.timeout(90)


async def wait_for(predicate, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        await asyncio.sleep(0.05)


def recorded(data_dir: Path, port: int) -> tuple[ProcessIdentity, ...]:
    record = GroupRecord.read(data_dir / f"vllm-{port}.pgid")
    return record.processes if record is not None else ()


def engine_children(pid: int) -> list[int]:
    """The double's EngineCore and worker processes under its API server `pid`."""
    return [child.pid for child in psutil.Process(pid).children(recursive=True)]


async def send_page(port: int, model: str) -> None:
    """One valid chat request with a page image (what the double counts for its crash/hang knobs)."""
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=chat_request(1, model))
    assert response.status_code == 200, response.text


@pytest.fixture
async def supervisors(tmp_path, test_marker):
    created: list[Supervisor] = []

    def make(port: int, **overrides) -> Supervisor:
        supervisor = Supervisor(make_local_config(port, **overrides), data_dir=tmp_path)
        created.append(supervisor)
        return supervisor

    yield make
    for supervisor in created:
        await supervisor.stop()


def test_transition_table_covers_every_state():
    assert set(TRANSITIONS) == set(ServerState)
    assert ServerState.READY in TRANSITIONS[ServerState.STARTING]
    assert ServerState.READY not in TRANSITIONS[ServerState.STOPPED]


async def test_spawn_ready_and_stop_leaves_nothing(supervisors, port, test_marker, tmp_path):
    supervisor = supervisors(port)
    events = []
    supervisor.add_listener(lambda status: events.append(status.state))
    await supervisor.start()
    status = await supervisor.wait_ready(30)
    assert status.state == ServerState.READY
    assert status.pid and pid_alive(status.pid)
    assert status.served_models == [supervisor.config.served_model_name]
    assert status.server_version
    assert status.supervised_here
    assert any("Application startup complete" in line for line in status.log_tail)
    pgid = status.pid
    await wait_for(lambda: len(recorded(tmp_path, port)) >= 3, 10, "the EngineCore and worker in the record")
    assert {identity.pid for identity in recorded(tmp_path, port)} == set(group_members(pgid))
    assert all(identity.matches(psutil.Process(identity.pid)) for identity in recorded(tmp_path, port))
    watchdog = psutil.Process(pgid).parent()  # between the supervisor and vLLM
    assert watchdog.ppid() == os.getpid() and "vllm_control.watchdog" in watchdog.cmdline()
    assert watchdog.cmdline()[3:9] == ["--stop-signal", "SIGTERM", "--grace-ms", "1000", "--record",
                                       str(tmp_path / f"vllm-{port}.pgid")]
    assert os.getpgid(watchdog.pid) not in (pgid, os.getpgid(0))  # neither group's stop reaches it
    await supervisor.stop()
    assert supervisor.state == ServerState.STOPPED
    assert group_members(pgid) == []
    assert not watchdog.is_running()  # reaped: it exited when the pipe closed
    assert not (tmp_path / f"vllm-{port}.pgid").exists()
    assert events[0] == ServerState.STARTING and ServerState.READY in events and events[-1] == ServerState.STOPPED


async def test_crash_is_restarted_after_the_delay(supervisors, port, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_CRASH_AFTER", "1")
    supervisor = supervisors(port)
    await supervisor.start()
    first = (await supervisor.wait_ready(30)).pid
    children = engine_children(first)
    await send_page(port, supervisor.config.served_model_name)  # FAKE_VLLM_CRASH_AFTER=1: it exits with code 1
    await wait_for(lambda: supervisor.state != ServerState.READY, 10, "the crash to be noticed")
    assert f"vLLM (pid {first}) exited with code 1." in supervisor.last_error
    await wait_for(lambda: supervisor.state == ServerState.READY, 30, "the restart")
    status = supervisor.status()
    assert status.pid != first and status.restart_count == 1
    assert not any(pid_alive(child) for child in children)  # the old group was killed before the restart


async def test_hang_is_detected_and_restarted(supervisors, port, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_HANG_AFTER", "1")  # every endpoint stops answering after one chat request
    supervisor = supervisors(port, max_restart_attempts=1)
    await supervisor.start()
    first = (await supervisor.wait_ready(30)).pid
    errors = []
    supervisor.add_listener(lambda status: errors.append((status.state, status.last_error)))
    await send_page(port, supervisor.config.served_model_name)
    await wait_for(lambda: supervisor.status().pid not in (None, first), 40, "a new process")
    assert (ServerState.UNHEALTHY, f"Health check failed (1 of 3): The model server at http://127.0.0.1:{port}/v1 did not answer within 1 s.") in errors
    assert any(error and "stopped answering health checks (3 consecutive failures)" in error for _, error in errors)
    assert not pid_alive(first) and group_members(first) == []
    await wait_for(lambda: supervisor.state == ServerState.READY, 30, "the restarted server")
    assert supervisor.restart_count == 1


async def test_max_attempts_then_failed(supervisors, port, tmp_path):
    failing = tmp_path / "failing-vllm"
    failing.write_text("#!/bin/sh\necho 'something odd happened' >&2\nexit 7\n")
    failing.chmod(0o755)
    supervisor = supervisors(port, vllm_bin=str(failing), max_restart_attempts=2)
    await supervisor.start()
    with pytest.raises(ModelServerUnavailable) as raised:
        await supervisor.wait_ready(30)
    assert supervisor.state == ServerState.FAILED
    assert supervisor.restart_count == 2
    assert "Gave up after 2 restart attempt(s)" in raised.value.message
    assert "exited with code 7" in raised.value.message and "something odd happened" in raised.value.message


async def test_stop_when_the_server_ignores_sigterm(supervisors, port, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_IGNORE_SIGTERM", "1")
    supervisor = supervisors(port, stop_grace_ms=500)
    await supervisor.start()
    pid = (await supervisor.wait_ready(30)).pid
    children = engine_children(pid)
    assert children
    await supervisor.stop()
    assert group_members(pid) == []
    assert not pid_alive(pid) and not any(pid_alive(child) for child in children)
    assert supervisor.state == ServerState.STOPPED


async def test_kill_9_of_the_parent_is_a_crash_too(supervisors, port):
    supervisor = supervisors(port)
    await supervisor.start()
    first = (await supervisor.wait_ready(30)).pid
    children = engine_children(first)
    os.kill(first, signal.SIGKILL)  # its EngineCore child lingers, holding the (simulated) GPU
    await wait_for(lambda: supervisor.status().pid not in (None, first), 30, "the restart")
    assert not any(pid_alive(child) for child in children)


async def test_a_stranger_on_the_port_is_an_error(supervisors, port):
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", port))
        stranger.listen()
        supervisor = supervisors(port)
        await supervisor.start()
        with pytest.raises(ModelServerUnavailable) as raised:
            await supervisor.wait_ready(10)
    assert supervisor.state == ServerState.FAILED
    assert f"Port {port} is already in use by another server" in raised.value.message
    assert supervisor.status().pid is None


async def test_vllm_not_on_path(supervisors, port):
    supervisor = supervisors(port, vllm_bin="no-such-vllm-here")
    await supervisor.start()
    with pytest.raises(ModelServerUnavailable) as raised:
        await supervisor.wait_ready(10)
    assert raised.value.message.startswith("The vLLM executable 'no-such-vllm-here' was not found on PATH")
    assert supervisor.restart_count == 0


async def test_hf_token_reaches_the_server(supervisors, port, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_REQUIRE_HF_TOKEN", "hf_secret")
    supervisor = supervisors(port, hf_token="hf_secret")
    await supervisor.start()
    assert (await supervisor.wait_ready(30)).state == ServerState.READY


async def vanish(supervisor: Supervisor):
    """Make the supervisor forget its server without stopping it, as if its process had died (but keep
    the lifeline open); returns the forgotten run."""
    supervisor._run_task.cancel()
    await asyncio.gather(supervisor._run_task, return_exceptions=True)
    supervisor._run_task = None
    vllm, supervisor._vllm = supervisor._vllm, None
    supervisor._release_lock()
    return vllm


async def test_leftover_group_of_a_dead_supervisor_is_killed_at_next_start(supervisors, port, tmp_path, test_marker):
    first = supervisors(port)
    await first.start()
    pid = (await first.wait_ready(30)).pid
    await wait_for(lambda: len(recorded(tmp_path, port)) >= 3, 10, "the EngineCore and worker in the record")
    # The supervisor and its watchdog both die (e.g. a SIGKILL of both); no process is left to stop the group.
    forgotten = await vanish(first)
    os.kill(forgotten.process.pid, signal.SIGKILL)
    await wait_for(lambda: not pid_alive(pid), 5, "the parent-death signal to kill vLLM's API server")
    assert sorted(psutil.Process(p).name() for p in group_members(pid)) == ["VLLM::EngineCore", "VLLM::Worker"]
    second = supervisors(port)
    await second.start()
    status = await second.wait_ready(30)
    assert group_members(pid) == []
    assert status.pid != pid


async def test_a_killed_watchdog_is_a_crash_the_group_goes_and_the_server_restarts(supervisors, port):
    supervisor = supervisors(port)
    await supervisor.start()
    first = (await supervisor.wait_ready(30)).pid
    children = engine_children(first)
    os.kill(supervisor._vllm.process.pid, signal.SIGKILL)  # vLLM's API server gets its parent-death signal
    await wait_for(lambda: supervisor.status().pid not in (None, first), 30, "the restart")
    assert f"vLLM (pid {first}) exited with code -9." in supervisor.last_error
    assert group_members(first) == [] and not any(pid_alive(child) for child in children)
    await wait_for(lambda: supervisor.state == ServerState.READY, 30, "the restarted server")


async def test_the_watchdog_stops_the_group_when_the_supervisor_is_gone_sigkill_after_grace(
    supervisors, port, monkeypatch
):
    monkeypatch.setenv("FAKE_VLLM_IGNORE_SIGTERM", "1")  # only SIGKILL, after the grace period, stops it
    supervisor = supervisors(port, stop_grace_ms=300)
    await supervisor.start()
    pgid = (await supervisor.wait_ready(30)).pid
    forgotten = await vanish(supervisor)
    forgotten.release()  # what the kernel does when the supervisor's process dies
    await wait_for(lambda: group_members(pgid) == [], 10, "the group to be gone")
    await wait_for(lambda: forgotten.process.returncode is not None, 5, "the watchdog to exit")
    assert forgotten.process.returncode == -signal.SIGKILL  # as vLLM ended
    said = f"ocrsite watchdog: vLLM process group {pgid} still running 300 ms after SIGTERM; sending SIGKILL."
    await wait_for(lambda: said in supervisor.log_tail, 5, "the watchdog's line in vLLM's output")


async def test_a_stale_record_whose_pids_were_reused_kills_nothing(supervisors, port, tmp_path):
    # Unrelated processes hold the recorded group number and pids; the record's processes started earlier.
    stranger = subprocess.Popen(["sh", "-c", "sleep 60 & exec sleep 60"], start_new_session=True)
    try:
        await wait_for(lambda: len(group_members(stranger.pid)) == 2, 10, "the stranger's two processes")
        strangers = [psutil.Process(pid) for pid in group_members(stranger.pid)]
        reused = [ProcessIdentity(p.pid, p.create_time() - 3600) for p in strangers]
        ours_elsewhere = ProcessIdentity.of(psutil.Process())  # alive, but in another group than recorded
        GroupRecord(stranger.pid, (*reused, ours_elsewhere), "2024-01-01T00:00:00+00:00", 1).write(
            tmp_path / f"vllm-{port}.pgid"
        )
        supervisor = supervisors(port)
        await supervisor.start()
        status = await supervisor.wait_ready(30)
        assert all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in strangers)
        assert GroupRecord.read(tmp_path / f"vllm-{port}.pgid").pgid == status.pid  # the stale record is replaced
    finally:
        os.killpg(stranger.pid, signal.SIGKILL)
        stranger.wait()


async def test_second_supervisor_on_the_same_port_observes(supervisors, port):
    owner = supervisors(port)
    other = supervisors(port)
    await owner.start()
    await owner.wait_ready(30)
    await other.start()
    status = await other.wait_ready(10)
    assert status.state == ServerState.READY and not status.supervised_here and status.pid is None
    assert len([s for s in (owner, other) if s.owner]) == 1
    await other.stop()
    assert owner.state == ServerState.READY and owner.status().pid


async def test_a_long_healthy_run_resets_the_restart_count(port, tmp_path, test_marker):
    supervisor = Supervisor(make_local_config(port), data_dir=tmp_path, stable_run_s=1.5)
    try:
        await supervisor.start()
        first = (await supervisor.wait_ready(30)).pid
        os.kill(first, signal.SIGKILL)
        await wait_for(lambda: supervisor.status().pid not in (None, first) and supervisor.state == ServerState.READY,
                       30, "the restart")
        assert supervisor.restart_count == 1
        await wait_for(lambda: supervisor.restart_count == 0, 10, "the count to reset after a stable run")
        assert supervisor.state == ServerState.READY
    finally:
        await supervisor.stop()


async def test_secrets_in_vllm_output_are_redacted(supervisors, port, tmp_path):
    echoing = tmp_path / "echoing-vllm"
    echoing.write_text('#!/bin/sh\necho "non-default args: $*"\necho "token=$HF_TOKEN key=$VLLM_API_KEY"\nsleep 30\n')
    echoing.chmod(0o755)
    supervisor = supervisors(port, vllm_bin=str(echoing), api_key="sk-local-secret", hf_token="hf_secret_token")
    await supervisor.start()
    await wait_for(lambda: len(supervisor.status().log_tail) >= 2, 10, "the output")
    tail = "\n".join(supervisor.status().log_tail)
    assert "token=*** key=***" in tail
    assert "sk-local-secret" not in tail and "hf_secret_token" not in tail
