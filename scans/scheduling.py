"""Which scans get the next free slots: weighted fair sharing, first between users, then between a
user's scans.

Every slot goes to the user whose pages in flight are fewest relative to their weight, then to that
user's scan whose pages in flight are fewest relative to its weight (ties: the older scan). A scan's
weight is 4**priority (`Scan.Priority`); a user's is the weight of their heaviest waiting scan. So a
1-page scan queued behind a 2,000-page scan of another user gets the next free slot, a high-priority
scan gets four slots for every one of a normal scan, and no waiting scan is ever starved: every slot
given to the others raises their share. The counts are global (every runner's pages, read from the
database), so several runners together keep the same rules.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

PRIORITY_BASE = 4


@dataclass(frozen=True)
class Candidate:
    """A scan with pages waiting to be sent."""

    scan_id: int
    owner_id: int
    priority: int
    created_at: datetime
    pending: int  # pages waiting
    running: int  # pages in flight, on any runner
    cap: int | None = None  # most pages of this scan in flight at once (its `concurrency` option)
    queued: bool = False  # not started yet (its first claim starts it)


def weight(priority: int) -> float:
    return float(PRIORITY_BASE**priority)


def allocate(slots: int, candidates: Iterable[Candidate], running_by_owner: dict[int, int]) -> dict[int, int]:
    """How many of `slots` free slots each scan gets: {scan_id: pages to claim}.

    `running_by_owner` counts every page in flight per user, including scans with nothing waiting."""
    scans = {c.scan_id: c for c in candidates if c.pending > 0}
    running = {c.scan_id: c.running for c in scans.values()}
    owners = dict(running_by_owner)
    granted: dict[int, int] = {}
    for _ in range(slots):
        open_scans = [
            c for c in scans.values()
            if granted.get(c.scan_id, 0) < c.pending and (c.cap is None or running[c.scan_id] < c.cap)
        ]
        if not open_scans:
            break
        owner_weight: dict[int, float] = {}
        for c in open_scans:
            owner_weight[c.owner_id] = max(owner_weight.get(c.owner_id, 0.0), weight(c.priority))
        owner = min(owner_weight, key=lambda o: (owners.get(o, 0) / owner_weight[o], o))
        scan = min(
            (c for c in open_scans if c.owner_id == owner),
            key=lambda c: (running[c.scan_id] / weight(c.priority), c.created_at, c.scan_id),
        )
        granted[scan.scan_id] = granted.get(scan.scan_id, 0) + 1
        running[scan.scan_id] += 1
        owners[owner] = owners.get(owner, 0) + 1
    return granted
