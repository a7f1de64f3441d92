"""The durable queue runner: claims pages as slots free up and sends them to the engines.

One `Runner` per process (the ASGI server's embedded runner, `manage.py ocr_worker`, or the `ocr`
command), with a budget of `max_in_flight` pages. The database is the queue:
- a free slot claims the next page chosen fairly between users and scans (`services.claim_pages`,
  `scans.scheduling`), so a small scan never waits behind a big one, and several runners share scans;
- each page's result is committed as it arrives; while rendering, not the model server, limits the
  runner, it waits up to COMMIT_WINDOW_S to share one transaction with the results that follow
  (`_Committer`); the commit of a scan's last page finishes it;
- a heartbeat (`Worker` row) keeps this runner's claims; any runner puts the pages of a runner that
  stopped beating back to pending, and notices there that a scan was cancelled or failed elsewhere.
An answer that has arrived is always committed: commits are shielded from cancellation, and pages are
given back only once no commit for them is pending.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from asgiref.sync import sync_to_async
from django.db import OperationalError

from ocrsite.env import env_int
from scans import metrics, progress, selectors, services
from scans.models import Page, Scan
from scans.pipeline import line_boxes, queue_signals
from scans.pipeline.cpu import claim_limit
from scans.pipeline.engines import VLLM, build_engine, engine_name, reads_on_cpu
from scans.pipeline.errors import PermanentEngineError
from scans.pipeline.options import OCRConfig, ScanOptions, aocr_config
from scans.pipeline.page_ocr import ocr_page_with_retries
from scans.pipeline.page_source import PageSource
from scans.pipeline.render import pdf_page_text, render_executor
from scans.pipeline.types import Engine, PageImage, PageResult, RenderFailure
from vllm_control import runtime
from vllm_control.config import EffectiveConfig, aresolve_config, resolve_config
from vllm_control.errors import ModelServerUnavailable

logger = logging.getLogger(__name__)

# How long a result may wait for others to share its transaction. A transaction holds the GIL about as
# long as the Python side of rendering a page; at a fast server's pace this groups about ten results
# (bench/pipeline_bench.py). Live page events are then as frequent as a scan's totals (progress.PROGRESS_INTERVAL_S).
COMMIT_WINDOW_S = 0.25
COMMIT_BATCH = 64
MAX_CACHED_SCANS = 64  # scans whose engine, options and open document are kept between pages
SERVER_WAIT_NOTICE_S = 0.2  # a scan waiting longer than this for the model server says so

PageCallback = Callable[[Page], Awaitable[None]]


def _env_seconds(name: str, default_ms: int) -> float:
    return (env_int(name, default_ms, minimum=10) or default_ms) / 1000


def claim_batch(capacity: int) -> int:
    """How many free slots a runner waits for before claiming while pages still wait for rendering."""
    return max(1, capacity // 4)


def poll_interval() -> float:
    """How often a runner refreshes its heartbeat, recovers a dead runner's pages and checks that the
    scans it works on are still active (which is how it notices a cancel from another process)."""
    return _env_seconds("OCRSITE_RUNNER_POLL_MS", 1000)


def stale_after() -> timedelta:
    """A runner whose heartbeat is older than this is taken for dead: its running pages go back to pending."""
    return timedelta(seconds=_env_seconds("OCRSITE_CLAIM_STALE_MS", 30_000))


def new_worker_id() -> str:
    return f"{socket.gethostname()[:50]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def _raise_if_cancelling() -> None:
    """asgiref's sync_to_async (and so Django's async ORM) swallows a cancellation that arrives while
    the sync function is already running: the awaiting task carries on as if nothing happened. Call
    this after such awaits, before anything slow (a request to the model server), to honour it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _db(function, /, **kwargs):
    """A DB call from async code, off the event loop; a cancellation during it is re-raised after it."""
    result = await sync_to_async(function)(**kwargs)
    _raise_if_cancelling()
    return result


