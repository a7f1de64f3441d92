"""The watchdog between a supervisor and its `vllm serve`: the vLLM process group dies with the supervisor,
whatever kills it.

vLLM's API server spawns EngineCore and worker processes that do not die with it (vllm-project/vllm#55510)
and would keep the GPU. So the supervisor does not start `vllm serve` itself; it starts this small process,
which starts vLLM and stays its parent:

    supervisor --lifeline--> watchdog (own session) --> vllm serve (own session and process group,
                                                           parent-death signal) --> EngineCore --> workers

- The lifeline is the watchdog's stdin. Only the supervisor holds its write end, so the kernel closes it
  when the supervisor exits in any way, SIGKILL included. Its first line is the command (JSON
  {"argv": [...], "cwd": "..."}), which keeps the API key in it off the watchdog's command line.
- On end-of-file, or SIGTERM, SIGINT or SIGHUP, the watchdog stops the group: the stop signal, SIGKILL
  after the grace period, then it waits until the group is empty. A supervisor's normal stop is exactly
  this: it closes the lifeline and waits for the watchdog.
- When vLLM exits by itself (a crash), the watchdog SIGKILLs the rest of its group at once, as the
  supervisor did before it existed.
- Then it exits with vLLM's status (the same exit code, or killed by the same signal), so to the
  supervisor it looks like vLLM itself; vLLM's output goes straight to the supervisor's pipe.
- It never reaps vLLM before it exits (waitid with WNOWAIT), so vLLM's pid, which is the group's number,
  cannot be reused by another process while the watchdog signals the group.
- While vLLM runs it keeps the supervisor's record of the group (processes.GroupRecord, written before it
  reports vLLM's pid) up to date as processes join, so a later start still finds survivors should the
  watchdog be SIGKILLed too: then vLLM's API server gets its parent-death signal (SIGKILL), but its
  EngineCore and workers stay until that start.

It reports on --report-fd, once: "pid N" when vLLM started, "error ERRNO MESSAGE" when it could not be
executed (exit code 127 then).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import resource
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import psutil

from vllm_control.processes import GroupRecord, group_processes, signal_group, wait_group_gone

TRACK_INTERVAL_S = 0.5  # how often the group is polled for new processes while vLLM runs
KILL_WAIT_S = 10.0
_IMPORT_ROOT = Path(__file__).resolve().parent.parent  # the directory holding the vllm_control package
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1


# --- the supervisor's side ---------------------------------------------------------------------------------


@dataclass
class Supervised:
    """A `vllm serve` started through its watchdog."""

    process: asyncio.subprocess.Process  # the watchdog: its output and exit status are vLLM's
    pid: int  # vLLM's pid, also the number of its process group
    lifeline: int | None  # our end of the pipe
    _closing: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def release(self) -> None:
        """Close the lifeline: the watchdog stops the group (stop signal, grace, SIGKILL), then exits.

        Safe from any thread and more than once (never closes a number another file got since)."""
        with self._closing:
            fd, self.lifeline = self.lifeline, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


async def start(
    argv: list[str], *, env: dict[str, str], stop_signal: signal.Signals, grace_ms: int, record: Path, output_limit: int
) -> Supervised:
    """Start `argv` (a `vllm serve` command) under a new watchdog, in this process's working directory.

    Raises OSError (FileNotFoundError, PermissionError, ...) when `argv` cannot be executed, RuntimeError
    when the watchdog itself did not start.
    """
    lifeline_read, lifeline = os.pipe()
    report_read, report_write = os.pipe()
    options = ["--stop-signal", stop_signal.name, "--grace-ms", str(grace_ms), "--record", str(record)]
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "vllm_control.watchdog", *options, "--report-fd", str(report_write),
            stdin=lifeline_read,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            cwd=_IMPORT_ROOT,  # so that `-m` imports this checkout's package, not a copy installed elsewhere
            start_new_session=True,  # neither a stop of the vLLM group nor Ctrl+C in our terminal reaches it
            pass_fds=(report_write,),
            limit=output_limit,
        )
    except BaseException:
        os.close(lifeline)
        os.close(report_read)
        raise
    finally:
        os.close(lifeline_read)
        os.close(report_write)
    try:
        with contextlib.suppress(BrokenPipeError):  # it died at once: its report says why
            os.write(lifeline, json.dumps({"argv": argv, "cwd": os.getcwd()}).encode() + b"\n")
        report = (await asyncio.to_thread(_read_to_end, report_read)).decode()
    except BaseException:
        os.close(lifeline)  # a vLLM it started already is stopped
        raise
    kind, _, detail = report.strip().partition(" ")
    if kind == "pid":
        return Supervised(process, int(detail), lifeline)
    os.close(lifeline)
    output, _ = await process.communicate()
    if kind == "error":
        number, _, message = detail.partition(" ")
        raise OSError(int(number), message, argv[0])
    tail = output.decode(errors="replace").strip()[-2000:]
    raise RuntimeError(f"The vLLM watchdog did not start (exit code {process.returncode}): {tail}")


def _read_to_end(fd: int) -> bytes:
    chunks = []
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        while chunk := pipe.read(4096):
            chunks.append(chunk)
    return b"".join(chunks)


# --- the watchdog process ----------------------------------------------------------------------------------


@dataclass
class Watch:
    """The group the watchdog guards and the processes it saw in it, which it keeps in the record."""

    pgid: int
    record_path: Path
    record: GroupRecord
    seen: set[psutil.Process] = field(default_factory=set)

    def track(self) -> None:
        """Remember the group's processes; rewrite the record when one joined."""
        members = set(group_processes(self.pgid))
        if members <= self.seen:
            return
        self.seen |= members
        with contextlib.suppress(OSError):  # the record is a fallback; guarding the group matters more
            self.record.with_processes(members).write(self.record_path)


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: the pre-exec function must not load libraries

    def preexec() -> None:
        # Runs in vLLM between fork and exec: SIGKILL when the watchdog dies (the case where it cannot act).
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the watchdog died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def _exit_status(pid: int) -> os.waitid_result | None:
    """vLLM's exit status once it exited, without reaping it (its pid stays taken); None while it runs."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)


def wait_for_end(watch: Watch, pid: int, lifeline: int, wakeup: int) -> str:
    """Keep the record until vLLM exits, the lifeline reaches end-of-file or a stop signal arrives: which."""
    while True:
        if _exit_status(pid) is not None:
            return "exited"
        watch.track()
        readable, _, _ = select.select([lifeline, wakeup], [], [], TRACK_INTERVAL_S)
        if wakeup in readable:
            received = set(os.read(wakeup, 64)) - {signal.SIGCHLD}
            if received:
                return f"received {signal.Signals(min(received)).name}"
        if lifeline in readable and not os.read(lifeline, 4096):
            return "lifeline closed"


def stop_group(pgid: int, stop_signal: signal.Signals, grace_s: float) -> bool:
    """The stop signal to the group, SIGKILL after `grace_s`; True once no process of it is left."""
    signal_group(pgid, stop_signal)
    if wait_group_gone(pgid, grace_s):
        return True
    grace = f"{grace_s * 1000:.0f} ms"
    _say(f"vLLM process group {pgid} still running {grace} after {stop_signal.name}; sending SIGKILL.")
    signal_group(pgid, signal.SIGKILL)
    return wait_group_gone(pgid, KILL_WAIT_S)


def _say(message: str) -> None:
    """A line in vLLM's output, which the supervisor logs (if it is still there to read it)."""
    with contextlib.suppress(OSError):
        os.write(2, f"ocrsite watchdog: {message}\n".encode())


