"""`manage.py vllm_server`: the standalone vLLM server manager (the same supervisor as the web process)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from dataclasses import replace

from django.core.management.base import BaseCommand

from vllm_control.config import LocalServerConfig, local_base_url, resolve_config
from vllm_control.status import ServerState, ServerStatus
from vllm_control.supervisor import Supervisor

READY_LINE = "vLLM server is ready and accepting requests"


def report(status: ServerStatus) -> dict:
    return {
        "healthy": status.state == ServerState.READY,
        "state": str(status.state),
        "pid": status.pid,
        "port": status.port,
        "model": status.model,
        "restart_count": status.restart_count,
        "uptime_seconds": status.uptime_s,
        "last_health_check": status.last_health_check,
        "last_error": status.last_error,
    }


class Command(BaseCommand):
    help = (
        "Run and supervise `vllm serve` in the foreground (restarts on crashes and hangs). Defaults come from "
        "the settings and VLLM_* environment variables; several ocrsite instances in External mode can share it."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("model", nargs="?", help="Model id (default: the configured model)")
        parser.add_argument("--port", type=int)
        parser.add_argument("--host")
        parser.add_argument("--served-model-name")
        parser.add_argument("--tensor-parallel-size", type=int)
        parser.add_argument("--data-parallel-size", type=int)
        parser.add_argument("--gpu-memory-utilization", type=float)
        parser.add_argument("--max-model-len", type=int)
        parser.add_argument("--health-check-interval", type=int, help="Seconds between health checks")
        parser.add_argument("--max-restart-attempts", type=int)
        parser.add_argument("--restart-delay", type=int, help="Seconds to wait before a restart")
        parser.add_argument("--log-file", default="vllm-server-manager.log", help="DEBUG log (INFO goes to the console)")
        parser.add_argument("--report-interval", type=float, default=60.0, help=argparse.SUPPRESS)

    def handle(self, *args, **options) -> None:
        config = self.local_config(options)
        self.configure_logging(options["log_file"])
        code = asyncio.run(self.supervise(config, options["report_interval"]))
        if code:
            sys.exit(code)

    @staticmethod
    def local_config(options: dict) -> LocalServerConfig:
        config = resolve_config().local
        changes: dict = {}
        for option, field in (
            ("port", "port"),
            ("host", "host"),
            ("served_model_name", "served_model_name"),
            ("tensor_parallel_size", "tensor_parallel_size"),
            ("data_parallel_size", "data_parallel_size"),
            ("gpu_memory_utilization", "gpu_memory_utilization"),
            ("max_model_len", "max_model_len"),
            ("health_check_interval", "health_check_interval_s"),
            ("max_restart_attempts", "max_restart_attempts"),
            ("restart_delay", "restart_delay_s"),
        ):
            if options.get(option) is not None:
                changes[field] = options[option]
        if options.get("model"):
            changes["model"] = options["model"]
            changes.setdefault("served_model_name", options["model"])
        if "port" in changes or "host" in changes:
            changes["base_url"] = local_base_url(config.protocol, changes.get("host", config.host), changes.get("port", config.port))
        return replace(config, **changes)

    @staticmethod
    def configure_logging(log_file: str) -> None:
        root = logging.getLogger()
        for handler in root.handlers:
            if handler.level == logging.NOTSET:
                handler.setLevel(logging.INFO)
        if log_file:
            file_handler = logging.FileHandler(log_file)
            file_handler.setLevel(logging.DEBUG)
            file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            root.addHandler(file_handler)
        root.setLevel(logging.DEBUG)
        for noisy in ("asyncio", "httpcore"):
            logging.getLogger(noisy).setLevel(logging.INFO)

    async def supervise(self, config: LocalServerConfig, report_interval: float) -> int:
        supervisor = Supervisor(config)
        stop = asyncio.Event()
        gave_up = asyncio.Event()
        previous: list[ServerState] = [ServerState.STOPPED]

        def on_status(status: ServerStatus) -> None:
            if status.state == ServerState.READY and previous[0] != ServerState.READY:
                self.print_line(READY_LINE)
            if status.state == ServerState.FAILED:
                gave_up.set()
            previous[0] = status.state

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        supervisor.add_listener(on_status)
        await supervisor.start()

        async def reports() -> None:
            while True:
                await asyncio.sleep(report_interval)
                self.print_line(json.dumps(report(supervisor.status())))

        reporter = asyncio.create_task(reports())
        waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(gave_up.wait())]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        reporter.cancel()
        for waiter in waiters:
            waiter.cancel()
        failed = gave_up.is_set() and not stop.is_set()
        if failed:
            self.stderr.write(f"vLLM server failed: {supervisor.last_error}")
        await supervisor.stop()
        return 1 if failed else 0

    def print_line(self, line: str) -> None:
        self.stdout.write(line)
        self.stdout.flush()
