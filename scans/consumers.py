"""WebSockets for scan progress: one scan (`ws/scans/<id>/`) and the scan list (`ws/scans/`).

Every connection starts with a full snapshot from the database, then forwards what `scans.progress`
publishes (see `ocrsite.live.LiveConsumer`). Their reads run on the live transport's read threads
(`ocrsite.live.read`), not behind the OCR runner's writes.
"""

from __future__ import annotations

from ocrsite import live
from ocrsite.live import CLOSE_FORBIDDEN, LiveConsumer
from scans import events, selectors
from scans.access import VIEW_ALL_SCANS, visible_scans


class ScanConsumer(LiveConsumer):
    """One scan's pages and totals; whoever may see the scan (`scans.access`) may watch."""

    scan_id: int
    last_status: str = ""

    async def authorize(self, user) -> list[str] | None:
        self.scan_id = int(self.scope["url_route"]["kwargs"]["scan_id"])
        if not await live.read(lambda: visible_scans(user).filter(pk=self.scan_id).exists()):
            return None
        return [events.scan_group(self.scan_id)]

    async def snapshot(self) -> events.ScanSnapshotEvent | dict:
        snapshot = await live.read(selectors.visible_scan_snapshot, self.user, self.scan_id)
        if snapshot is None:  # deleted (or no longer visible) since connecting
            await self.close(code=CLOSE_FORBIDDEN)
            return {}
        self.last_status = snapshot["scan"]["status"]
        return snapshot

    async def forward(self, payload: dict) -> None:
        if payload.get("type") == "scan.progress":
            status, previous = payload["totals"]["status"], self.last_status
            self.last_status = status
            if status not in (previous, "processing"):
                # A retry, cancel, requeue or finish may have changed many pages at once: re-sync. Work
                # starting changes no page (each one's own event follows), and a resync would hold this
                # socket's events behind a read just when every watcher of a busy queue asks for one.
                await self.send_snapshot()
                return
        await self.send_json(payload)


class ScanListConsumer(LiveConsumer):
    """The scan list: the user's scans (with `scans.view_all_scans`: everyone's), then one item per change."""

    async def authorize(self, user) -> list[str]:
        sees_all = await live.read(user.has_perm, VIEW_ALL_SCANS)
        return [events.ALL_SCANS_GROUP] if sees_all else [events.user_scans_group(user.pk)]

    async def snapshot(self) -> events.ScanListSnapshotEvent:
        return await live.read(selectors.list_snapshot, self.user)
