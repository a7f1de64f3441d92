"""`manage.py serve`: run the site with Granian (embedded in this process) and the ASGI lifespan.

Granian hands the application each request as soon as its head has arrived and streams the body, so
`ocrsite.limits` refuses an oversize or trickling body before it is read, and Granian closes a
connection whose head does not arrive within `OCRSITE_HEADER_TIMEOUT_MS`. The README's "Deploying"
section has the measurements behind this choice (bench/server_bench.py).

This command speaks the lifespan itself, around the server: `lifespan.startup` before it listens (a
failure exits non-zero), `lifespan.shutdown` once SIGTERM/SIGINT has stopped it, so the supervised
vLLM server is stopped and waited for before the process exits.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import tempfile

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from granian.constants import HTTPModes, Interfaces
from granian.http import HTTP1Settings
from granian.log import LogLevels
from granian.server.embed import Server

from ocrsite.asgi import application

logger = logging.getLogger(__name__)


class LifespanDriver:
    """Speaks the server side of the ASGI lifespan protocol to an application."""

    def __init__(self, application) -> None:
        self.application = application
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.replies: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None

    async def _send(self, message: dict) -> None:
        await self.replies.put(message)

    async def startup(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
        self.task = asyncio.ensure_future(self.application(scope, self.inbox.get, self._send))
        await self.inbox.put({"type": "lifespan.startup"})
        reply = await self._reply()
        if reply["type"] == "lifespan.startup.failed":
            raise CommandError(f"Start-up failed: {reply.get('message', '')}")

    async def shutdown(self) -> None:
        if self.task is None or self.task.done():
            return
        await self.inbox.put({"type": "lifespan.shutdown"})
        reply = await self._reply()
        if reply["type"] == "lifespan.shutdown.failed":
            logger.error("Shutdown failed: %s", reply.get("message", ""))
        await asyncio.gather(self.task, return_exceptions=True)

    async def _reply(self) -> dict:
        assert self.task is not None
        getter = asyncio.ensure_future(self.replies.get())
        await asyncio.wait({getter, self.task}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            return getter.result()
        getter.cancel()
        error = self.task.exception()
        raise CommandError(f"The application's lifespan handler ended without answering: {error!r}")


class Command(BaseCommand):
    help = "Run ocrsite (HTTP and WebSockets) with Granian, with the ASGI lifespan (model server, OCR runner)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8080)

    def handle(self, *args, host: str, port: int, **options) -> None:
        # Django spools request bodies to anonymous temporary files: keep them on the data directory's
        # disk, whose space the operator watches, rather than in /tmp, which may be memory (tmpfs).
        tempfile.tempdir = settings.FILE_UPLOAD_TEMP_DIR
        asyncio.run(self._serve(host, port))

    async def _serve(self, host: str, port: int) -> None:
        _check_free(host, port)  # before the lifespan starts a model server for nothing
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        driver = LifespanDriver(application)
        await driver.startup()
        try:
            if stop.is_set():
                return
            server = Server(
                application,
                address=host,
                port=port,
                interface=Interfaces.ASGINL,  # no lifespan from Granian: this command drives it
                backlog=1024,  # as Granian's command line: the embedded default (128) also caps
                # the connections served at once (backpressure), and slow clients would fill them
                http=HTTPModes.http1,  # WebSockets need HTTP/1, and header_read_timeout is HTTP/1's
                http1_settings=HTTP1Settings(header_read_timeout=settings.OCRSITE_HEADER_TIMEOUT_MS),
                log_level=LogLevels.warning,
            )
            serving = asyncio.ensure_future(server.serve())
            stopping = asyncio.ensure_future(stop.wait())
            self.stdout.write(f"ocrsite listening on http://{host}:{port}/", ending="\n")
            self.stdout.flush()
            await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            server.stop()
            try:
                await serving
            except RuntimeError as exc:  # Granian's bind errors
                raise CommandError(f"Cannot serve on {host}:{port}: {exc}") from None
        finally:
            await driver.shutdown()


def _check_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise CommandError(f"Cannot serve on {host}:{port}: {exc.strerror}.") from None
