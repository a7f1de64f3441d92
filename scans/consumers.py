"""WebSockets for scan progress: one scan (`ws/scans/<id>/`) and the scan list (`ws/scans/`).

Every connection starts with a full snapshot from the database (channel layers deliver at most once,
so a reconnecting browser re-syncs from it); then it forwards the events `scans.progress` publishes.
"""

from __future__ import annotations

import logging
import time

from asgiref.sync import sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from scans import progress
from scans.access import visible_scans

logger = logging.getLogger(__name__)

CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403


class LiveConsumer(AsyncJsonWebsocketConsumer):
    """Joins groups, sends a snapshot, forwards `live.event` messages newer than that snapshot."""

    groups_joined: list[str]
    snapshot_started: float = 0.0

    async def connect(self) -> None:
        self.groups_joined = []
        user = self.scope.get("user")
        # Accept, then close with a code: a refused handshake reaches the browser as a bare 1006,
        # and live.js needs the code to know that reconnecting will not help.
        await self.accept()
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        groups = await self.authorize(user)
        if groups is None:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        for group in groups:
            await self.channel_layer.group_add(group, self.channel_name)
            self.groups_joined.append(group)
        await self.send_snapshot()

    async def disconnect(self, code: int) -> None:
        for group in getattr(self, "groups_joined", []):
            await self.channel_layer.group_discard(group, self.channel_name)

    async def receive_json(self, content, **kwargs) -> None:
        if isinstance(content, dict) and content.get("type") == "resync":
            await self.send_snapshot()

    async def send_snapshot(self) -> None:
        self.snapshot_started = time.time()
        snapshot = await self.snapshot()
        if snapshot:  # empty when the subject vanished and the socket was closed
            await self.send_json(snapshot)

    async def live_event(self, message: dict) -> None:
        # An event whose data was read before this connection's snapshot is already in the snapshot
        # (or superseded by it); forwarding it would show an older state.
        if message.get("read_at", float("inf")) < self.snapshot_started:
            return
        await self.forward(message["payload"])

    async def forward(self, payload: dict) -> None:
        await self.send_json(payload)

    async def authorize(self, user) -> list[str] | None:
        raise NotImplementedError

    async def snapshot(self) -> dict:
        raise NotImplementedError


class ScanConsumer(LiveConsumer):
    """One scan's pages and totals; only its owner and staff may watch."""

    scan_id: int
    last_status: str = ""

    async def authorize(self, user) -> list[str] | None:
        self.scan_id = int(self.scope["url_route"]["kwargs"]["scan_id"])
        self.user = user
        if not await visible_scans(user).filter(pk=self.scan_id).aexists():
            return None
        return [progress.scan_group(self.scan_id)]

    async def snapshot(self) -> dict:
        scan = await visible_scans(self.user).filter(pk=self.scan_id).afirst()
        if scan is None:  # deleted (or no longer visible) since connecting
            await self.close(code=CLOSE_FORBIDDEN)
            return {}
        snapshot = await sync_to_async(progress.build_scan_snapshot)(scan)
        self.last_status = snapshot["scan"]["status"]
        return snapshot

    async def forward(self, payload: dict) -> None:
        if payload.get("type") == "scan.progress" and payload["totals"]["status"] != self.last_status:
            # A status change (retry, cancel, finish) may have touched many pages at once: re-sync.
            await self.send_snapshot()
            return
        await self.send_json(payload)


class ScanListConsumer(LiveConsumer):
    """The scan list: the user's scans (staff: everyone's), then one item per change."""

    async def authorize(self, user) -> list[str] | None:
        self.user = user
        return [progress.ALL_SCANS_GROUP] if user.is_staff else [progress.user_scans_group(user.pk)]

    async def snapshot(self) -> dict:
        return await sync_to_async(progress.build_list_snapshot)(self.user)
