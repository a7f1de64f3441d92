"""WebSocket for the model server's status (`ws/server/`): a snapshot on connect, then every change.

People who may manage the server receive its error details and recent log lines; everyone else the
public variant (`vllm_control.events.status_payload`).
"""

from __future__ import annotations

import logging

from ocrsite.live import LiveConsumer
from vllm_control import events, runtime
from vllm_control.config import aresolve_config
from vllm_control.permissions import acan_manage_server
from vllm_control.status import ServerState, ServerStatus

logger = logging.getLogger(__name__)


async def current_status() -> ServerStatus:
    config = await aresolve_config()
    try:
        return await runtime.current_status(config)
    except Exception as exc:  # a probe that blew up must not take the socket down with it
        logger.warning("Could not read the model server's status", exc_info=True)
        return ServerStatus(mode=config.mode, state=ServerState.FAILED, model=config.model, last_error=str(exc))


class ServerStatusConsumer(LiveConsumer):
    detailed: bool = False

    async def authorize(self, user) -> list[str]:
        self.detailed = await acan_manage_server(user)
        return [events.SERVER_STATUS_DETAILED_GROUP if self.detailed else events.SERVER_STATUS_GROUP]

    async def snapshot(self) -> events.ServerSnapshotEvent:
        return events.snapshot_event(await current_status(), detailed=self.detailed)
