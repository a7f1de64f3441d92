"""The development autoreloader ends its child with sys.exit(3) from the main thread while the server
runs in another thread, so no lifespan shutdown happens: the supervised vLLM group must still go."""

from __future__ import annotations

import subprocess
import sys

from tests.support import REPO, free_port, pid_alive, project_env, wait_until
from vllm_control.processes import group_members

SCRIPT = """
import asyncio, os, sys, threading, django
django.setup()
from tests.vllm_control.conftest import make_local_config
from vllm_control.supervisor import Supervisor

ready = threading.Event()
def serve():  # like runserver's server thread under the autoreloader
    async def main():
        supervisor = Supervisor(make_local_config(int(sys.argv[1])))
        await supervisor.start()
        status = await supervisor.wait_ready(30)
        print(status.pid, flush=True)
        ready.set()
        await asyncio.sleep(3600)
    asyncio.run(main())

threading.Thread(target=serve, daemon=True).start()
ready.wait(40)
sys.exit(3)  # django.utils.autoreload.trigger_reload
"""


def test_reloader_exit_leaves_no_vllm_process(tmp_path) -> None:
    env = project_env(tmp_path, {"FAKE_VLLM_STARTUP_DELAY": "0.3", "FAKE_VLLM_MAX_LIFETIME": "120"})
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(free_port())], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 3, result.stderr[-2000:]
    pid = int(result.stdout.split()[0])
    wait_until(lambda: not pid_alive(pid) and group_members(pid) == [], 10, message="the vLLM group to be gone")
