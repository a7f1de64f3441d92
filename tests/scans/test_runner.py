"""The queue runner in-process against the vLLM test double: page order and content, cancellation,
permanent failures, fallback text, retries of failed pages, takeover of a dead worker's scan, two
runners sharing one queue, and the embedded runner woken by a new scan."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.db import OperationalError
from django.utils import timezone

from scans import exports, services
from scans.models import Page, Scan, Worker
from scans.pipeline import runner as runner_module
from scans.pipeline.runner import Runner
from scans.pipeline.types import PageResult
from tests.scans.conftest import new_scan, use_external
from tests.scans.pipeline.helpers import MODEL

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]


@pytest.fixture(autouse=True)
def short_knobs(monkeypatch, settings, tmp_path):
    monkeypatch.setenv("OCRSITE_RUNNER_POLL_MS", "200")
    monkeypatch.setenv("OCRSITE_CLAIM_STALE_MS", "1500")
    settings.MEDIA_ROOT = tmp_path / "media"


async def eventually(check, timeout: float = 60.0) -> None:
    """Wait until the async `check()` is true; the timeout is only a safety net."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def pages_of(scan: Scan) -> list[Page]:
    return [page async for page in Page.objects.filter(scan=scan).order_by("number")]


async def test_every_page_text_comes_from_its_own_page_in_order(fake, owner, tmp_path):
    server = fake(FAKE_VLLM_LATENCY=0.05)
    await sync_to_async(use_external)(server.base_url)
    scan = await sync_to_async(new_scan)(owner, tmp_path, 7)

    status = await Runner(max_in_flight=4).run_scan(scan.pk)

    assert status == Scan.Status.DONE
    pages = await pages_of(scan)
    assert [p.number for p in pages] == list(range(1, 8))
    for page in pages:
        assert page.status == Page.Status.DONE
        assert f"PAGE {page.number}" in page.text
        assert page.attempts == 1 and page.output_tokens > 0 and page.latency_ms is not None
    assert sorted(r["page_marker"] for r in server.requests()) == list(range(1, 8))
    scan = await Scan.objects.aget(pk=scan.pk)
    assert scan.output_tokens == sum(p.output_tokens for p in pages)
    assert scan.engine == "vllm" and scan.model == MODEL and scan.finished_at is not None
    markdown = await sync_to_async(exports.export_markdown)(scan)
    positions = [markdown.index(f"PAGE {n}\n") for n in range(1, 8)]
    assert positions == sorted(positions)


async def test_cancel_stops_in_flight_requests_promptly(fake, owner, tmp_path):
    server = fake(FAKE_VLLM_LATENCY=30)  # a request never finishes within the test
    await sync_to_async(use_external)(server.base_url)
    scan = await sync_to_async(new_scan)(owner, tmp_path, 6)
    task = asyncio.create_task(Runner(max_in_flight=3).run_scan(scan.pk))

    async def running() -> int:
        return await Page.objects.filter(scan=scan, status=Page.Status.RUNNING).acount()

    for _ in range(200):
        if await running() == 3:
            break
        await asyncio.sleep(0.05)
    assert await running() == 3
    assert await sync_to_async(services.cancel_scan)(scan=scan)

    # Far shorter than the double's 30 s latency: the in-flight requests were abandoned.
    status = await asyncio.wait_for(task, timeout=10)
    assert status == Scan.Status.CANCELLED
    pages = await pages_of(scan)
    assert {p.status for p in pages} == {Page.Status.PENDING}
    assert server.requests() == []  # nothing was answered


