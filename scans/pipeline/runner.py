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
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

from asgiref.sync import sync_to_async

from ocrsite.env import env_int
from scans import services
from scans.models import Page, Scan
from scans.pipeline.errors import PermanentEngineError
from scans.pipeline.types import PageImage
from vllm_control.config import EffectiveConfig, aresolve_config, normalize_base_url
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
class ScanOptions:
    """Per-scan overrides from `Scan.options` (set by `manage.py ocr`); None means "the settings"."""

    prompt: str | None = None
    model: str | None = None
    base_url: str | None = None
    api_key: str | None = None
    concurrency: int | None = None
    engine: str | None = None

    @classmethod
    def from_scan(cls, options: dict) -> "ScanOptions":
        concurrency = options.get("concurrency")
        return cls(
            prompt=options.get("prompt") or None,
            model=options.get("model") or None,
            base_url=normalize_base_url(options.get("base_url") or "") or None,
            api_key=options.get("api_key") or None,
            concurrency=int(concurrency) if concurrency else None,
            engine=options.get("engine") or None,
        )


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


_runners: set["Runner"] = set()
_runners_lock = threading.Lock()


def wake_runner() -> None:
    """Tell every runner in this process to look at the queue now (thread-safe)."""
    with _runners_lock:
        runners = list(_runners)
    for runner in runners:
        runner.wake()


