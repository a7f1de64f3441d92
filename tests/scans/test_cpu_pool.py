"""CPU work is bounded by the cores and cancellable: the process-wide pool, and a real engine in it.

Every test holds the work it starts on threading events and releases it itself, so nothing depends on
how fast the machine is; timeouts are only a safety net.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref

import pytest

from scans.pipeline import tesseract_engine
from scans.pipeline.cpu import CPUPool, cpu_pool, usable_cores
from scans.pipeline.tesseract_engine import TesseractEngine
from tests.scans.ocr_corpus import text_line_page

pytestmark = pytest.mark.timeout(120)
SAFETY_S = 60


class Gate:
    """A job that waits for `release` in its worker thread; the test's loop hears when it starts/ends."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.release = threading.Event()
        self.started: list[object] = []
        self.finished: list[object] = []
        self._changed = asyncio.Event()

    def _signal(self) -> None:
        self.loop.call_soon_threadsafe(self._changed.set)

    def enter(self, tag: object) -> None:  # in the worker thread
        self.started.append(tag)
        self._signal()
        assert self.release.wait(SAFETY_S), "the test never released the gate"

    def leave(self, tag: object) -> None:  # in the worker thread
        self.finished.append(tag)
        self._signal()

    def job(self, tag: object) -> object:
        self.enter(tag)
        self.leave(tag)
        return tag

    async def until(self, condition) -> None:
        async with asyncio.timeout(SAFETY_S):
            while not condition():
                self._changed.clear()
                if condition():
                    return
                await self._changed.wait()


def wait_in_thread(condition) -> None:
    """Block the caller (the event loop, on purpose) until a pool's state changes in a worker thread."""
    deadline = time.monotonic() + SAFETY_S
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_the_process_pool_has_one_slot_per_usable_core():
    assert cpu_pool().size == usable_cores() == len(__import__("os").sched_getaffinity(0))
    assert cpu_pool() is cpu_pool()


async def test_no_more_jobs_run_than_slots_and_the_rest_start_in_order():
    pool = CPUPool(2)
    gate = Gate(asyncio.get_running_loop())
    tasks = [asyncio.create_task(pool.run(gate.job, n)) for n in range(6)]
    await gate.until(lambda: len(gate.started) == 2)
    assert (pool.running, pool.waiting) == (2, 4)
    gate.release.set()
    assert await asyncio.gather(*tasks) == list(range(6))
    # Two slots run two jobs at once, so the later ones may record their start in either order.
    assert sorted(gate.started[:2]) == [0, 1] and sorted(gate.started[2:]) == [2, 3, 4, 5]
    assert (pool.running, pool.waiting, pool.started) == (0, 0, 6)

    # With one slot, the waiting jobs start exactly in the order they came.
    single = CPUPool(1)
    gate = Gate(asyncio.get_running_loop())
    tasks = [asyncio.create_task(single.run(gate.job, n)) for n in range(6)]
    await gate.until(lambda: len(gate.started) == 1)
    gate.release.set()
    assert await asyncio.gather(*tasks) == list(range(6))
    assert gate.started == [0, 1, 2, 3, 4, 5]


async def test_a_failing_job_frees_its_slot():
    pool = CPUPool(1)

    def fail() -> None:
        raise ValueError("bad page")

    with pytest.raises(ValueError, match="bad page"):
        await pool.run(fail)
    assert await pool.run(lambda: "next") == "next"
    assert pool.running == 0


async def test_cancelled_waiter_never_runs_and_a_running_job_keeps_its_slot_until_it_ends():
    pool = CPUPool(1)
    gate = Gate(asyncio.get_running_loop())
    running = asyncio.create_task(pool.run(gate.job, "running"))
    await gate.until(lambda: gate.started == ["running"])
    queued = asyncio.create_task(pool.run(gate.job, "queued"))
    behind = asyncio.create_task(pool.run(gate.job, "behind"))
    await asyncio.sleep(0)  # let both reach the queue
    assert pool.waiting == 2
    queued.cancel()
    running.cancel()
    done, _ = await asyncio.wait({queued, running}, timeout=SAFETY_S)
    assert done == {queued, running} and queued.cancelled() and running.cancelled()
    # The queued job left the queue at once; the running one still holds the only core.
    assert (pool.running, pool.waiting) == (1, 1)
    gate.release.set()
    assert await behind == "behind"
    assert gate.started == ["running", "behind"] and gate.finished == ["running", "behind"]


