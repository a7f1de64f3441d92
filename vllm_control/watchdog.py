"""The watchdog of one local vLLM process group: the group dies with its supervisor, whatever kills it.

vLLM's API server gets a parent-death signal, but its EngineCore and worker processes do not die with
it (vllm-project/vllm#55510) and would keep the GPU. So the supervisor starts this small process next
to each `vllm serve` it spawns:
  - in a session of its own, so neither the stop of the vLLM group nor a signal to the supervisor's
    group or terminal (Ctrl+C) reaches it;
  - with the read end of a pipe as stdin, whose write end only the supervisor holds. The kernel closes
    it when the supervisor exits in any way, SIGKILL included.
On end-of-file (or SIGTERM, SIGINT, SIGHUP) it stops the group as the supervisor would: the stop
signal, SIGKILL after the grace period, then it waits until the group is empty and exits. It acts only
while a process it saw in the group is still there (psutil checks pid and start time), so a group
number reused by unrelated processes is never signalled. A supervisor that stops the group itself
closes the pipe once the group is gone, and the watchdog exits without doing anything.

While it waits it polls the group and rewrites the supervisor's record (processes.GroupRecord) when
processes join, so that a later start still recognises survivors should the watchdog die as well.

Run by the supervisor (`Watchdog.start`):
    python -m vllm_control.watchdog --pgid N --stop-signal SIGTERM --grace-ms 5000 --record PATH
Exit code 0; 1 when the group survived SIGKILL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import psutil

from vllm_control.processes import GroupRecord, group_processes, signal_group, wait_group_gone

TRACK_INTERVAL_S = 0.5  # how often the group is polled for new processes while the supervisor lives
KILL_WAIT_S = 10.0
_IMPORT_ROOT = Path(__file__).resolve().parent.parent  # the directory holding the vllm_control package
_WATCHED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


# --- the supervisor's side ---------------------------------------------------------------------------------


class Watchdog:
    """The supervisor's handle on the watchdog of one process group."""

    def __init__(self, popen: subprocess.Popen) -> None:
        self._popen = popen

    @classmethod
    def start(cls, *, pgid: int, stop_signal: signal.Signals, grace_ms: int, record: Path) -> Watchdog:
        """Spawn the watchdog of group `pgid`. Raises OSError when it cannot be started."""
        argv = [sys.executable, "-m", "vllm_control.watchdog", "--pgid", str(pgid)]
        argv += ["--stop-signal", stop_signal.name, "--grace-ms", str(grace_ms), "--record", str(record)]
        # cwd: `-m` imports this checkout's package, not another copy installed elsewhere.
        popen = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd=_IMPORT_ROOT, start_new_session=True
        )
        return cls(popen)

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def alive(self) -> bool:
        return self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    def release(self) -> None:
        """Close the pipe: the watchdog stops what is left of the group, then exits. Safe from any thread."""
        assert self._popen.stdin is not None
        with contextlib.suppress(OSError):
            self._popen.stdin.close()

    async def close(self, timeout: float) -> int | None:
        """`release`, then wait up to `timeout` seconds for the watchdog to exit; its exit code, or None."""
        self.release()
        deadline = time.monotonic() + timeout
        while self._popen.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self._popen.poll()


# --- the watchdog process ----------------------------------------------------------------------------------


@dataclass
class Watch:
    """What the watchdog knows of its group: every process it saw in it (psutil.Process: pid and start time)."""

    pgid: int
    record: Path
    supervisor_pid: int
    seen: set[psutil.Process]

    def track(self) -> None:
        """Remember the group's processes; rewrite the record when one joined."""
        members = set(group_processes(self.pgid))
        if members <= self.seen:
            return
        self.seen |= members
        try:
            base = GroupRecord.read(self.record)
        except ValueError:
            base = None
        if base is None or base.pgid != self.pgid:
            started = datetime.now(timezone.utc).isoformat(timespec="seconds")
            base = GroupRecord(self.pgid, (), started, self.supervisor_pid)
        with contextlib.suppress(OSError):  # the record is a fallback; watching matters more
            base.with_processes(members).write(self.record)

    def ours_left(self) -> bool:
        """A process seen in the group is still alive and in it (psutil's Process equality checks start times)."""
        return bool(set(group_processes(self.pgid)) & self.seen)


def wait_for_supervisor(watch: Watch, pipe_fd: int) -> str:
    """Track the group until the pipe reaches end-of-file or one of _WATCHED_SIGNALS arrives; says which."""
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)  # the signal's number arrives there: no exception mid-step
    for signum in _WATCHED_SIGNALS:
        signal.signal(signum, lambda *_: None)
    while True:
        watch.track()
        readable, _, _ = select.select([pipe_fd, wake_read], [], [], TRACK_INTERVAL_S)
        if wake_read in readable:
            return f"it received {signal.Signals(os.read(wake_read, 1)[0]).name}"
        if pipe_fd in readable and not os.read(pipe_fd, 4096):
            return "its supervisor is gone"


def stop_group(watch: Watch, stop_signal: signal.Signals, grace_s: float) -> tuple[bool, str | None]:
    """Stop signal, SIGKILL after `grace_s`, wait until empty: (the group is gone, what was done or None)."""
    if not watch.ours_left():
        return True, None
    started = time.monotonic()
    signal_group(watch.pgid, stop_signal)
    if wait_group_gone(watch.pgid, grace_s):
        return True, f"stopped by {stop_signal.name} in {time.monotonic() - started:.2f} s"
    signal_group(watch.pgid, signal.SIGKILL)
    gone = wait_group_gone(watch.pgid, KILL_WAIT_S)
    return gone, f"{'killed' if gone else 'still alive after'} SIGKILL, {time.monotonic() - started:.2f} s after {stop_signal.name}"


def _report(line: str) -> None:
    """One line to stderr, never blocking the exit: it is the supervisor's, maybe a pipe nobody reads any more."""
    writer = threading.Thread(target=lambda: os.write(2, f"{line}\n".encode()), daemon=True)
    writer.start()
    writer.join(1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_control.watchdog", description=__doc__.split("\n")[0])
    parser.add_argument("--pgid", type=int, required=True)
    parser.add_argument("--stop-signal", type=lambda name: signal.Signals[name], default=signal.SIGTERM)
    parser.add_argument("--grace-ms", type=int, default=5000)
    parser.add_argument("--record", type=Path, required=True)
    args = parser.parse_args(argv)
    watch = Watch(pgid=args.pgid, record=args.record, supervisor_pid=os.getppid(), seen=set())
    reason = wait_for_supervisor(watch, sys.stdin.fileno())
    gone, done = stop_group(watch, args.stop_signal, args.grace_ms / 1000)
    if done is not None:
        _report(f"vllm_control.watchdog: {reason}; vLLM process group {args.pgid}: {done}.")
    return 0 if gone else 1


if __name__ == "__main__":
    os._exit(main())  # not sys.exit: a report stuck on a full pipe must not hold the exit
