"""What the API does when scans tell it something (connected in ApiConfig.ready)."""

from __future__ import annotations

from api import delivery, webhooks


def on_scan_finished(sender, *, scan_id: int, status: str, **kwargs) -> None:
    """Record the scan.finished deliveries, then start sending them (in the background)."""
    delivery.dispatch(webhooks.enqueue_scan_finished(scan_id=scan_id))
