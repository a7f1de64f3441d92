"""WebSocket for the model server's status (`ws/server/`): a snapshot on connect, then every change.

Staff receive the server's recent log lines; everyone else the same status without them.
"""

from __future__ import annotations

import logging

from ocrsite.live import LiveConsumer
from vllm_control import events, runtime
from vllm_control.config import aresolve_config
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
    staff: bool = False

    async def authorize(self, user) -> list[str]:
        self.staff = bool(user.is_staff)
        return [events.SERVER_STATUS_STAFF_GROUP if self.staff else events.SERVER_STATUS_GROUP]

    async def snapshot(self) -> events.ServerSnapshotEvent:
        return events.snapshot_event(await current_status(), staff=self.staff)
