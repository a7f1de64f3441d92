"""Process groups, process identity and the watchdog, on plain processes (no vLLM double needed)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.support import pid_alive, wait_until
from vllm_control import watchdog
from vllm_control.processes import GroupRecord, ProcessIdentity, group_members

pytestmark = pytest.mark.timeout(60)

# A server with a child in its group; with "trap '' TERM" neither of them reacts to SIGTERM.
SERVER = "sleep 60 & exec sleep 60"
STUBBORN = "trap '' TERM; sleep 60 & exec sleep 60"


@pytest.fixture
def stranger() -> Iterator[list[psutil.Process]]:
    """Two unrelated processes in a process group of their own (the leader's pid is the group's number)."""
    leader = subprocess.Popen(["sh", "-c", SERVER], start_new_session=True)
    wait_until(lambda: len(group_members(leader.pid)) == 2, 10, message="the stranger's two processes")
    yield [psutil.Process(pid) for pid in group_members(leader.pid)]
    os.killpg(leader.pid, signal.SIGKILL)
    leader.wait()


def test_a_record_round_trips_and_a_damaged_one_is_an_error(tmp_path):
    path = tmp_path / "data" / "vllm-8000.pgid"
    assert GroupRecord.read(path) is None
    record = GroupRecord(1234, (ProcessIdentity(1234, 1700000000.25), ProcessIdentity(1240, 1700000001.5)),
                         "2024-01-01T00:00:00+00:00", 99)
    record.write(path)
    assert GroupRecord.read(path) == record
    assert [p.name for p in path.parent.iterdir()] == ["vllm-8000.pgid"]  # no partial file left
    for damaged in ("{", "[]", '{"pgid": 1}', '{"pgid": "x", "processes": [], "started_at": "", "supervisor_pid": 1}'):
        path.write_text(damaged)
        with pytest.raises(ValueError, match="is not a process-group record"):
            GroupRecord.read(path)


def test_survivors_are_recorded_processes_by_pid_and_start_time_still_in_the_group(stranger):
    pgid = os.getpgid(stranger[0].pid)
    exact = GroupRecord(pgid, (), "", 1).with_processes(stranger)
    assert sorted(p.pid for p in exact.survivors()) == sorted(p.pid for p in stranger)
    reused = GroupRecord(pgid, tuple(ProcessIdentity(p.pid, p.create_time() - 60) for p in stranger), "", 1)
    assert reused.survivors() == []  # same pids, other processes: they started later than the recorded ones
    moved = GroupRecord(os.getpgid(0), exact.processes, "", 1)
    assert moved.survivors() == []  # the right processes, but not in the recorded group


async def start(script: str, record: Path, grace_ms: int = 2000) -> watchdog.Supervised:
    return await watchdog.start(["sh", "-c", script], env=dict(os.environ), stop_signal=signal.SIGTERM,
                                grace_ms=grace_ms, record=record, output_limit=1 << 16)


async def wait_for(predicate, timeout: float, message: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {message}"
        await asyncio.sleep(0.02)


async def test_the_watchdog_runs_the_command_under_it_and_keeps_the_record(tmp_path):
    record = tmp_path / "vllm-8000.pgid"
    server = await start(SERVER, record)
    try:
        written = GroupRecord.read(record)  # written before the pid was reported
        assert written.pgid == server.pid and written.supervisor_pid == os.getpid()
        assert psutil.Process(server.pid).ppid() == server.process.pid
        assert os.getpgid(server.pid) == os.getsid(server.pid) == server.pid  # a session and group of its own
        assert os.getpgid(server.process.pid) not in (server.pid, os.getpgid(0))
        await wait_for(lambda: len(GroupRecord.read(record).processes) == 2, 10, "the child in the record")
        assert sorted(p.pid for p in GroupRecord.read(record).survivors()) == sorted(group_members(server.pid))
    finally:
        server.release()
        await server.process.wait()
    assert group_members(server.pid) == []


async def test_closing_the_lifeline_stops_the_group_sigkill_after_the_grace_period(tmp_path):
    server = await start(STUBBORN, tmp_path / "record", grace_ms=300)
    await wait_for(lambda: len(group_members(server.pid)) == 2, 10, "both processes")
    server.release()  # what the kernel does when the supervisor dies
    assert await asyncio.wait_for(server.process.wait(), 15) == -signal.SIGKILL  # it ends as its command did
    assert group_members(server.pid) == []
    output = (await server.process.stdout.read()).decode()
    assert f"vLLM process group {server.pid} still running 300 ms after SIGTERM; sending SIGKILL." in output


async def test_a_stop_signal_to_the_watchdog_stops_the_group_too(tmp_path):
    server = await start(SERVER, tmp_path / "record")
    await wait_for(lambda: len(group_members(server.pid)) == 2, 10, "both processes")
    server.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(server.process.wait(), 15) == -signal.SIGTERM
    assert group_members(server.pid) == []
    server.release()


async def test_when_the_command_exits_the_rest_of_its_group_is_killed_and_its_status_passed_on(tmp_path):
    go = tmp_path / "crash now"
    crashing = f"sleep 60 & echo started; until [ -e '{go}' ]; do sleep 0.05; done; exit 7"
    server = await start(crashing, tmp_path / "record")
    await wait_for(lambda: len(group_members(server.pid)) == 2, 10, "both processes")
    child = [pid for pid in group_members(server.pid) if pid != server.pid]
    go.touch()
    assert await asyncio.wait_for(server.process.wait(), 15) == 7
    assert (await server.process.stdout.read()).decode() == "started\n"
    assert group_members(server.pid) == [] and not any(pid_alive(pid) for pid in child)
    server.release()


# Its main thread ends while another thread, deaf to SIGTERM, runs on: the main thread then shows as a
# zombie though the process lives (as a killed multi-threaded vLLM does while its threads are torn down).
HEADLESS = (
    "import ctypes, signal, threading, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "threading.Thread(target=time.sleep, args=(60,)).start(); ctypes.CDLL(None).pthread_exit(None)"
)


async def test_a_process_whose_main_thread_ended_is_live_until_its_last_thread_ends(tmp_path):
    server = await watchdog.start([sys.executable, "-c", HEADLESS], env=dict(os.environ), stop_signal=signal.SIGTERM,
                                  grace_ms=300, record=tmp_path / "record", output_limit=1 << 16)
    await wait_for(lambda: psutil.Process(server.pid).status() == psutil.STATUS_ZOMBIE, 10, "the main thread to end")
    assert group_members(server.pid) == [server.pid]
    server.release()
    # The watchdog used to take the group for gone at once and exit 1, leaving the process running.
    assert await asyncio.wait_for(server.process.wait(), 15) == -signal.SIGKILL
    assert group_members(server.pid) == [] and not pid_alive(server.pid)


async def test_a_command_that_cannot_be_executed_is_an_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        await watchdog.start(["/nonexistent/vllm", "serve"], env=dict(os.environ), stop_signal=signal.SIGTERM,
                             grace_ms=100, record=tmp_path / "record", output_limit=1 << 16)
