"""`manage.py serve`: run the site with Daphne and deliver the ASGI lifespan around it.

Daphne does not send lifespan events (django/daphne#264), so this command does: `lifespan.startup`
before it starts listening, `lifespan.shutdown` when SIGTERM/SIGINT stops the reactor, before the loop
ends, so the supervised vLLM server is stopped and waited for.
"""

from __future__ import annotations

import asyncio
import logging

from django.core.management.base import BaseCommand, CommandError

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
    help = "Run ocrsite (HTTP and WebSockets) with Daphne, with the ASGI lifespan (model server, OCR runner)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8080)

    def handle(self, *args, host: str, port: int, **options) -> None:
        # daphne.server installs the asyncio Twisted reactor: import it before anything imports twisted.
        from daphne.endpoints import build_endpoint_description_strings
        from daphne.server import Server, twisted_loop
        from twisted.internet import defer, reactor

        from ocrsite.asgi import application

        driver = LifespanDriver(application)
        asyncio.set_event_loop(twisted_loop)
        # The loop the reactor will run: the supervisor and the runner started here live on it.
        twisted_loop.run_until_complete(driver.startup())

        def shutdown() -> defer.Deferred:
            return defer.Deferred.fromFuture(asyncio.ensure_future(driver.shutdown(), loop=twisted_loop))

        reactor.addSystemEventTrigger("before", "shutdown", shutdown)
        self.stdout.write(f"ocrsite listening on http://{host}:{port}/", ending="\n")
        self.stdout.flush()
        server = Server(
            application=application,
            endpoints=build_endpoint_description_strings(host=host, port=port),
            signal_handlers=True,
            application_close_timeout=10,
            server_name="ocrsite",
        )
        server.run()
        if not twisted_loop.is_closed() and driver.task is not None and not driver.task.done():
            twisted_loop.run_until_complete(driver.shutdown())  # the reactor stopped without its triggers
