"""No orphaned vLLM: whatever kills the supervising process, its vLLM process group goes (issue 17).

Real `manage.py serve` / `manage.py vllm_server` processes supervising the double, whose EngineCore and
worker rename themselves (setproctitle) and outlive their API server, as vLLM's do.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading

import httpx
import psutil
import pytest

from tests.fakes.pages import chat_request, make_image
from tests.support import (
    REPO,
    free_port,
    kill_test_processes,
    manage,
    pid_alive,
    port_open,
    project_env,
    vllm_pids,
    vllm_record,
    wait_until,
    watchdogs_of,
)
from tests.vllm_control.conftest import MODEL, read_until
from vllm_control.processes import group_members, is_live

pytestmark = pytest.mark.timeout(120)

READY = "vLLM server is ready and accepting requests"
GONE_WITHIN_S = 10  # the bound; the measured times are in the README


def hold_page_1(env, tmp_path) -> None:
    """The double holds the first request for page 1 until it is stopped, and logs it when it arrives."""
    env["FAKE_VLLM_SCRIPT"] = json.dumps({"1": ["hang"]})
    env["FAKE_VLLM_STATE_DIR"] = str(tmp_path / "double")


def held_requests(tmp_path) -> list[dict]:
    log = tmp_path / "double" / "requests.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def send_page_1(port: int) -> None:
    """A chat request for page 1 from another thread; it fails when the server goes away."""

    def send() -> None:
        with contextlib.suppress(httpx.HTTPError):  # the server is killed under it
            httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=chat_request(1, MODEL), timeout=60)

    threading.Thread(target=send, daemon=True).start()


def renamed_group(env) -> int:
    """Wait until the recorded group holds the API server, VLLM::EngineCore and VLLM::Worker, renamed as
    vLLM's are (so nothing finds them by a variable set for them any more), and the record names them all;
    returns its pgid."""

    def complete() -> bool:
        record = vllm_record(env)
        members = group_members(record.pgid) if record else []
        names = {psutil.Process(pid).name() for pid in members}
        return {"VLLM::EngineCore", "VLLM::Worker"} <= names and set(members) <= {p.pid for p in record.processes}

    wait_until(complete, 10, message="the renamed EngineCore and worker, in the record")
    pgid = vllm_record(env).pgid
    for pid in set(group_members(pgid)) - {pgid}:
        assert "OCRSITE_TEST_MARKER" not in psutil.Process(pid).environ()
    return pgid


def gone(process: psutil.Process) -> bool:
    """Exited (an orphan's zombie, waiting for init to reap it, counts as exited: `is_live`)."""
    try:
        return not is_live(process)
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("in_flight", [False, True], ids=["ready", "mid-request"])
@pytest.mark.parametrize("command", ["serve", "vllm_server"])
def test_sigkill_of_the_supervisor_leaves_no_process_of_the_group(site, tmp_path, command, in_flight):
    env, port, spawn = site
    hold_page_1(env, tmp_path)
    if command == "serve" and in_flight:  # the site's own runner sends the request
        env["OCRSITE_EMBEDDED_RUNNER"] = "true"
        queued = manage(["ocr", "--queue", str(make_image(tmp_path / "page-1.png", 1))], env)
        assert queued.returncode == 0, queued.stderr
    if command == "serve":
        supervisor = spawn("serve", "--port", str(free_port()))
        wait_until(lambda: port_open(port), 30, message="vLLM listening")
    else:
        supervisor = spawn("vllm_server", "--log-file", "")
        read_until(supervisor, READY, 30)
    pgid = renamed_group(env)
    if in_flight:
        if command == "vllm_server":
            send_page_1(port)
        wait_until(lambda: held_requests(tmp_path), 30, message="a request held by the double")
    (watchdog,) = watchdogs_of(supervisor.pid)

    supervisor.send_signal(signal.SIGKILL)
    supervisor.wait(timeout=10)

    wait_until(lambda: group_members(pgid) == [], GONE_WITHIN_S, message="no process of the vLLM group")
    wait_until(lambda: gone(watchdog), 5, message="the watchdog to exit")
    assert not port_open(port)
    if in_flight:
        assert [entry["outcome"] for entry in held_requests(tmp_path)] == ["hang"]


def test_supervisor_and_watchdog_both_sigkilled_the_next_start_cleans_up(site):
    env, port, spawn = site
    first = spawn("vllm_server", "--log-file", "")
    read_until(first, READY, 30)
    pgid = renamed_group(env)
    # Both die at once: the watchdog cannot act (stopped) when its supervisor dies, then is killed too.
    (watchdog,) = watchdogs_of(first.pid)
    watchdog.suspend()
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    watchdog.kill()
    wait_until(lambda: not pid_alive(pgid), 10, message="the parent-death signal to kill the API server")
    survivors = group_members(pgid)
    assert len(survivors) == 2  # EngineCore and worker, as vLLM's (they linger FAKE_VLLM_ORPHAN_LINGER s)

    again = spawn("vllm_server", "--log-file", "")
    read_until(again, READY, 30)
    assert group_members(pgid) == []
    assert vllm_record(env).pgid != pgid and len(vllm_pids(env)) >= 1
    again.send_signal(signal.SIGTERM)
    assert again.wait(timeout=30) == 0
    assert vllm_pids(env) == [] and vllm_record(env) is None


SEVERAL = """
import asyncio, sys, django
django.setup()
from pathlib import Path
from tests.vllm_control.conftest import make_local_config
from vllm_control.supervisor import Supervisor

async def main():
    supervisors = [Supervisor(make_local_config(int(port)), data_dir=Path(sys.argv[1])) for port in sys.argv[2:]]
    for supervisor in supervisors:
        await supervisor.start()
    for supervisor in supervisors:
        print((await supervisor.wait_ready(30)).pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_each_of_several_supervisors_in_a_process_takes_its_group_along(tmp_path):
    """Issue 14 will run one supervisor per local server in a process: each group has its own watchdog."""
    env = project_env(tmp_path, {"FAKE_VLLM_STARTUP_DELAY": "0.3", "FAKE_VLLM_MAX_LIFETIME": "120"})
    process = subprocess.Popen(
        [sys.executable, "-c", SEVERAL, str(tmp_path), str(free_port()), str(free_port())],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
    )
    try:
        pgids = [int(process.stdout.readline()), int(process.stdout.readline())]
        watchdogs = watchdogs_of(process.pid)
        assert len(watchdogs) == 2
        wait_until(lambda: all(len(group_members(pgid)) >= 3 for pgid in pgids), 10, message="both groups complete")
        process.kill()
        process.wait(timeout=10)
        wait_until(lambda: all(group_members(pgid) == [] for pgid in pgids), GONE_WITHIN_S, message="both groups gone")
        wait_until(lambda: all(gone(watchdog) for watchdog in watchdogs), 5, message="both watchdogs to exit")
    finally:
        process.kill()
        process.wait(timeout=10)
        kill_test_processes(env["OCRSITE_TEST_MARKER"], tmp_path)
