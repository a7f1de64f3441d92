"""The durable queue runner: claims queued scans and sends their unfinished pages to the engine.

One `Runner` per process (the ASGI server's embedded runner, `manage.py ocr_worker`, or the `ocr`
command). The database is the queue: claims are atomic conditional updates, each page's result is
committed in its own transaction as it arrives, and a heartbeat on the scan lets another process
take over a scan whose worker died. A process never has more than `max_in_flight` requests out,
shared fairly (FIFO) between the scans it is processing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from asgiref.sync import sync_to_async

from ocrsite.env import env_int
from scans import progress, services
from scans.models import Page, Scan
from scans.pipeline import queue_signals
from scans.pipeline.engines import build_engine
from scans.pipeline.errors import PermanentEngineError
from scans.pipeline.options import OCRConfig, ScanOptions, aocr_config
from scans.pipeline.page_ocr import ocr_page_with_retries
from scans.pipeline.render import pdf_page_text, render_page_sync, render_pages
from scans.pipeline.types import Engine, PageImage, PageResult, RenderFailure
from vllm_control import runtime
from vllm_control.config import EffectiveConfig, aresolve_config
from vllm_control.errors import ModelServerUnavailable

logger = logging.getLogger(__name__)

RENDER_LOOKAHEAD = 4

PageCallback = Callable[[Page], Awaitable[None]]


def _env_seconds(name: str, default_ms: int) -> float:
    return (env_int(name, default_ms, minimum=10) or default_ms) / 1000


def poll_interval() -> float:
    """How often an idle runner looks for queued scans and a busy one refreshes its heartbeats
    (which is also how it notices, across processes, that a scan was cancelled)."""
    return _env_seconds("OCRSITE_RUNNER_POLL_MS", 1000)


def stale_after() -> timedelta:
    """A processing scan whose heartbeat is older than this is taken over by another runner."""
    return timedelta(seconds=_env_seconds("OCRSITE_CLAIM_STALE_MS", 30_000))


def new_worker_id() -> str:
    return f"{socket.gethostname()[:50]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


@dataclass
class _ActiveScan:
    scan_id: int
    unfinished: int  # pages not yet finished (claimed demand on the in-flight budget)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None


def _raise_if_cancelling() -> None:
    """asgiref's sync_to_async (and so Django's async ORM) swallows a cancellation that arrives while
    the sync function is already running: the awaiting task carries on as if nothing happened. Call
    this after such awaits, before anything slow (a request to the model server), to honour it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _db(function, /, **kwargs):
    """A DB write from async code, off the event loop; a cancellation during it is re-raised after it."""
    result = await sync_to_async(function)(**kwargs)
    _raise_if_cancelling()
    return result


