"""How long a local vLLM outlives a SIGKILLed supervisor (issue 17), against the vLLM test double.

    .venv/bin/python bench/orphans_bench.py              # about 2 minutes on 2 cores
    .venv/bin/python bench/orphans_bench.py --runs 2     # a smoke run

For `manage.py serve` and `manage.py vllm_server`, with the server ready and with a request in flight
(held by the double: `serve`'s own runner sent it for a queued page; for `vllm_server` a client did),
and with a server that ignores SIGTERM: SIGKILL the supervising process, then poll its vLLM process
group (API server, VLLM::EngineCore, VLLM::Worker) every 2 ms until no process of it is left. The
reference is a normal stop measured the same way in the same run: SIGTERM to the supervising process.
The stop grace is the default VLLM_STOP_GRACE_MS (5000 ms). Runs are interleaved; each uses a fresh copy
of a migrated data directory (SQLite).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ocrsite.settings")

from tests.fakes.pages import chat_request, make_image  # noqa: E402
from tests.support import free_port, kill_group, manage, port_open, project_env, wait_until  # noqa: E402
from vllm_control.processes import GroupRecord, group_members  # noqa: E402

LOCAL_MODE = "from vllm_control.models import VLMSettings as V; r = V.load(); r.mode = 'local'; r.save()"
GRACE_MS = 5000
MODEL = "Qwen/Qwen3-VL-2B-Instruct"  # the configured default, which the double serves


@dataclass(frozen=True)
class Case:
    command: str
    state: str  # "ready", "mid-request" or "ignores SIGTERM"
    signal: signal.Signals = signal.SIGKILL  # what the supervising process gets


def migrated_template(root: Path) -> Path:
    template = root / "template"
    env = project_env(template)
    for args in (["migrate", "-v0"], ["shell", "-c", LOCAL_MODE]):
        done = manage(args, env)
        assert done.returncode == 0, done.stderr
    return template


def hold_page_1_request(port: int) -> None:
    def send() -> None:
        with contextlib.suppress(httpx.HTTPError):  # the server is killed under it
            httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=chat_request(1, MODEL), timeout=60)

    threading.Thread(target=send, daemon=True).start()


def one_run(case: Case, template: Path, root: Path) -> float:
    """Seconds from the signal to the supervising process until its vLLM group is empty."""
    data = Path(tempfile.mkdtemp(dir=root))
    shutil.copytree(template, data, dirs_exist_ok=True)
    port = free_port()
    env = project_env(data, {
        "VLLM_PORT": str(port), "VLLM_HOST": "127.0.0.1", "VLLM_STOP_GRACE_MS": str(GRACE_MS),
        "FAKE_VLLM_STARTUP_DELAY": "0.3", "FAKE_VLLM_MAX_LIFETIME": "120", "FAKE_VLLM_ACCESS_LOG": "0",
        "FAKE_VLLM_SCRIPT": json.dumps({"1": ["hang"]}), "FAKE_VLLM_STATE_DIR": str(data / "double"),
        "OCRSITE_EMBEDDED_RUNNER": "false",
    })
    if case.state == "ignores SIGTERM":
        env["FAKE_VLLM_IGNORE_SIGTERM"] = "1"
    if case.command == "serve" and case.state == "mid-request":
        env["OCRSITE_EMBEDDED_RUNNER"] = "true"
        assert manage(["ocr", "--queue", str(make_image(data / "page-1.png", 1))], env).returncode == 0
    args = ["serve", "--port", str(free_port())] if case.command == "serve" else ["vllm_server", "--log-file", ""]
    supervisor = subprocess.Popen([sys.executable, str(REPO / "manage.py"), *args], env=env, cwd=data,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    record_file = data / f"vllm-{port}.pgid"
    try:
        wait_until(lambda: port_open(port), 60, message="vLLM listening")
        wait_until(lambda: record_file.exists() and len(GroupRecord.read(record_file).processes) >= 3, 30,
                   message="the EngineCore and worker in the record")
        if case.state == "mid-request":
            if case.command == "vllm_server":
                hold_page_1_request(port)
            wait_until(lambda: (data / "double" / "requests.jsonl").exists(), 60, message="a request held")
        pgid = GroupRecord.read(record_file).pgid
        started = time.monotonic()
        supervisor.send_signal(case.signal)
        while group_members(pgid):
            time.sleep(0.002)
        return time.monotonic() - started
    finally:
        kill_group(supervisor.pid)
        supervisor.wait(timeout=10)
        shutil.rmtree(data, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    options = parser.parse_args()
    commands = ("serve", "vllm_server")
    normal = {command: Case(command, "ready", signal.SIGTERM) for command in commands}
    states = ("ready", "mid-request", "ignores SIGTERM")
    cases = [*normal.values(), *(Case(command, state) for state in states for command in commands)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        template = migrated_template(root)
        times: dict[Case, list[float]] = {case: [] for case in cases}
        for _ in range(options.runs):  # interleaved, so a slow minute of the machine hits every case alike
            for case in cases:
                times[case].append(one_run(case, template, root))
    print(f"\nSignal to the supervising process -> no process of its vLLM group left "
          f"({options.runs} runs each, VLLM_STOP_GRACE_MS={GRACE_MS})\n")
    print("| command | signal | vLLM | min | median | max | median vs a normal stop |")
    print("|---|---|---|---|---|---|---|")
    for case in cases:
        values = sorted(times[case])
        ratio = statistics.median(values) / statistics.median(times[normal[case.command]])
        print(f"| `{case.command}` | {case.signal.name} | {case.state} | {values[0] * 1000:.0f} ms | "
              f"{statistics.median(values) * 1000:.0f} ms | {values[-1] * 1000:.0f} ms | {ratio:.2f} |")


if __name__ == "__main__":
    main()