async def test_cancel_from_another_process_is_noticed_by_the_heartbeat(fake, owner, tmp_path):
    server = fake(FAKE_VLLM_LATENCY=30)
    await sync_to_async(use_external)(server.base_url)
    scan = await sync_to_async(new_scan)(owner, tmp_path, 2)
    task = asyncio.create_task(Runner(max_in_flight=2).run_scan(scan.pk))
    for _ in range(200):
        if await Page.objects.filter(scan=scan, status=Page.Status.RUNNING).acount() == 2:
            break
        await asyncio.sleep(0.05)
    # What cancel_scan does in another process: only the row changes, no in-process signal.
    await Scan.objects.filter(pk=scan.pk).aupdate(status=Scan.Status.CANCELLED)

    assert await asyncio.wait_for(task, timeout=10) == Scan.Status.CANCELLED
    assert await Page.objects.filter(scan=scan, status=Page.Status.PENDING).acount() == 2


async def test_unknown_model_fails_the_scan_with_a_clear_message(fake, owner, tmp_path):
    server = fake()
    await sync_to_async(use_external)(server.base_url)
    scan = await sync_to_async(new_scan)(owner, tmp_path, 3, options={"model": "no/such-model", "base_url": server.base_url})

    assert await Runner(max_in_flight=2).run_scan(scan.pk) == Scan.Status.FAILED
    scan = await Scan.objects.aget(pk=scan.pk)
    assert "no/such-model" in scan.error
    assert await Page.objects.filter(scan=scan, status=Page.Status.DONE).acount() == 0
    assert await Page.objects.filter(scan=scan, status=Page.Status.RUNNING).acount() == 0


async def test_an_unavailable_model_server_fails_the_scan(fake, owner, tmp_path):
    server = fake()
    await sync_to_async(use_external)(server.base_url, served_model_name="not/served")
    scan = await sync_to_async(new_scan)(owner, tmp_path, 2)

    assert await Runner(max_in_flight=2).run_scan(scan.pk) == Scan.Status.FAILED
    scan = await Scan.objects.aget(pk=scan.pk)
    assert "not/served" in scan.error
    assert await Page.objects.filter(scan=scan, status=Page.Status.PENDING).acount() == 2
    assert server.requests() == []


async def test_failed_pages_fall_back_to_the_text_layer(fake, owner, tmp_path):
    server = fake(FAKE_VLLM_ERROR_RATE=1)
    await sync_to_async(use_external)(server.base_url)
    scan = await sync_to_async(new_scan)(owner, tmp_path, 3, text_layer=True)
    assert scan.has_text_layer

    assert await Runner(max_in_flight=2).run_scan(scan.pk) == Scan.Status.DONE
    for page in await pages_of(scan):
        assert page.status == Page.Status.DONE and page.fallback
        assert f"Text layer of page {page.number}" in page.text


async def test_failed_pages_finish_the_scan_and_can_be_retried(fake, owner, tmp_path):
    broken = fake(FAKE_VLLM_ERROR_RATE=1)
    await sync_to_async(use_external)(broken.base_url)
    scan = await sync_to_async(new_scan)(owner, tmp_path, 3)

    assert await Runner(max_in_flight=2).run_scan(scan.pk) == Scan.Status.DONE_WITH_ERRORS
    pages = await pages_of(scan)
    assert all(p.status == Page.Status.FAILED and p.error for p in pages)

    good = fake()
    await sync_to_async(use_external)(good.base_url)
    assert await sync_to_async(services.retry_failed_pages)(scan=scan) == 3
    assert (await Scan.objects.aget(pk=scan.pk)).status == Scan.Status.QUEUED
    assert await Runner(max_in_flight=2).run_scan(scan.pk) == Scan.Status.DONE
    assert all(f"PAGE {p.number}" in p.text for p in await pages_of(scan))