async def test_a_core_handed_to_a_waiter_that_gives_up_at_that_moment_goes_to_the_next():
    pool = CPUPool(1)
    gate = Gate(asyncio.get_running_loop())
    first = asyncio.create_task(pool.run(gate.job, "first"))
    await gate.until(lambda: gate.started == ["first"])
    second = asyncio.create_task(pool.run(gate.job, "second"))
    third = asyncio.create_task(pool.run(gate.job, "third"))
    await asyncio.sleep(0)
    assert pool.waiting == 2
    gate.release.set()
    # The first job ends in its thread and hands the core to "second" (waking it through this loop,
    # which is blocked here); "second" is cancelled before it can take it.
    wait_in_thread(lambda: pool.waiting == 1)
    second.cancel()
    assert await first == "first"
    assert await third == "third"
    with pytest.raises(asyncio.CancelledError):
        await second
    assert gate.started == ["first", "third"]
    assert (pool.running, pool.waiting) == (0, 0)


async def test_a_waiter_of_another_event_loop_is_woken_through_its_own_loop():
    pool = CPUPool(1)
    gate = Gate(asyncio.get_running_loop())
    holder = asyncio.create_task(pool.run(gate.job, "holder"))
    await gate.until(lambda: gate.started == ["holder"])
    other_loop_result: list[str] = []
    thread = threading.Thread(target=lambda: other_loop_result.append(asyncio.run(pool.run(lambda: "other loop"))))
    thread.start()
    await asyncio.to_thread(wait_in_thread, lambda: pool.waiting == 1)
    gate.release.set()
    await holder
    await asyncio.to_thread(thread.join, SAFETY_S)
    assert other_loop_result == ["other loop"]


async def test_cancelling_many_submitted_pages_stops_at_the_pages_already_running(monkeypatch):
    """A real engine and real OCR: 3 pages per core submitted, the first ones held inside the engine's
    page function; cancelling every page leaves only those running, and they finish their page."""
    engine = TesseractEngine()
    pool = cpu_pool()
    cores = pool.size
    gate = Gate(asyncio.get_running_loop())
    real_read_page = tesseract_engine.read_page

    def held_read_page(data: bytes, tessdata: str, language: str):
        gate.enter(data)
        try:
            return real_read_page(data, tessdata, language)
        finally:
            gate.leave(data)

    monkeypatch.setattr(tesseract_engine, "read_page", held_read_page)
    started_before = pool.started
    count = 3 * cores
    pages = [text_line_page(f"Page {n}", n) for n in range(count)]
    alive = [weakref.ref(page) for page in pages]
    tasks = [asyncio.create_task(engine.ocr_page(page, None)) for page in pages]
    del pages
    try:
        await gate.until(lambda: len(gate.started) == cores)
        assert (pool.running, pool.waiting) == (cores, count - cores)
        for task in tasks:
            task.cancel()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), SAFETY_S)
        assert all(isinstance(result, asyncio.CancelledError) for result in results)
        # Queued pages were dropped at once; the running ones still hold a core each, and only their
        # images are still held (by their jobs).
        assert (pool.running, pool.waiting) == (cores, 0)
        del tasks, results
        gc.collect()
        assert sum(ref() is not None for ref in alive) <= cores
        assert len(gate.started) == cores and not gate.finished
    finally:
        gate.release.set()  # never leave a worker thread held

    await gate.until(lambda: len(gate.finished) == cores)
    await asyncio.to_thread(wait_in_thread, lambda: pool.running == 0)
    assert len(gate.started) == cores
    assert pool.started - started_before == cores
    # The pool is whole again: the next page is read.
    monkeypatch.setattr(tesseract_engine, "read_page", real_read_page)
    assert (await engine.ocr_page(text_line_page("Page 99", 99), None)).text == "Page 99"