class _ScanFailed(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# A scan's pages are read with the scan's options, or with the overrides of a page read again
# (Page.reocr_options): the key of what they are read with, "" for the scan's own.
WorkKey = tuple[int, str]


def work_key(scan_id: int, overrides: dict | None) -> WorkKey:
    return scan_id, json.dumps(overrides, sort_keys=True) if overrides else ""


@dataclass
class _ScanWork:
    """What the pages of one scan are read with (built once per WorkKey by the first of its pages)."""

    scan: Scan
    config: EffectiveConfig
    ocr: OCRConfig
    engine: Engine
    source: PageSource
    report_failures: bool  # failed pages make the configured model server check its health


class _Committer:
    """Groups page results into transactions. Results are committed at once, except while `may_wait()`
    (the runner has claimed pages waiting for rendering, so its slots are not what limits it): then the
    first result waits up to COMMIT_WINDOW_S, or until COMMIT_BATCH are waiting, for others to join."""

    def __init__(self, worker_id: str, may_wait: Callable[[], bool]) -> None:
        self.worker_id = worker_id
        self._may_wait = may_wait
        self._pending: list[tuple[services.PageOutcomeToCommit, asyncio.Future[services.PageCommit]]] = []
        self._flusher: asyncio.Task | None = None
        self._changed = asyncio.Event()  # a result arrived, or may_wait() may have changed

    def submit(
        self, scan_id: int, number: int, result: PageResult, engine: Engine | None = None
    ) -> asyncio.Future[services.PageCommit]:
        """Queue a result (read by `engine`) for the next transaction; the future is set once it has
        committed (it is not cancelled with its waiter: the commit happens anyway)."""
        future: asyncio.Future[services.PageCommit] = asyncio.get_running_loop().create_future()
        names = (engine.name, engine.model) if engine is not None else ("", "")
        self._pending.append((services.PageOutcomeToCommit(scan_id, number, result, *names), future))
        self._changed.set()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="page-commits")
        return future

    def nudge(self) -> None:
        """may_wait() may have changed: the wait may be over."""
        self._changed.set()

    async def _flush(self) -> None:
        deadline = asyncio.get_running_loop().time() + COMMIT_WINDOW_S
        while len(self._pending) < COMMIT_BATCH and self._may_wait():
            self._changed.clear()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._changed.wait()
            except TimeoutError:
                break
        while self._pending:
            batch, self._pending = self._pending[:COMMIT_BATCH], self._pending[COMMIT_BATCH:]
            await self._commit(batch)

    async def _commit(self, batch: list[tuple[services.PageOutcomeToCommit, asyncio.Future[services.PageCommit]]]) -> None:
        """Store the batch in one transaction and settle its futures. If it fails for something other than
        the database being unavailable (e.g. one result PostgreSQL refuses), each result is tried alone, so
        that one cannot cost the others theirs."""
        try:
            commits = await sync_to_async(services.commit_page_results)(
                worker_id=self.worker_id, outcomes=[outcome for outcome, _ in batch]
            )
        except Exception as exc:
            if len(batch) > 1 and not isinstance(exc, OperationalError):
                for one in batch:
                    await self._commit([one])
                return
            logger.exception("Could not store %d page result(s)", len(batch))
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), commit in zip(batch, commits):
            if not future.done():
                future.set_result(commit)

    async def drain(self) -> None:
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)


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
        self._fixed_capacity = max_in_flight is not None
        self._capacity = 0
        self._only: set[int] | None = None  # run_scans: the scans this runner may claim pages of
        self._tasks: dict[tuple[int, int], asyncio.Task] = {}  # (scan id, page number) -> its task
        # Of those, the pages a CPU engine reads: at most cpu.claim_limit() (the process's cores plus a
        # look-ahead), so the rest wait in the database rather than as rendered images for a core.
        self._cpu_pages: set[tuple[int, int]] = set()
        # Of those, the pages waiting for a render thread (not those whose scan is still being set up, e.g.
        # waiting for a Local model server to start). While some wait, the model server is not short of
        # work: free slots are claimed together, and results wait to share a transaction (_Committer).
        self._unrendered: set[tuple[int, int]] = set()
        self._mode = "builtin"  # the configured mode (which scans a CPU engine reads), refreshed by _poll
        self._works: dict[WorkKey, asyncio.Future[_ScanWork]] = {}
        self._engines: dict[tuple, Engine] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._committer = _Committer(self.worker_id, may_wait=lambda: bool(self._unrendered))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._last_failure_report = 0.0

    # --- thread-safe signals (scans.pipeline.queue_signals) -------------------------------------

    def wake(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake.set)

    def cancel_scan_locally(self, scan_id: int) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._drop_scan, scan_id)

    def _drop_scan(self, scan_id: int) -> None:
        """The scan was cancelled or deleted: stop its requests in flight. Each page's task gives its
        page back unless its answer is already on its way to the database."""
        for (task_scan, _), task in list(self._tasks.items()):
            if task_scan == scan_id:
                task.cancel()
        self._forget(scan_id)

    # --- lifecycle ------------------------------------------------------------------------------

    async def _setup(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._capacity == 0:
            if self._max_in_flight is None:
                self._max_in_flight = (await aocr_config()).max_in_flight
            self._capacity = max(1, self._max_in_flight)
        if self._executor is None:
            self._executor = render_executor()
        # Registered before the first claim, so no other runner takes this one's pages for a dead runner's.
        await _db(services.heartbeat_worker, worker_id=self.worker_id)
        queue_signals.register(self)

    async def _teardown(self) -> None:
        """Stop every page task, commit what has arrived, give the rest back, release resources."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.shield(self._committer.drain())
        queue_signals.unregister(self)
        await asyncio.shield(sync_to_async(services.unregister_worker)(worker_id=self.worker_id))
        for scan_id, _ in list(self._works):
            self._forget(scan_id)
        engines, self._engines = list(self._engines.values()), {}
        for engine in engines:
            await engine.aclose()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    async def run_forever(self) -> None:
        """Claim and process pages until `stop()` (or, with `once`, until nothing is left to claim)."""
        await self._setup()
        try:
            await self._work_until(lambda claimed: self.once and claimed == 0 and not self._tasks)
        finally:
            await self._teardown()

    async def run_scans(self, scan_ids: Collection[int]) -> dict[int, str]:
        """Process these scans to the end (pages another runner holds are waited for); returns each
        scan's final status (absent: deleted)."""
        self._only = set(scan_ids)
        await self._setup()
        try:
            await self._work_until(lambda claimed: not self._only and not self._tasks)
        finally:
            await self._teardown()
        return await sync_to_async(selectors.scan_statuses)(scan_ids)

    async def run_scan(self, scan_id: int) -> str | None:
        return (await self.run_scans([scan_id])).get(scan_id)

    async def stop(self) -> None:
        """Stop claiming; the loop then cancels in-flight requests and gives their pages back."""
        self._stopping = True
        self.wake()

    async def _work_until(self, done: Callable[[int], bool]) -> None:
        next_poll = 0.0
        while not self._stopping:
            if time.monotonic() >= next_poll:
                await self._poll()
                next_poll = time.monotonic() + poll_interval()
            self._wake.clear()  # before claiming: a slot freed meanwhile wakes the wait below at once
            claimed = await self._claim()
            if done(claimed):
                return
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.0, next_poll - time.monotonic()))
            except TimeoutError:
                pass

    async def _poll(self) -> None:
        try:
            config = await _db(resolve_config)
            self._mode = config.mode
            if not self._fixed_capacity and config.capacity:  # all the model servers' capacity, as saved now
                self._capacity = config.capacity
            await _db(services.heartbeat_worker, worker_id=self.worker_id)
            await _db(services.recover_stale_workers, stale_after=stale_after())
            await _db(services.finish_completed_scans)
            watched = {scan_id for scan_id, _ in self._tasks} | (self._only or set())
            if watched:
                statuses = await _db(selectors.scan_statuses, scan_ids=watched)
                for scan_id in watched:
                    if statuses.get(scan_id) not in Scan.ACTIVE:
                        self._scan_ended(scan_id, statuses.get(scan_id))
        except asyncio.CancelledError:
            raise
        except Exception:  # e.g. the database was busy for too long: try again next time
            logger.warning("The runner's periodic checks failed", exc_info=True)

    def _scan_ended(self, scan_id: int, status: str | None) -> None:
        """No more pages of the scan will be claimed. A cancelled or deleted scan's requests stop now; a
        failed or finished scan's requests in flight may still answer, and their answers are kept."""
        if self._only is not None:
            self._only.discard(scan_id)
        if status in (None, Scan.Status.CANCELLED):
            self._drop_scan(scan_id)
        elif not self._has_tasks(scan_id):
            self._forget(scan_id)

    def _has_tasks(self, scan_id: int) -> bool:
        return any(task_scan == scan_id for task_scan, _ in self._tasks)

    async def _claim(self) -> int:
        """Fill the free slots with pages; returns how many were claimed (-1: no slot was free)."""
        free = self._capacity - len(self._tasks)
        if free <= 0 or (self._unrendered and free < claim_batch(self._capacity)):
            return -1
        if self._only is not None and not self._only:
            return 0
        claims = await sync_to_async(services.claim_pages)(
            worker_id=self.worker_id, slots=free, scan_ids=self._only,
            cpu_slots=max(0, claim_limit() - len(self._cpu_pages)), is_cpu_scan=self._is_cpu_scan,
        )
        for claim in claims:
            page = claim.page
            if claim.cpu:
                self._cpu_pages.add((page.scan_id, page.number))
            self._tasks[(page.scan_id, page.number)] = asyncio.create_task(
                self._page(page), name=f"page-{page.scan_id}-{page.number}"
            )
        return len(claims)

    def _rendered(self, key: tuple[int, int]) -> None:
        """The page no longer waits for a render thread (it was rendered, or its task ended)."""
        self._unrendered.discard(key)
        if not self._unrendered:  # the free slots held back for a batch can be claimed now
            self._wake.set()
            self._committer.nudge()  # and results waiting to be grouped hold slots that are needed

    def _is_cpu_scan(self, options: dict) -> bool:
        return reads_on_cpu(ScanOptions.from_scan(options), mode=self._mode)

    def _report_failure(self, config: EffectiveConfig) -> None:
        """A page failed: let the model server's status check its health now (at most every 10 s)."""
        now = time.monotonic()
        if now - self._last_failure_report < 10:
            return
        self._last_failure_report = now
        task = asyncio.create_task(_report_failure(config))
        _background.add(task)
        task.add_done_callback(_background.discard)

    # --- one scan's setup -----------------------------------------------------------------------

    async def _work(self, scan_id: int, overrides: dict | None) -> _ScanWork:
        key = work_key(scan_id, overrides)
        future = self._works.get(key)
        if future is None:
            if len(self._works) >= MAX_CACHED_SCANS:
                for idle in {s for s, _ in self._works if not self._has_tasks(s)}:
                    self._forget(idle)
            future = self._works[key] = asyncio.ensure_future(self._prepare(scan_id, overrides or {}))
        return await asyncio.shield(future)  # a cancelled page does not cancel its scan's setup

    def _forget(self, scan_id: int, key: WorkKey | None = None) -> None:
        """Drop what the scan's pages are read with (only `key`'s when given), closing its document."""
        for cached in [key] if key is not None else [k for k in self._works if k[0] == scan_id]:
            future = self._works.pop(cached, None)
            if future is None:
                continue
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().source.close()
            elif not future.done():
                future.cancel()

    async def _prepare(self, scan_id: int, overrides: dict) -> _ScanWork:
        scan = await Scan.objects.aget(pk=scan_id)
        options = ScanOptions.from_scan({**(scan.options or {}), **overrides})
        config = await aresolve_config()
        ocr = options.apply(await aocr_config())
        name = engine_name(options, mode=config.mode, cpu_engine=ocr.cpu_engine)
        if name == VLLM and not options.base_url:
            try:
                await self._server_ready(scan_id, config)
            except ModelServerUnavailable as exc:
                raise _ScanFailed(exc.message) from None
        api_key = self.secrets.get(scan_id) or options.api_key
        key = (
            name, ocr.language, options.base_url, options.model, api_key, config.base_url, config.api_key,
            ocr.request_timeout_s, config.endpoints,
        )
        engine = self._engines.get(key)
        if engine is None:
            try:
                engine = build_engine(
                    config, ocr, engine=name, base_url=options.base_url, model=options.model,
                    api_key=api_key, max_in_flight=self._capacity,
                )
            except PermanentEngineError as exc:
                raise _ScanFailed(exc.message) from None
            self._engines[key] = engine
        if not overrides:  # the scan's engine and model are those of its own options
            await _db(services.set_scan_engine, scan_id=scan_id, engine=engine.name, model=engine.model)
        assert self._executor is not None
        source = PageSource(
            Path(scan.file.path), scan.content_type,
            longest_side=ocr.target_longest_side, image_format=ocr.image_format, executor=self._executor,
        )
        return _ScanWork(scan, config, ocr, engine, source, report_failures=not options.base_url)

    async def _server_ready(self, scan_id: int, config: EffectiveConfig) -> None:
        """The configured model server can take the scan's pages. While a Local one cannot yet (it is
        starting, e.g. again after its idle timeout stopped it), the scan says it waits for it."""
        ready = asyncio.ensure_future(runtime.ensure_ready(config))
        if config.mode != "local" or (await asyncio.wait({ready}, timeout=SERVER_WAIT_NOTICE_S))[0]:
            return await ready  # an External server is checked, not started: it answers or fails at once
        await asyncio.shield(self._set_waiting(scan_id, True))
        try:
            await ready
        finally:
            ready.cancel()
            await asyncio.shield(self._set_waiting(scan_id, False))

    async def _set_waiting(self, scan_id: int, waiting: bool) -> None:
        try:
            await sync_to_async(services.set_waiting_for_server)(scan_id=scan_id, waiting=waiting)
            await progress.apublish_scan(scan_id)
        except Exception:
            logger.warning("Could not record that scan %s waits for the model server", scan_id, exc_info=True)

    # --- one page ---------------------------------------------------------------------------------

    async def _page(self, page: Page) -> None:
        scan_id, number = page.scan_id, page.number
        claimed_at = time.monotonic()
        handed_over = False  # the result is with the committer: never give the page back
        work: _ScanWork | None = None
        try:
            await progress.apublish_page(page)
            try:
                work = await self._work(scan_id, page.reocr_options)
                self._unrendered.add((scan_id, number))
                image = await work.source.render(number)
                self._rendered((scan_id, number))
                if isinstance(image, RenderFailure):
                    result = PageResult(text="", status="failed", error=image.message)
                else:
                    result = await line_boxes.add_line_boxes(await self._read(work, image), image, engine=work.engine.name)
            except (_ScanFailed, PermanentEngineError) as exc:
                if page.reocr_options is None:
                    await _db(services.fail_scan, scan_id=scan_id, error=exc.message)
                    return
                # Reading one page again (maybe with another model or engine) fails that reading only.
                self._forget(scan_id, work_key(scan_id, page.reocr_options))
                result = PageResult(text="", status="failed", error=exc.message)
            future = self._committer.submit(scan_id, number, result, work.engine if work else None)
            handed_over = True
            try:
                commit = await asyncio.shield(future)
            except OperationalError:  # the database is unavailable (logged): the page will be read again
                handed_over = False
                return
            except Exception as exc:  # this result cannot be stored (logged): the page fails, saying why
                result = PageResult(text="", status="failed", error=f"The result could not be stored: {type(exc).__name__}: {exc}")
                try:
                    commit = await asyncio.shield(self._committer.submit(scan_id, number, result))
                except Exception:
                    handed_over = False
                    return
            if commit.page is not None:
                metrics.page_finished(
                    engine=work.engine.name if work else "", status=result.status, seconds=time.monotonic() - claimed_at,
                    input_tokens=result.input_tokens, output_tokens=result.output_tokens,
                )
                await progress.apublish_page(commit.page)
                if self.on_page is not None:
                    await self.on_page(commit.page)
            if commit.scan_status not in Scan.ACTIVE:
                self._scan_ended(scan_id, commit.scan_status)
            if work and result.status == Page.Status.FAILED and work.engine.name == "vllm" and work.report_failures:
                self._report_failure(work.config)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must cost this page, not the runner
            logger.exception("Page %s of scan %s failed unexpectedly", number, scan_id)
            if not handed_over:
                failure = PageResult(text="", status="failed", error=f"Internal error: {type(exc).__name__}: {exc}")
                handed_over = True
                await asyncio.shield(self._committer.submit(scan_id, number, failure))
        finally:
            self._tasks.pop((scan_id, number), None)
            self._cpu_pages.discard((scan_id, number))
            self._rendered((scan_id, number))
            if not handed_over:
                await asyncio.shield(
                    sync_to_async(services.release_pages)(worker_id=self.worker_id, scan_id=scan_id, numbers=[number])
                )
            self._wake.set()

    async def _read(self, work: _ScanWork, image: PageImage) -> PageResult:
        """One page through the engine with retries; raises only PermanentEngineError and cancellation."""
        scan, number = work.scan, image.number

        async def rerender(rotation: int) -> PageImage:
            rendered = await work.source.render(number, rotation)
            if isinstance(rendered, RenderFailure):
                raise RuntimeError(rendered.message)
            return rendered

        async def fallback_text() -> str:
            return await asyncio.to_thread(pdf_page_text, Path(scan.file.path), number)

        async def on_attempt(attempt: int) -> None:
            # Called right before each request: the last chance to honour a swallowed cancellation.
            if attempt > 1:  # the first attempt was recorded with the claim
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
            return PageResult(text="", status="failed", error=f"{type(exc).__name__}: {exc}")


_background: set[asyncio.Task] = set()


async def _report_failure(config: EffectiveConfig) -> None:
    try:
        await runtime.report_request_failure(config)
    except Exception:
        logger.warning("Could not check the model server after a failed page", exc_info=True)


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