async def test_a_dead_workers_pages_resume_without_resending_finished_pages(fake, owner, tmp_path):
    server = fake()
    await sync_to_async(use_external)(server.base_url)
    scan = await sync_to_async(new_scan)(owner, tmp_path, 5)
    # As a worker killed mid-scan leaves it: pages 1-2 committed, page 3 running, an old heartbeat.
    await Worker.objects.acreate(worker_id="dead:1:x", heartbeat_at=timezone.now() - timedelta(seconds=60))
    await Scan.objects.filter(pk=scan.pk).aupdate(status=Scan.Status.PROCESSING)
    await Page.objects.filter(scan=scan, number__in=[1, 2]).aupdate(status=Page.Status.DONE, text="kept", attempts=1)
    await Page.objects.filter(scan=scan, number=3).aupdate(status=Page.Status.RUNNING, worker_id="dead:1:x")

    await Runner(max_in_flight=2, once=True).run_forever()

    pages = await pages_of(scan)
    assert [p.status for p in pages] == [Page.Status.DONE] * 5
    assert [p.text for p in pages[:2]] == ["kept", "kept"]
    assert sorted(r["page_marker"] for r in server.requests()) == [3, 4, 5]
    assert (await Scan.objects.aget(pk=scan.pk)).status == Scan.Status.DONE
    assert not await Worker.objects.filter(worker_id="dead:1:x").aexists()


async def test_a_live_workers_pages_are_not_taken_over_but_its_waiting_pages_are_shared(fake, owner, tmp_path):
    server = fake()
    await sync_to_async(use_external)(server.base_url)
    scan = await sync_to_async(new_scan)(owner, tmp_path, 3)
    await Worker.objects.acreate(worker_id="alive:1:x", heartbeat_at=timezone.now())
    await Scan.objects.filter(pk=scan.pk).aupdate(status=Scan.Status.PROCESSING)
    await Page.objects.filter(scan=scan, number=1).aupdate(status=Page.Status.RUNNING, worker_id="alive:1:x")

    await Runner(max_in_flight=2, once=True).run_forever()

    first = await Page.objects.aget(scan=scan, number=1)
    assert (first.status, first.worker_id) == (Page.Status.RUNNING, "alive:1:x")
    assert sorted(r["page_marker"] for r in server.requests()) == [2, 3]
    assert (await Scan.objects.aget(pk=scan.pk)).status == Scan.Status.PROCESSING  # page 1 is still out


async def test_two_runners_share_the_queue_without_sending_a_page_twice(fake, owner, tmp_path):
    server = fake(FAKE_VLLM_LATENCY=0.05)
    await sync_to_async(use_external)(server.base_url)
    scans = [await sync_to_async(new_scan)(owner, tmp_path, 3, name=f"doc{i}.pdf") for i in range(5)]

    first, second = Runner(max_in_flight=2, once=True), Runner(max_in_flight=2, once=True)
    await asyncio.gather(first.run_forever(), second.run_forever())

    assert await Page.objects.filter(status=Page.Status.DONE).acount() == 15
    assert sorted(r["page_marker"] for r in server.requests()) == sorted([1, 2, 3] * 5)
    workers = {p.worker_id async for p in Page.objects.filter(scan__in=[s.pk for s in scans])}
    assert workers <= {first.worker_id, second.worker_id}
    assert {s.status async for s in Scan.objects.filter(pk__in=[s.pk for s in scans])} == {Scan.Status.DONE}


async def test_a_small_scan_of_another_user_starts_before_a_big_one_goes_on(fake, owner, tmp_path):
    """Pages, not scans, share the budget: the next free slot goes to the newcomer."""
    server = fake(FAKE_VLLM_LATENCY=0.2)
    await sync_to_async(use_external)(server.base_url)
    big = await sync_to_async(new_scan)(owner, tmp_path, 30, name="big.pdf")
    other = await get_user_model().objects.acreate_user("bob", password="x")
    runner = Runner(max_in_flight=2)
    task = asyncio.create_task(runner.run_forever())
    try:
        await eventually(lambda: Page.objects.filter(scan=big, status=Page.Status.DONE).aexists())
        small = await sync_to_async(new_scan)(other, tmp_path, 1, name="small.pdf")
        done_before = await Page.objects.filter(scan=big, status=Page.Status.DONE).acount()
        await eventually(lambda: Page.objects.filter(scan=small, status=Page.Status.DONE).aexists())
        small_page = await Page.objects.aget(scan=small)
        # At most the two pages in flight when it arrived (and the one claimed with it) went before it.
        started_after = await Page.objects.filter(scan=big, started_at__lt=small_page.started_at).acount()
        assert started_after <= done_before + 3, (done_before, started_after)
        assert await Page.objects.filter(scan=big, status=Page.Status.PENDING).acount() > 10
    finally:
        await runner.stop()
        await task


