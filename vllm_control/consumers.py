"""WebSocket for the model server's status (`ws/server/`): a snapshot on connect, then every change.

Staff receive the server's recent log lines; everyone else the same status without them.
"""

from __future__ import annotations

import logging
import time

from channels.generic.websocket import AsyncJsonWebsocketConsumer

from vllm_control import events, runtime
from vllm_control.config import aresolve_config
from vllm_control.status import ServerState, ServerStatus

logger = logging.getLogger(__name__)

CLOSE_UNAUTHENTICATED = 4401


async def current_status() -> ServerStatus:
    config = await aresolve_config()
    try:
        return await runtime.current_status(config)
    except Exception as exc:  # a probe that blew up must not take the socket down with it
        logger.warning("Could not read the model server's status", exc_info=True)
        return ServerStatus(mode=config.mode, state=ServerState.FAILED, model=config.model, last_error=str(exc))


class ServerStatusConsumer(AsyncJsonWebsocketConsumer):
    staff: bool = False
    group: str = ""
    snapshot_started: float = 0.0

    async def connect(self) -> None:
        user = self.scope.get("user")
        await self.accept()  # then close with a code the browser can read (see scans.consumers)
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.staff = bool(user.is_staff)
        self.group = events.SERVER_STATUS_STAFF_GROUP if self.staff else events.SERVER_STATUS_GROUP
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.send_snapshot()

    async def disconnect(self, code: int) -> None:
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content, **kwargs) -> None:
        if isinstance(content, dict) and content.get("type") == "resync":
            await self.send_snapshot()

    async def send_snapshot(self) -> None:
        self.snapshot_started = time.time()
        status = await current_status()
        await self.send_json(events.snapshot_event(status, staff=self.staff))

    async def live_event(self, message: dict) -> None:
        await self.send_json(message["payload"])
