"""The runners of this process and the two signals the rest of the app sends them.

Services (which change the queue) and the runner (which works it) both import this small module, so
neither imports the other. Runners in other processes learn the same things from the database on their
next poll or heartbeat.
"""

from __future__ import annotations

import threading
from typing import Protocol


class Listener(Protocol):
    def wake(self) -> None: ...

    def cancel_scan_locally(self, scan_id: int) -> None: ...


_listeners: set[Listener] = set()
_lock = threading.Lock()


def register(listener: Listener) -> None:
    with _lock:
        _listeners.add(listener)


def unregister(listener: Listener) -> None:
    with _lock:
        _listeners.discard(listener)


def _current() -> list[Listener]:
    with _lock:
        return list(_listeners)


def wake_runners() -> None:
    """Tell every runner in this process to look at the queue now (thread-safe)."""
    for listener in _current():
        listener.wake()


def notify_cancelled(scan_id: int) -> None:
    """Tell every runner in this process that a scan was cancelled (thread-safe)."""
    for listener in _current():
        listener.cancel_scan_locally(scan_id)
