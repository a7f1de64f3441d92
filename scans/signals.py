"""Signals other apps may listen to without scans importing them.

`scan_finished(sender=Scan, scan_id: int, status: str)`: a scan reached a final status (`done`,
`done_with_errors`, `failed` or `cancelled`). Sent once the transaction that wrote the status has
committed, in the process and thread that wrote it; receivers should return quickly. A receiver that
raises is logged and does not affect the write or the other receivers.
"""

from __future__ import annotations

import logging

from django.db import transaction
from django.dispatch import Signal

from scans.models import Scan

logger = logging.getLogger(__name__)

scan_finished = Signal()


def send_scan_finished_on_commit(*, scan_id: int, status: str) -> None:
    def send() -> None:
        for receiver, result in scan_finished.send_robust(sender=Scan, scan_id=scan_id, status=status):
            if isinstance(result, Exception):
                logger.error("A scan_finished receiver (%s) failed for scan %s", receiver, scan_id, exc_info=result)

    transaction.on_commit(send)
