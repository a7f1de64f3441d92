"""The ASGI `lifespan` protocol: the site's composition of both apps at start-up and shutdown.

Start-up: the Local model servers (when configured to start with the site) and, with several model
servers, the endpoints' health checks; the OCR runner, then the webhook delivery loop. Shutdown: the delivery loop and the runner first (its in-flight pages go back to
the queue), then the model server, waited for.
"""

from __future__ import annotations

import asyncio
import logging

from django.conf import settings

from api.delivery import start_delivery_loop, stop_delivery_loop
from scans.pipeline.runner import start_embedded_runner, stop_embedded_runner
from vllm_control import runtime
from vllm_control.config import aresolve_config
from vllm_control.tls import tls_context

logger = logging.getLogger(__name__)


async def startup() -> None:
    await asyncio.to_thread(tls_context)  # built once, here rather than on the loop at the first probe
    runtime.bind_loop()  # the supervisor lives on the server's loop for the life of the process
    config = await aresolve_config()
    if config.mode == "local" and config.local.autostart:
        await runtime.start_local(config)
    if len(config.endpoints) > 1:  # several model servers: the extra Local ones, and their health checks
        await runtime.sync_fleet(config, start=config.local.autostart)
        runtime.route_endpoints(config)
    if settings.OCRSITE_EMBEDDED_RUNNER:
        await start_embedded_runner()
    await start_delivery_loop()  # webhook deliveries, including the retries a previous run left


async def shutdown() -> None:
    """Waits until everything started here has stopped."""
    try:
        await stop_delivery_loop()
        await stop_embedded_runner()
    finally:
        await runtime.shutdown()


class LifespanApp:
    async def __call__(self, scope, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await startup()
                except Exception as exc:
                    logger.exception("Start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await shutdown()
                finally:
                    await send({"type": "lifespan.shutdown.complete"})
                return
