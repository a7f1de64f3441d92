"""`manage.py ocr_worker`: process the scan queue in a process of its own (scale-out).

Runs the same loop as the web server's embedded runner. SIGTERM/SIGINT stop it cleanly: in-flight
requests are cancelled, their pages go back to pending and the scans back to the queue. A worker
killed without that chance (SIGKILL) is noticed by its stale heartbeat and its scans are resumed by
any other runner.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from django.core.management.base import BaseCommand, CommandParser

from ocrsite.database import ensure_migrated
from ocrsite.metrics import serve_metrics
from scans.management.commands.ocr import positive_int
from scans.pipeline.runner import Runner

logger = logging.getLogger("scans.worker")


class Command(BaseCommand):
    help = "Process queued scans until stopped (SIGTERM/SIGINT), or with --once until the queue is empty."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--concurrency", type=positive_int, help="requests in flight at once (default: the settings)")
        parser.add_argument("--once", action="store_true", help="exit when no queued scan is left")
        parser.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (/metrics)")
        parser.add_argument("--metrics-host", default="127.0.0.1", help="address for --metrics-port (default: loopback)")

    def handle(self, *args, **opts) -> None:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise here
        ensure_migrated(self.stderr)
        if opts["metrics_port"] is not None:
            server = serve_metrics(opts["metrics_host"], opts["metrics_port"])
            self.stdout.write(f"Metrics on http://{opts['metrics_host']}:{server.server_address[1]}/metrics", ending="\n")
        runner = Runner(max_in_flight=opts["concurrency"], once=opts["once"])
        asyncio.run(self._run(runner))

    async def _run(self, runner: Runner) -> None:
        loop = asyncio.get_running_loop()
        stopping: list[asyncio.Task] = []

        def request_stop(signum: int) -> None:
            if not stopping:
                logger.info("Received %s: stopping (unfinished pages go back to the queue)", signal.Signals(signum).name)
                stopping.append(asyncio.create_task(runner.stop()))

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, request_stop, signum)
        self.stdout.write(f"OCR worker {runner.worker_id} started", ending="\n")
        self.stdout.flush()
        try:
            await runner.run_forever()
        finally:
            if stopping:
                await stopping[0]
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
        self.stdout.write(f"OCR worker {runner.worker_id} stopped")
