"""The ASGI `lifespan` protocol: start what the process supervises, stop it on shutdown."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


async def startup() -> None:
    """Runs once when the ASGI server starts."""


async def shutdown() -> None:
    """Runs once when the ASGI server stops; waits until everything started here has stopped."""


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