def _read_command(lifeline: int) -> dict:
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(lifeline, 65536)
        if not chunk:
            raise SystemExit("ocrsite watchdog: the lifeline closed before a command arrived")
        line += chunk
    return json.loads(line)


def _exit_like(status: os.waitid_result | None) -> None:
    if status is None:  # vLLM outlived SIGKILL (uninterruptible sleep, e.g. in a GPU driver)
        os._exit(1)
    if status.si_code == os.CLD_EXITED:
        os._exit(status.si_status)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(OSError, ValueError):  # SIGKILL has no handler to reset
        signal.signal(status.si_status, signal.SIG_DFL)
    os.kill(os.getpid(), status.si_status)
    os._exit(128 + status.si_status)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vllm_control.watchdog", description=__doc__.split("\n")[0])
    parser.add_argument("--stop-signal", type=lambda name: signal.Signals[name], default=signal.SIGTERM)
    parser.add_argument("--grace-ms", type=int, default=5000)
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--report-fd", type=int, required=True)
    args = parser.parse_args(argv)
    lifeline = sys.stdin.fileno()
    os.set_inheritable(args.report_fd, False)
    wakeup, wakeup_write = os.pipe()
    os.set_blocking(wakeup_write, False)
    signal.set_wakeup_fd(wakeup_write)  # signals arrive as bytes there: nothing interrupts a step halfway
    for signum in (*_STOP_SIGNALS, signal.SIGCHLD):
        signal.signal(signum, lambda *_: None)
    command = _read_command(lifeline)
    try:
        vllm = subprocess.Popen(
            command["argv"],
            cwd=command["cwd"],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()),  # safe: this process has a single thread
        )
    except OSError as exc:
        os.write(args.report_fd, f"error {exc.errno} {exc.strerror}".encode())
        os._exit(127)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    watch = Watch(vllm.pid, args.record, GroupRecord(vllm.pid, (), started, os.getppid()))
    watch.track()  # the record exists before the supervisor learns the pid
    os.write(args.report_fd, f"pid {vllm.pid}".encode())
    os.close(args.report_fd)

    why = wait_for_end(watch, vllm.pid, lifeline, wakeup)
    if why == "exited":
        signal_group(vllm.pid, signal.SIGKILL)  # what vLLM left behind: nothing to be graceful for
        wait_group_gone(vllm.pid, KILL_WAIT_S)
    elif not stop_group(vllm.pid, args.stop_signal, args.grace_ms / 1000):
        _say(f"vLLM process group {vllm.pid} is still alive after SIGKILL ({why}).")
    _exit_like(_exit_status(vllm.pid))


if __name__ == "__main__":
    main()