class _ScanFailed(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Runner:
    def __init__(
        self,
        *,
        max_in_flight: int | None = None,
        worker_id: str | None = None,
        once: bool = False,
        on_page: PageCallback | None = None,
        secrets: dict[int, str] | None = None,
    ) -> None:
        self.worker_id = worker_id or new_worker_id()
        self.once = once
        self.on_page = on_page
        # API keys given for this run only (never stored), by scan id.
        self.secrets = dict(secrets or {})
        self._max_in_flight = max_in_flight
        self._budget: asyncio.Semaphore | None = None
        self._capacity = 0
        self._active: dict[int, _ActiveScan] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._last_failure_report = 0.0

    # --- thread-safe signals ----------------------------------------------------------------

    def wake(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake.set)

    def cancel_scan_locally(self, scan_id: int) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._cancel_active, scan_id)

    def _cancel_active(self, scan_id: int) -> None:
        active = self._active.get(scan_id)
        if active is not None:
            active.cancelled.set()

    # --- lifecycle --------------------------------------------------------------------------

    async def _setup(self) -> None:
        self._loop = asyncio.get_running_loop()
        queue_signals.register(self)
        if self._budget is None:
            if self._max_in_flight is None:
                self._max_in_flight = (await aocr_config()).max_in_flight
            self._capacity = max(1, self._max_in_flight)
            self._budget = asyncio.Semaphore(self._capacity)

    def _teardown(self) -> None:
        queue_signals.unregister(self)

    async def run_forever(self) -> None:
        """Claim and process queued scans until `stop()` (or, with `once`, until the queue is empty)."""
        await self._setup()
        try:
            recovered_at = 0.0
            while not self._stopping:
                if time.monotonic() - recovered_at >= poll_interval():  # not on every wake-up
                    await _db(services.recover_stale_claims, stale_after=stale_after())
                    recovered_at = time.monotonic()
                await self._claim_while_capacity()
                if self.once and not self._active:
                    return
                self._wake.clear()
                await self._wait_for_work()
        finally:
            await self._cancel_all()
            self._teardown()

    async def _wait_for_work(self) -> None:
        waiters = [asyncio.ensure_future(self._wake.wait())]
        waiters += [a.task for a in self._active.values() if a.task is not None]
        await asyncio.wait(waiters, timeout=poll_interval(), return_when=asyncio.FIRST_COMPLETED)
        waiters[0].cancel()

    async def _claim_while_capacity(self) -> None:
        # Claim another scan only when the scans at hand cannot keep the budget busy: fair to other
        # workers (they get the rest of the queue) and keeps this process's pipeline full.
        while not self._stopping and sum(a.unfinished for a in self._active.values()) < self._capacity:
            claim = await sync_to_async(services.claim_next_scan)(worker_id=self.worker_id)
            if claim is None:
                return
            self._start(claim)  # registered first, so a cancellation below still releases it
            _raise_if_cancelling()

    def _start(self, claim: services.Claim) -> _ActiveScan:
        active = _ActiveScan(claim.scan_id, claim.unfinished)
        self._active[claim.scan_id] = active
        active.task = asyncio.create_task(self._run_claimed(active), name=f"scan-{claim.scan_id}")
        return active

    async def stop(self) -> None:
        """Stop claiming; cancel in-flight requests; give unfinished scans back to the queue."""
        self._stopping = True
        self.wake()
        await self._cancel_all()

    async def _cancel_all(self) -> None:
        tasks = [a.task for a in self._active.values() if a.task is not None and not a.task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def run_scan(self, scan_id: int) -> str | None:
        """Claim one queued scan and process it to the end; returns its final status (None when
        another runner holds it)."""
        await self._setup()
        try:
            claim = await sync_to_async(services.claim_scan)(scan_id=scan_id, worker_id=self.worker_id)
            if claim is None:
                return None
            active = self._start(claim)
            assert active.task is not None
            try:
                _raise_if_cancelling()
                await asyncio.shield(active.task)
            except asyncio.CancelledError:
                active.task.cancel()
                await asyncio.gather(active.task, return_exceptions=True)
                raise
            return await Scan.objects.filter(pk=scan_id).values_list("status", flat=True).afirst()
        finally:
            if not self._active:
                self._teardown()

    def _report_failure(self, config: EffectiveConfig) -> None:
        """A page failed: let the model server's status check its health now (at most every 10 s)."""
        now = time.monotonic()
        if now - self._last_failure_report < 10:
            return
        self._last_failure_report = now
        task = asyncio.create_task(_report_failure(config))
        _background.add(task)
        task.add_done_callback(_background.discard)

    # --- one scan ---------------------------------------------------------------------------

    async def _run_claimed(self, active: _ActiveScan) -> None:
        scan_id = active.scan_id
        heartbeat = asyncio.create_task(self._heartbeat(active), name=f"heartbeat-{scan_id}")
        work = asyncio.create_task(self._process(active), name=f"pages-{scan_id}")
        cancel_wait = asyncio.create_task(active.cancelled.wait())
        requeue = True
        try:
            done, _ = await asyncio.wait({work, cancel_wait}, return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                requeue = False
                await self._finish(active, work)
            else:
                # Cancelled (or the claim was lost): stop in-flight requests now.
                requeue = False
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
        except asyncio.CancelledError:
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            raise
        finally:
            heartbeat.cancel()
            cancel_wait.cancel()
            await asyncio.gather(heartbeat, cancel_wait, return_exceptions=True)
            self._active.pop(scan_id, None)
            await asyncio.shield(
                sync_to_async(services.release_scan)(scan_id=scan_id, worker_id=self.worker_id, requeue=requeue)
            )
            await progress.apublish_scan(scan_id)
            self.wake()

    async def _finish(self, active: _ActiveScan, work: asyncio.Task) -> None:
        error = ""
        exc = work.exception()
        if isinstance(exc, _ScanFailed):
            error = exc.message
        elif exc is not None:
            logger.error("Scan %s failed", active.scan_id, exc_info=exc)
            error = f"Internal error while processing: {exc}"
        await sync_to_async(services.finish_scan)(
            scan_id=active.scan_id, worker_id=self.worker_id, error=error, failed=bool(error)
        )

    async def _heartbeat(self, active: _ActiveScan) -> None:
        while True:
            await asyncio.sleep(poll_interval())
            try:
                ours = await _db(services.heartbeat, scan_id=active.scan_id, worker_id=self.worker_id)
            except asyncio.CancelledError:
                raise
            except Exception:  # e.g. the database was busy for too long: try again next time
                logger.warning("Could not refresh the claim on scan %s", active.scan_id, exc_info=True)
                continue
            if not ours:
                logger.info("Scan %s is no longer ours (cancelled, deleted or reclaimed)", active.scan_id)
                active.cancelled.set()
                return

    async def _process(self, active: _ActiveScan) -> None:
        scan = await Scan.objects.aget(pk=active.scan_id)
        options = ScanOptions.from_scan(scan.options or {})
        api_key = self.secrets.get(scan.pk) or options.api_key
        config = await aresolve_config()
        ocr = options.apply(await aocr_config())
        concurrency = min(options.concurrency or self._capacity, self._capacity)
        engine_name = options.engine or ("builtin" if config.mode == "builtin" else "vllm")
        if engine_name == "vllm" and not options.base_url:
            try:
                await runtime.ensure_ready(config)
            except ModelServerUnavailable as exc:
                raise _ScanFailed(exc.message) from None
        try:
            engine = build_engine(
                config,
                ocr,
                engine=options.engine,
                base_url=options.base_url,
                model=options.model,
                api_key=api_key,
                max_in_flight=concurrency,
            )
        except PermanentEngineError as exc:
            raise _ScanFailed(exc.message) from None
        try:
            await _db(services.set_scan_engine, scan_id=scan.pk, engine=engine.name, model=engine.model)
            numbers = [
                n
                async for n in Page.objects.filter(scan_id=scan.pk, status__in=services.UNFINISHED_PAGES)
                .order_by("number")
                .values_list("number", flat=True)
            ]
            active.unfinished = len(numbers)
            _raise_if_cancelling()
            await self._send_pages(active, _ScanWork(scan, config, ocr, engine, report_failures=not options.base_url), numbers, concurrency)
        finally:
            await engine.aclose()

    async def _send_pages(self, active: _ActiveScan, work: _ScanWork, numbers: list[int], concurrency: int) -> None:
        """Send every page, at most `concurrency` at once within the runner's budget. A page that cannot
        be rendered or read fails alone; an error that concerns every request (PermanentEngineError)
        stops sending, lets the requests in flight finish (their answers are kept), then fails the scan."""
        assert self._budget is not None
        per_scan = asyncio.Semaphore(concurrency)
        tasks: set[asyncio.Task] = set()
        failure: list[PermanentEngineError] = []

        def done(task: asyncio.Task) -> None:
            tasks.discard(task)
            if not task.cancelled() and isinstance(task.exception(), PermanentEngineError):
                failure.append(task.exception())  # type: ignore[arg-type]

        pages = render_pages(
            Path(work.scan.file.path),
            work.scan.content_type,
            numbers,
            longest_side=work.ocr.target_longest_side,
            image_format=work.ocr.image_format,
            lookahead=RENDER_LOOKAHEAD,
        )
        try:
            async with contextlib.aclosing(pages):
                async for image in pages:
                    await per_scan.acquire()
                    await _acquire_or_release(self._budget, per_scan)
                    # A page that just failed for good released its slot (waking us) before its done-callback
                    # could report it; let that callback run first, or one more page would be sent.
                    await asyncio.sleep(0)
                    if failure:
                        per_scan.release()
                        self._budget.release()
                        break
                    task = asyncio.create_task(self._page(active, work, image, per_scan))
                    tasks.add(task)
                    task.add_done_callback(done)
            while tasks:
                await asyncio.wait(set(tasks))
        finally:
            for task in list(tasks):
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        for task_failure in failure[:1]:
            raise _ScanFailed(task_failure.message)

    async def _page(self, active: _ActiveScan, work: _ScanWork, image: PageImage | RenderFailure, per_scan) -> None:
        assert self._budget is not None
        scan, number = work.scan, image.number
        try:
            page = await _db(
                services.mark_page_running, scan_id=scan.pk, number=number, worker_id=self.worker_id, attempts=1
            )
            if page is None:
                return  # not ours (any more)
            await progress.apublish_page(page)
            if isinstance(image, RenderFailure):
                result = PageResult(text="", status="failed", error=image.message, latency_ms=None)
            else:
                result = await self._read(work, image)
            commit = await asyncio.shield(
                sync_to_async(services.commit_page_result)(
                    scan_id=scan.pk, number=number, worker_id=self.worker_id, result=result
                )
            )
            active.unfinished = max(0, active.unfinished - 1)
            if commit.page is not None:
                await progress.apublish_page(commit.page)
                if self.on_page is not None:
                    await self.on_page(commit.page)
            if commit.scan_status != Scan.Status.PROCESSING:
                active.cancelled.set()
            if result.status == Page.Status.FAILED and work.engine.name == "vllm" and work.report_failures:
                self._report_failure(work.config)
        finally:
            per_scan.release()
            self._budget.release()
            self.wake()

    async def _read(self, work: _ScanWork, image: PageImage) -> PageResult:
        """One page through the engine with retries; raises only PermanentEngineError and cancellation."""
        scan, number = work.scan, image.number
        path = Path(scan.file.path)

        async def rerender(rotation: int) -> PageImage:
            return await asyncio.to_thread(
                render_page_sync,
                path,
                scan.content_type,
                number,
                longest_side=work.ocr.target_longest_side,
                image_format=work.ocr.image_format,
                rotation=rotation,
            )

        async def fallback_text() -> str:
            return await asyncio.to_thread(pdf_page_text, path, number)

        async def on_attempt(attempt: int) -> None:
            # Called right before each request: the last chance to honour a swallowed cancellation.
            if attempt > 1:  # the first attempt was recorded with the running mark
                await _db(services.record_attempt, scan_id=scan.pk, number=number, worker_id=self.worker_id, attempt=attempt)
            _raise_if_cancelling()

        try:
            return await ocr_page_with_retries(
                work.engine,
                image,
                work.ocr,
                rerender=rerender,
                fallback_text=fallback_text if scan.has_text_layer else None,
                on_attempt=on_attempt,
            )
        except PermanentEngineError:
            raise
        except Exception as exc:  # e.g. a page that cannot be re-rendered: that page fails, not the scan
            logger.exception("Page %s of scan %s failed unexpectedly", number, scan.pk)
            return PageResult(text="", status="failed", error=f"{type(exc).__name__}: {exc}", latency_ms=None)


@dataclass(frozen=True)
class _ScanWork:
    """What every page of one scan is read with."""

    scan: Scan
    config: EffectiveConfig
    ocr: OCRConfig
    engine: Engine
    report_failures: bool  # failed pages make the configured model server check its health


_background: set[asyncio.Task] = set()


async def _report_failure(config: EffectiveConfig) -> None:
    try:
        await runtime.report_request_failure(config)
    except Exception:
        logger.warning("Could not check the model server after a failed page", exc_info=True)


async def _acquire_or_release(budget: asyncio.Semaphore, held: asyncio.Semaphore) -> None:
    try:
        await budget.acquire()
    except BaseException:
        held.release()
        raise


# --- the embedded runner (ASGI lifespan) -------------------------------------------------------

_embedded: Runner | None = None
_embedded_task: asyncio.Task | None = None


async def start_embedded_runner() -> None:
    global _embedded, _embedded_task
    if _embedded_task is not None and not _embedded_task.done():
        return
    _embedded = Runner()
    _embedded_task = asyncio.create_task(_run_logged(_embedded), name="ocr-runner")


async def _run_logged(runner: Runner) -> None:
    while True:
        try:
            await runner.run_forever()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            if runner._stopping:
                return
            logger.exception("The OCR runner crashed; restarting it in a few seconds")
            await asyncio.sleep(max(poll_interval(), 3))


async def stop_embedded_runner() -> None:
    global _embedded, _embedded_task
    runner, task = _embedded, _embedded_task
    _embedded, _embedded_task = None, None
    if runner is None or task is None:
        return
    await runner.stop()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