async def test_the_embedded_runner_is_woken_by_a_new_scan(fake, owner, tmp_path, monkeypatch):
    monkeypatch.setenv("OCRSITE_RUNNER_POLL_MS", "60000")  # only the wake-up can start the work
    server = fake()
    await sync_to_async(use_external)(server.base_url)
    await runner_module.start_embedded_runner()
    try:
        await asyncio.sleep(0.2)  # the runner has looked at the (empty) queue and is waiting
        scan = await sync_to_async(new_scan)(owner, tmp_path, 2)
        for _ in range(200):
            if (await Scan.objects.aget(pk=scan.pk)).status == Scan.Status.DONE:
                break
            await asyncio.sleep(0.05)
        assert (await Scan.objects.aget(pk=scan.pk)).status == Scan.Status.DONE
    finally:
        await runner_module.stop_embedded_runner()


async def test_stopping_a_runner_puts_its_scan_back_in_the_queue(fake, owner, tmp_path):
    server = fake(FAKE_VLLM_LATENCY=30)
    await sync_to_async(use_external)(server.base_url)
    scan = await sync_to_async(new_scan)(owner, tmp_path, 2)
    runner = Runner(max_in_flight=2)
    loop_task = asyncio.create_task(runner.run_forever())
    for _ in range(200):
        if await Page.objects.filter(scan=scan, status=Page.Status.RUNNING).acount() == 2:
            break
        await asyncio.sleep(0.05)
    await asyncio.wait_for(runner.stop(), timeout=10)
    await asyncio.wait_for(loop_task, timeout=10)

    scan = await Scan.objects.aget(pk=scan.pk)
    assert scan.status == Scan.Status.QUEUED
    assert await Page.objects.filter(scan=scan, status=Page.Status.PENDING).acount() == 2


# --- grouping results into transactions (runner._Committer) -----------------------------------------


@pytest.fixture
def committed_batches(monkeypatch) -> list[int]:
    """The size of every transaction of page results, in order."""
    batches: list[int] = []
    commit = services.commit_page_results

    def recording(*, worker_id, outcomes):
        batches.append(len(outcomes))
        return commit(worker_id=worker_id, outcomes=outcomes)

    monkeypatch.setattr(services, "commit_page_results", recording)
    return batches


async def claimed_scan(owner, tmp_path, pages: int) -> Scan:
    scan = await sync_to_async(new_scan)(owner, tmp_path, pages)
    await sync_to_async(services.heartbeat_worker)(worker_id="w1")
    claims = await sync_to_async(services.claim_pages)(worker_id="w1", slots=pages, scan_ids=[scan.pk])
    assert len(claims) == pages
    return scan


def result(number: int) -> PageResult:
    return PageResult(text=f"# PAGE {number}", input_tokens=10, output_tokens=5)


