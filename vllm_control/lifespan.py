"""The ASGI `lifespan` protocol: start what the process supervises, stop it on shutdown."""

from __future__ import annotations

import logging

from django.conf import settings

logger = logging.getLogger(__name__)


async def startup() -> None:
    """Runs once when the ASGI server starts: the Local model server (autostart), then the OCR runner."""
    from vllm_control import runtime
    from vllm_control.config import aresolve_config

    runtime.bind_loop()  # the supervisor lives on the server's loop for the life of the process
    config = await aresolve_config()
    if config.mode == "local" and config.local.autostart:
        await runtime.start_local(config)
    if settings.OCRSITE_EMBEDDED_RUNNER:
        from scans.pipeline.runner import start_embedded_runner

        await start_embedded_runner()


async def shutdown() -> None:
    """Runs once when the ASGI server stops; waits until everything started here has stopped."""
    from vllm_control import runtime

    from scans.pipeline.runner import stop_embedded_runner

    try:
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