def notify_cancelled(scan_id: int) -> None:
    """Tell runners in this process that a scan was cancelled (thread-safe). Runners in other
    processes notice on their next heartbeat."""
    with _runners_lock:
        runners = list(_runners)
    for runner in runners:
        runner.cancel_scan_locally(scan_id)


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
        with _runners_lock:
            _runners.add(self)
        if self._budget is None:
            if self._max_in_flight is None:
                self._max_in_flight = (await aresolve_config()).ocr.max_in_flight
            self._capacity = max(1, self._max_in_flight)
            self._budget = asyncio.Semaphore(self._capacity)

    def _teardown(self) -> None:
        with _runners_lock:
            _runners.discard(self)

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
            scan = await Scan.objects.filter(pk=scan_id).afirst()
            if scan is not None:
                await _publish_scan(scan)
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
        from scans.pipeline.engines import build_engine

        scan = await Scan.objects.aget(pk=active.scan_id)
        options = ScanOptions.from_scan(scan.options or {})
        api_key = self.secrets.get(scan.pk) or options.api_key
        config = await aresolve_config()
        if options.prompt:
            config = replace(config, ocr=replace(config.ocr, prompt_preset=options.prompt))
        concurrency = min(options.concurrency or self._capacity, self._capacity)
        engine_name = options.engine or ("builtin" if config.mode == "builtin" else "vllm")
        if engine_name == "vllm" and not options.base_url:
            await _ensure_model_server(config)
        try:
            engine = build_engine(
                config,
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
            await self._send_pages(active, scan, config, engine, numbers, concurrency)
        finally:
            await engine.aclose()

    async def _send_pages(self, active, scan: Scan, config: EffectiveConfig, engine, numbers, concurrency) -> None:
        from scans.pipeline.render import render_pages

        assert self._budget is not None
        path = Path(scan.file.path)
        per_scan = asyncio.Semaphore(concurrency)
        tasks: set[asyncio.Task] = set()
        failure: list[BaseException] = []

        def done(task: asyncio.Task) -> None:
            tasks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                failure.append(task.exception())  # type: ignore[arg-type]

        pages = render_pages(
            path,
            scan.content_type,
            numbers,
            longest_side=config.ocr.target_longest_side,
            image_format=config.ocr.image_format,
            lookahead=RENDER_LOOKAHEAD,
        )
        try:
            async with contextlib.aclosing(pages):
                while not failure:
                    try:
                        image = await anext(pages)
                    except StopAsyncIteration:
                        break
                    except Exception as exc:
                        logger.exception("Rendering scan %s failed", scan.pk)
                        raise _ScanFailed(f"Could not render the file: {exc}") from None
                    await per_scan.acquire()
                    await _acquire_or_release(self._budget, per_scan)
                    if failure:
                        per_scan.release()
                        self._budget.release()
                        break
                    task = asyncio.create_task(self._page(active, scan, config, engine, image, per_scan))
                    tasks.add(task)
                    task.add_done_callback(done)
            while tasks and not failure:
                await asyncio.wait(set(tasks), return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in list(tasks):
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        if failure:
            exc = failure[0]
            if isinstance(exc, PermanentEngineError):
                raise _ScanFailed(exc.message)
            raise exc

    async def _page(self, active: _ActiveScan, scan: Scan, config: EffectiveConfig, engine, image: PageImage, per_scan) -> None:
        from scans.pipeline.page_ocr import ocr_page_with_retries
        from scans.pipeline.render import pdf_page_text, render_page_sync

        assert self._budget is not None
        number = image.number
        path = Path(scan.file.path)
        try:
            page = await _db(
                services.mark_page_running, scan_id=scan.pk, number=number, worker_id=self.worker_id, attempts=1
            )
            if page is None:
                return  # not ours (any more)
            await _publish_page(page)

            async def rerender(rotation: int) -> PageImage:
                return await asyncio.to_thread(
                    render_page_sync,
                    path,
                    scan.content_type,
                    number,
                    longest_side=config.ocr.target_longest_side,
                    image_format=config.ocr.image_format,
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
                outcome = await ocr_page_with_retries(
                    engine,
                    image,
                    config.ocr,
                    rerender=rerender,
                    fallback_text=fallback_text if scan.has_text_layer else None,
                    on_attempt=on_attempt,
                )
                result = dict(
                    status=outcome.status,
                    text=outcome.text,
                    fallback=outcome.fallback,
                    attempts=outcome.attempts,
                    error=outcome.error or "",
                    input_tokens=outcome.input_tokens,
                    output_tokens=outcome.output_tokens,
                    latency_ms=outcome.latency_ms,
                    finish_reason=outcome.finish_reason or "",
                    metadata=outcome.metadata or {},
                )
            except PermanentEngineError:
                raise
            except Exception as exc:  # e.g. a page that cannot be re-rendered: that page fails, not the scan
                logger.exception("Page %s of scan %s failed unexpectedly", number, scan.pk)
                result = dict(
                    status=Page.Status.FAILED, text="", fallback=False, attempts=page.attempts or 1,
                    error=f"{type(exc).__name__}: {exc}", input_tokens=0, output_tokens=0, latency_ms=None,
                    finish_reason="", metadata={},
                )
            commit = await asyncio.shield(
                sync_to_async(services.commit_page_result)(
                    scan_id=scan.pk, number=number, worker_id=self.worker_id, **result
                )
            )
            active.unfinished = max(0, active.unfinished - 1)
            if commit.page is not None:
                await _publish_page(commit.page)
                if self.on_page is not None:
                    await self.on_page(commit.page)
            if commit.scan_status != Scan.Status.PROCESSING:
                active.cancelled.set()
            if result["status"] == Page.Status.FAILED and engine.name == "vllm" and not scan.options.get("base_url"):
                self._report_failure(config)
        finally:
            per_scan.release()
            self._budget.release()
            self.wake()


_background: set[asyncio.Task] = set()


async def _report_failure(config: EffectiveConfig) -> None:
    from vllm_control.runtime import report_request_failure

    try:
        await report_request_failure(config)
    except Exception:
        logger.warning("Could not check the model server after a failed page", exc_info=True)


async def _acquire_or_release(budget: asyncio.Semaphore, held: asyncio.Semaphore) -> None:
    try:
        await budget.acquire()
    except BaseException:
        held.release()
        raise


async def _ensure_model_server(config: EffectiveConfig) -> None:
    from vllm_control.runtime import ensure_ready

    try:
        await ensure_ready(config)
    except ModelServerUnavailable as exc:
        raise _ScanFailed(exc.message) from None


async def _publish_page(page: Page) -> None:
    from scans.progress import apublish_page

    try:
        await apublish_page(page)
    except Exception:  # a lost progress event must never lose a page (clients re-sync)
        logger.exception("Could not publish the progress of page %s", page.pk)


async def _publish_scan(scan: Scan) -> None:
    from scans.progress import apublish_scan

    try:
        await apublish_scan(scan)
    except Exception:
        logger.exception("Could not publish the status of scan %s", scan.pk)


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