async def test_results_wait_for_each_other_only_while_pages_wait_for_rendering(owner, tmp_path, monkeypatch, committed_batches):
    monkeypatch.setattr(runner_module, "COMMIT_WINDOW_S", 3600)  # only may_wait() ends the wait here
    scan = await claimed_scan(owner, tmp_path, 4)
    waiting_for_rendering = True
    committer = runner_module._Committer("w1", may_wait=lambda: waiting_for_rendering)

    futures = [committer.submit(scan.pk, number, result(number)) for number in (1, 2, 3)]
    await asyncio.sleep(0.1)
    assert committed_batches == [] and not any(future.done() for future in futures)

    waiting_for_rendering = False  # the runner's slots now limit it: the results go out at once, together
    committer.nudge()
    commits = await asyncio.gather(*futures)
    assert committed_batches == [3]
    assert [commit.page.number for commit in commits] == [1, 2, 3]
    assert all(commit.scan_status == Scan.Status.PROCESSING for commit in commits)

    # Nothing waits for rendering: a result does not wait for others (the window would time the test out).
    last = await committer.submit(scan.pk, 4, result(4))
    assert committed_batches == [3, 1] and last.scan_status == Scan.Status.DONE
    pages = await pages_of(scan)
    assert [(page.status, page.text) for page in pages] == [(Page.Status.DONE, f"# PAGE {n}") for n in range(1, 5)]
    assert (await Scan.objects.aget(pk=scan.pk)).output_tokens == 20


async def test_a_full_batch_and_the_window_end_the_wait(owner, tmp_path, monkeypatch, committed_batches):
    scan = await claimed_scan(owner, tmp_path, 3)
    committer = runner_module._Committer("w1", may_wait=lambda: True)

    monkeypatch.setattr(runner_module, "COMMIT_WINDOW_S", 3600)
    monkeypatch.setattr(runner_module, "COMMIT_BATCH", 2)
    await asyncio.gather(committer.submit(scan.pk, 1, result(1)), committer.submit(scan.pk, 2, result(2)))
    assert committed_batches == [2]

    monkeypatch.setattr(runner_module, "COMMIT_WINDOW_S", 0.05)
    commit = await committer.submit(scan.pk, 3, result(3))
    assert committed_batches == [2, 1] and commit.scan_status == Scan.Status.DONE


async def test_a_commit_that_fails_gives_its_pages_back_to_be_read_again(fake, owner, tmp_path, monkeypatch):
    server = fake()
    await sync_to_async(use_external)(server.base_url)
    scan = await sync_to_async(new_scan)(owner, tmp_path, 2)
    commit = services.commit_page_results
    failures = [OperationalError("database is locked")]

    def failing_once(*, worker_id, outcomes):
        if failures:
            raise failures.pop()
        return commit(worker_id=worker_id, outcomes=outcomes)

    monkeypatch.setattr(services, "commit_page_results", failing_once)

    assert await Runner(max_in_flight=1).run_scan(scan.pk) == Scan.Status.DONE
    assert [(page.number, page.status) for page in await pages_of(scan)] == [(1, Page.Status.DONE), (2, Page.Status.DONE)]
    assert sorted(r["page_marker"] for r in server.requests()) == [1, 1, 2]  # page 1's lost answer was asked again


async def waiting_for_a_local_server(monkeypatch) -> asyncio.Event:
    """Scans on the configured server wait in their setup until the returned event is set (a Local model
    server starting, which can take minutes)."""
    started = asyncio.Event()

    async def ensure_ready(config):
        await started.wait()

    monkeypatch.setattr(runner_module.runtime, "ensure_ready", ensure_ready)
    return started


async def test_pages_whose_scan_waits_for_its_server_neither_hold_back_claims_nor_commits(fake, owner, tmp_path, monkeypatch):
    # Seven of eight slots hold pages of a scan waiting for its model server to start. The other slot
    # reads another user's scan on its own server, page after page, each committed at once: no page
    # waits for a render thread (the window would time the test out).
    monkeypatch.setattr(runner_module, "COMMIT_WINDOW_S", 3600)
    server = fake()
    await sync_to_async(use_external)(server.base_url)
    started = await waiting_for_a_local_server(monkeypatch)
    waiting = await sync_to_async(new_scan)(owner, tmp_path, 7, name="waits.pdf")  # on the configured server
    runner = Runner(max_in_flight=8)
    task = asyncio.create_task(runner.run_forever())
    try:
        await eventually(lambda: running_pages(waiting, 7))
        bob = await get_user_model().objects.acreate_user("bob", password="x")
        other = await sync_to_async(new_scan)(
            bob, tmp_path, 4, name="other.pdf", options={"base_url": server.base_url, "model": MODEL}
        )
        await eventually(lambda: all_done(other))
        assert await running_pages(waiting, 7)
    finally:
        started.set()
        await runner.stop()
        await asyncio.wait_for(task, 20)


