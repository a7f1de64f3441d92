"""CPU-bound OCR work: at most one page per usable core in the whole process, dropped while it waits.

Every CPU engine (Tesseract, RapidOCR) runs its pages through the one process-wide `CPUPool`, so two
scans, two engines or a caller that submits a thousand pages at once still keep at most `usable_cores()`
pages being recognized. A page waits in a first-come queue for a free core; what waits is only the
caller's coroutine (with the page image it already holds), never a job queued in a thread pool, so:

- a cancelled `run()` whose work has not started is removed from the queue at once and never starts;
- work already running cannot be interrupted inside native code (it has no safe stop); it stops at its
  next `checkpoint()` (the engines call one between their stages, e.g. between recognition batches),
  raising JobCancelled there, and its core is handed to the next waiter only then; the cancelled caller
  returns at once;
- memory is bounded by the running pages (one decoded image each) plus what callers hold themselves.

Runners hold at most `claim_limit()` pages of CPU-engine scans at once (the cores plus LOOKAHEAD), so
pages wait in the database, not as rendered images in this queue.

The queue works across event loops and threads (the runner, `manage.py ocr` and tests each have their
own loop): a freed core wakes the next waiter through its own loop.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

# Pages rendered ahead and waiting for a core, so a core that frees up never waits for a rendering
# (rendering a page takes tens of milliseconds; reading it, about a second).
LOOKAHEAD = 2


class JobCancelled(Exception):
    """Raised inside a job at a `checkpoint()` once its caller has given up on it."""


_job = threading.local()


def checkpoint() -> None:
    """Call between the stages of a long job: raises JobCancelled when the caller of `CPUPool.run` was
    cancelled (the rest of the work would be thrown away). Does nothing outside a pool's job."""
    cancelled: threading.Event | None = getattr(_job, "cancelled", None)
    if cancelled is not None and cancelled.is_set():
        raise JobCancelled


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and `taskset` set)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass(eq=False)
class _Waiter:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]
    granted: bool = field(default=False)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class CPUPool:
    """`size` worker threads and as many slots; `await pool.run(fn, *args)` runs `fn(*args)` on one."""

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self._lock = threading.Lock()
        self._free = self.size
        self._waiting: deque[_Waiter] = deque()
        self._started = 0
        self._executor = ThreadPoolExecutor(self.size, thread_name_prefix="cpu-ocr")

    @property
    def running(self) -> int:
        """Jobs holding a core now (running, or handed to a worker thread and about to)."""
        with self._lock:
            return self.size - self._free

    @property
    def waiting(self) -> int:
        """Callers queued for a core."""
        with self._lock:
            return len(self._waiting)

    @property
    def started(self) -> int:
        """Jobs that have started running since the pool was made."""
        with self._lock:
            return self._started

    async def run(self, fn: Callable[..., T], /, *args: Any) -> T:
        """Wait for a free core, then run `fn(*args)` in a worker thread and return its result.

        Cancelled while waiting: leaves the queue, `fn` never runs. Cancelled while running: raises
        CancelledError at once; `fn` goes on in its thread until it ends or reaches a `checkpoint()`,
        and only then frees its core."""
        await self._acquire()
        cancelled = threading.Event()
        try:
            job = self._executor.submit(self._call, fn, args, cancelled)
        except BaseException:
            self._release()
            raise
        job.add_done_callback(self._job_done)
        try:
            return await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...], cancelled: threading.Event) -> T:
        with self._lock:
            self._started += 1
        _job.cancelled = cancelled
        try:
            return fn(*args)
        finally:
            _job.cancelled = None

    def _job_done(self, job: Future[Any]) -> None:
        self._release()

    async def _acquire(self) -> None:
        with self._lock:
            if self._free and not self._waiting:
                self._free -= 1
                return
            loop = asyncio.get_running_loop()
            waiter = _Waiter(loop, loop.create_future())
            self._waiting.append(waiter)
        try:
            await waiter.future
        except asyncio.CancelledError:
            with self._lock:
                granted = waiter.granted
                if not granted:
                    self._waiting.remove(waiter)
            if granted:  # a core was handed over just as the caller gave up: pass it on
                self._release()
            raise

    def _release(self) -> None:
        with self._lock:
            while self._waiting:
                waiter = self._waiting.popleft()
                try:
                    waiter.loop.call_soon_threadsafe(_wake, waiter.future)
                except RuntimeError:  # its event loop is closed: nobody is waiting there any more
                    continue
                waiter.granted = True
                return
            self._free += 1


_pool: CPUPool | None = None
_pool_lock = threading.Lock()


def claim_limit() -> int:
    """How many pages of CPU-engine scans one runner holds at once: one per core of the process's pool
    plus LOOKAHEAD (scans.pipeline.runner)."""
    return cpu_pool().size + LOOKAHEAD


def cpu_pool() -> CPUPool:
    """The process's pool, one slot per usable core (made on first use)."""
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = CPUPool(usable_cores())
    return _pool
