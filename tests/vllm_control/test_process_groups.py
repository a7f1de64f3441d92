"""Process groups, process identity and the watchdog, on plain processes (no vLLM double needed)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator

import psutil
import pytest

from tests.support import pid_alive, wait_until
from vllm_control.processes import GroupRecord, ProcessIdentity, group_members
from vllm_control.watchdog import Watch, Watchdog, stop_group

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def stranger() -> Iterator[list[psutil.Process]]:
    """Two unrelated processes in a process group of their own (the leader's pid is the group's number)."""
    leader = subprocess.Popen(["sh", "-c", "sleep 60 & exec sleep 60"], start_new_session=True)
    wait_until(lambda: len(group_members(leader.pid)) == 2, 10, message="the stranger's two processes")
    yield [psutil.Process(pid) for pid in sorted(group_members(leader.pid), key=lambda pid: pid != leader.pid)]
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
    for damaged in ("{", '{"pgid": 1}', '{"pgid": "x", "processes": [], "started_at": "", "supervisor_pid": 1}'):
        path.write_text(damaged)
        with pytest.raises(ValueError, match="is not a process-group record"):
            GroupRecord.read(path)


def test_survivors_are_recorded_processes_by_pid_and_start_time_still_in_the_group(stranger):
    pgid = stranger[0].pid
    exact = GroupRecord(pgid, (), "", 1).with_processes(stranger)
    assert sorted(p.pid for p in exact.survivors()) == sorted(p.pid for p in stranger)
    reused = GroupRecord(pgid, tuple(ProcessIdentity(p.pid, p.create_time() - 60) for p in stranger), "", 1)
    assert reused.survivors() == []  # same pids, other processes: they started later than the recorded ones
    moved = GroupRecord(os.getpgid(0), exact.processes, "", 1)
    assert moved.survivors() == []  # the right processes, but not in the recorded group


def test_the_watchdog_signals_nothing_when_no_process_it_saw_is_left(stranger):
    # What the watchdog sees when its group emptied and the number went to an unrelated group.
    watch = Watch(pgid=stranger[0].pid, record=None, supervisor_pid=os.getppid(), seen={psutil.Process()})  # type: ignore[arg-type]
    assert stop_group(watch, signal.SIGTERM, grace_s=0.1) == (True, None)
    assert all(pid_alive(p.pid) for p in stranger)


def test_the_watchdog_records_its_group_and_stops_it_when_signalled(stranger, tmp_path):
    pgid = stranger[0].pid
    record = tmp_path / "vllm-8000.pgid"
    GroupRecord(pgid, (), "2024-01-01T00:00:00+00:00", os.getpid()).write(record)
    watchdog = Watchdog.start(pgid=pgid, stop_signal=signal.SIGTERM, grace_ms=2000, record=record)
    try:
        wait_until(lambda: len(GroupRecord.read(record).processes) == 2, 10, message="the group in the record")
        written = GroupRecord.read(record)
        assert written.started_at == "2024-01-01T00:00:00+00:00" and written.supervisor_pid == os.getpid()
        assert sorted(written.survivors(), key=lambda p: p.pid) == sorted(stranger, key=lambda p: p.pid)
        os.kill(watchdog.pid, signal.SIGTERM)  # like end-of-file on its pipe: stop the group, then exit
        wait_until(lambda: group_members(pgid) == [], 10, message="the group to be stopped")
        wait_until(lambda: not watchdog.alive, 5, message="the watchdog to exit")
        assert watchdog.returncode == 0
    finally:
        watchdog.release()