async def running_pages(scan: Scan, count: int) -> bool:
    return await Page.objects.filter(scan=scan, status=Page.Status.RUNNING).acount() == count


async def all_done(scan: Scan) -> bool:
    return not await Page.objects.filter(scan=scan).exclude(status=Page.Status.DONE).aexists()


async def test_a_scans_concurrency_is_never_exceeded(fake, owner, tmp_path, monkeypatch):
    reading: dict[int, list[int]] = {}  # scan id -> [pages being read now, most read at once]
    read = Runner._read

    async def counting(self, work, image):
        counts = reading.setdefault(work.scan.pk, [0, 0])
        counts[0] += 1
        counts[1] = max(counts[1], counts[0])
        try:
            return await read(self, work, image)
        finally:
            counts[0] -= 1

    monkeypatch.setattr(Runner, "_read", counting)
    server = fake(FAKE_VLLM_LATENCY=0.3)
    await sync_to_async(use_external)(server.base_url)
    scan = await sync_to_async(new_scan)(owner, tmp_path, 12, options={"concurrency": 2})

    assert await Runner(max_in_flight=8).run_scan(scan.pk) == Scan.Status.DONE
    assert 1 <= reading[scan.pk][1] <= 2


def refusing_page_2(monkeypatch) -> None:
    """The database refuses page 2's text, as PostgreSQL refuses a NUL character in a string."""
    commit = services.commit_page_results

    def refusing(*, worker_id, outcomes):
        if any(outcome.number == 2 and outcome.result.status == Page.Status.DONE for outcome in outcomes):
            raise ValueError("A string literal cannot contain NUL (0x00) characters.")
        return commit(worker_id=worker_id, outcomes=outcomes)

    monkeypatch.setattr(services, "commit_page_results", refusing)


async def test_a_result_the_database_refuses_costs_no_other_result_of_its_transaction(owner, tmp_path, monkeypatch, committed_batches):
    refusing_page_2(monkeypatch)
    monkeypatch.setattr(runner_module, "COMMIT_WINDOW_S", 3600)
    scan = await claimed_scan(owner, tmp_path, 3)
    waiting_for_rendering = True
    committer = runner_module._Committer("w1", may_wait=lambda: waiting_for_rendering)
    futures = [committer.submit(scan.pk, number, result(number)) for number in (1, 2, 3)]
    waiting_for_rendering = False
    committer.nudge()

    settled = await asyncio.gather(*futures, return_exceptions=True)
    assert committed_batches == [1, 1]  # the three together were refused; then pages 1 and 3 alone
    assert [commit.page.number for commit in (settled[0], settled[2])] == [1, 3]
    assert isinstance(settled[1], ValueError)


async def test_a_page_whose_result_cannot_be_stored_fails_saying_why_and_is_not_read_again(fake, owner, tmp_path, monkeypatch):
    refusing_page_2(monkeypatch)
    server = fake()
    await sync_to_async(use_external)(server.base_url)
    scan = await sync_to_async(new_scan)(owner, tmp_path, 3)

    assert await Runner(max_in_flight=3).run_scan(scan.pk) == Scan.Status.DONE_WITH_ERRORS
    pages = await pages_of(scan)
    assert [page.status for page in pages] == [Page.Status.DONE, Page.Status.FAILED, Page.Status.DONE]
    assert pages[1].error == "The result could not be stored: ValueError: A string literal cannot contain NUL (0x00) characters."
    assert sorted(r["page_marker"] for r in server.requests()) == [1, 2, 3]
