"""Process groups and process identity, for stopping a local vLLM and everything it spawned.

vLLM's API server spawns EngineCore and worker processes that stay in its process group, so every
operation here acts on a whole group (`pgid`). A process is identified by its pid *and* its start time
(psutil's `create_time`): vLLM renames its children with `setproctitle`, which overwrites their
command line and environment, but nothing a process does changes when the kernel started it, and a
reused pid has a later start time.

Plain standard library and psutil, no Django: the watchdog process (vllm_control.watchdog) imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import psutil

# psutil's create_time is the kernel's start time in clock ticks since boot plus /proc/stat's boot
# time, which moves by about a second when the wall clock is adjusted. A reused pid starts later than
# that: the kernel hands out pids in order and wraps around only after pid_max of them.
START_TIME_TOLERANCE_S = 2.0
POLL_S = 0.05


@dataclass(frozen=True)
class ProcessIdentity:
    """One process over time: its pid and its start time (seconds since the epoch, psutil's create_time)."""

    pid: int
    create_time: float

    @classmethod
    def of(cls, process: psutil.Process) -> ProcessIdentity:
        return cls(process.pid, process.create_time())

    def matches(self, process: psutil.Process) -> bool:
        try:
            return process.pid == self.pid and abs(process.create_time() - self.create_time) <= START_TIME_TOLERANCE_S
        except psutil.Error:
            return False


def group_processes(pgid: int) -> list[psutil.Process]:
    """The live processes in process group `pgid` (`is_live`)."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and is_live(process):
                members.append(process)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def is_live(process: psutil.Process) -> bool:
    """Not exited. A process whose main thread has ended shows as a zombie while its other threads run
    on, e.g. while they are still being torn down after SIGKILL: it is live until only that thread is
    left (Linux's Threads count). Raises psutil.Error when the process is gone."""
    status = process.status()
    if status == psutil.STATUS_ZOMBIE:
        return process.num_threads() > 1
    return status != psutil.STATUS_DEAD


def group_members(pgid: int) -> list[int]:
    """The pids of the live processes in process group `pgid`."""
    return [process.pid for process in group_processes(pgid)]


def signal_group(pgid: int, sig: int) -> None:
    """Send `sig` to every process of the group; nothing happens when the group is gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def wait_group_gone(pgid: int, timeout: float) -> bool:
    """Block until the group has no live process; False when `timeout` (seconds) passed first."""
    deadline = time.monotonic() + timeout
    while group_members(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)
    return True


async def await_group_gone(pgid: int, timeout: float) -> bool:
    """`wait_group_gone` for an event loop."""
    deadline = time.monotonic() + timeout
    while group_members(pgid):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(POLL_S)
    return True


@dataclass(frozen=True)
class GroupRecord:
    """What a supervisor leaves in its data directory while a vLLM process group runs (`vllm-<port>.pgid`).

    JSON: {"pgid": int, "processes": [{"pid": int, "create_time": float}, ...], "started_at": ISO 8601,
    "supervisor_pid": int}. The supervisor writes it when it spawns vLLM, the group's watchdog adds each
    process that joins the group, and a clean stop deletes it; one left behind names processes a
    later start must kill.
    """

    pgid: int
    processes: tuple[ProcessIdentity, ...]
    started_at: str
    supervisor_pid: int

    @classmethod
    def read(cls, path: Path) -> GroupRecord | None:
        """The record at `path`; None when there is none. Raises ValueError when it is not a record."""
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
            return cls(
                pgid=int(data["pgid"]),
                processes=tuple(ProcessIdentity(int(p["pid"]), float(p["create_time"])) for p in data["processes"]),
                started_at=str(data["started_at"]),
                supervisor_pid=int(data["supervisor_pid"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path} is not a process-group record: {exc}") from exc

    def write(self, path: Path) -> None:
        """Replace the file at `path` atomically (a reader never sees half a record)."""
        data = {
            "pgid": self.pgid,
            "processes": [{"pid": p.pid, "create_time": p.create_time} for p in self.processes],
            "started_at": self.started_at,
            "supervisor_pid": self.supervisor_pid,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(json.dumps(data))
        os.replace(partial, path)

    def with_processes(self, processes: Iterable[psutil.Process]) -> GroupRecord:
        identities = []
        for process in processes:
            with contextlib.suppress(psutil.Error):
                identities.append(ProcessIdentity.of(process))
        return replace(self, processes=tuple(sorted(identities, key=lambda p: p.pid)))

    def survivors(self) -> list[psutil.Process]:
        """The recorded processes that are still alive and still in the recorded group.

        A pid now used by an unrelated process does not count (its start time differs), so neither
        does a group whose number was reused once all recorded processes were gone.
        """
        recorded = {p.pid: p for p in self.processes}
        members = group_processes(self.pgid)
        return [process for process in members if process.pid in recorded and recorded[process.pid].matches(process)]
