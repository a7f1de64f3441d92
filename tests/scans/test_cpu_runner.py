"""The real runner with the real CPU engines: each scan is read with the engine and language it names,
a CPU scan holds no more pages than the cores can read (plus a small look-ahead) while other scans take
the rest of the budget, and Cancel drops the pages that have not started and stops the running ones at
their next checkpoint.

Pages are held inside the Tesseract engine (its page function waits for the test), so nothing depends
on how fast the machine reads; timeouts are only a safety net.
"""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from django.core.management import CommandError, call_command

from scans import services
from scans.models import Page, Scan, Worker
from scans.pipeline import tesseract_engine
from scans.pipeline.cpu import LOOKAHEAD, JobCancelled, claim_limit, cpu_pool
from scans.pipeline.runner import Runner
from scans.uploads import create_scan_from_path
from tests.conftest import stored_files
from tests.scans.conftest import new_scan, use_external
from tests.scans.ocr_corpus import image_only_pdf, make_born_digital_pdf, render_pdf_pages
from tests.scans.test_cpu_pool import SAFETY_S, Gate
from vllm_control.models import VLMSettings

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(180)]


@pytest.fixture(autouse=True)
def short_knobs(monkeypatch):
    monkeypatch.setenv("OCRSITE_RUNNER_POLL_MS", "100")


def line_pdf(path: Path, lines: list[str]) -> Path:
    """A scan-like (image-only) PDF with one line of text per page (Helvetica, which has ä, ö and ß)."""
    born = make_born_digital_pdf(path.with_suffix(".born.pdf"), [[[line]] for line in lines])
    return image_only_pdf(path, render_pdf_pages(born, dpi=100), dpi=100)


def line_scan(owner, folder: Path, name: str, lines: list[str], options: dict | None = None) -> Scan:
    return create_scan_from_path(owner=owner, path=line_pdf(folder / name, lines), options=options)


def save_settings(**fields) -> None:
    row = VLMSettings.load()
    for name, value in fields.items():
        setattr(row, name, value)
    row.save()


async def until(condition) -> None:
    """Wait for a state the runner reaches in its own time: `condition()` (a bool, or a coroutine giving
    one) is checked every 10 ms; the timeout is only a safety net."""
    async with asyncio.timeout(SAFETY_S):
        while True:
            met = condition()
            if await met if inspect.isawaitable(met) else met:
                return
            await asyncio.sleep(0.01)


async def running_pages(scan: Scan) -> int:
    return await Page.objects.filter(scan=scan, status=Page.Status.RUNNING).acount()


async def two_more_heartbeats(worker_id: str) -> None:
    """Two more rounds of the runner's periodic work (each claims again as well): the state seen after
    them is the one it keeps."""
    for _ in range(2):
        before = (await Worker.objects.aget(worker_id=worker_id)).heartbeat_at

        async def beat() -> bool:
            return (await Worker.objects.aget(worker_id=worker_id)).heartbeat_at > before

        await until(beat)


@pytest.fixture
async def held_pages(monkeypatch):
    """Tesseract's page function held at its start until `gate.release` is set; `outcomes` says whether
    each held page was then read or stopped at a checkpoint."""
    gate = Gate(asyncio.get_running_loop())
    outcomes: list[str] = []
    real_read_page = tesseract_engine.read_page

    def held_read_page(data: bytes, tessdata: str, language: str):
        gate.enter(data)
        try:
            reading = real_read_page(data, tessdata, language)
        except JobCancelled:
            outcomes.append("stopped")
            raise
        else:
            outcomes.append("read")
            return reading
        finally:
            gate.leave(data)

    monkeypatch.setattr(tesseract_engine, "read_page", held_read_page)
    yield gate, outcomes
    gate.release.set()  # never leave a worker thread held


async def test_a_cpu_scan_holds_only_what_the_cores_can_read_and_cancel_drops_the_rest(owner, tmp_path, held_pages):
    gate, outcomes = held_pages
    pool, limit = cpu_pool(), claim_limit()
    assert limit == pool.size + LOOKAHEAD
    await sync_to_async(save_settings)(mode="builtin", max_in_flight=limit + 8)
    total = limit + 6
    scan = await sync_to_async(line_scan)(owner, tmp_path, "long.pdf", [f"Page {n}" for n in range(1, total + 1)])
    started_before = pool.started
    runner = Runner()  # the settings' budget: room for every page of the scan
    task = asyncio.create_task(runner.run_scan(scan.pk))

    # Every core holds a page, LOOKAHEAD more are rendered and queued for a core, the rest wait in the
    # database (pending), and later claims take no more.
    await gate.until(lambda: len(gate.started) == pool.size)

    await until(lambda: pool.waiting == LOOKAHEAD)  # the look-ahead pages wait for a core
    await two_more_heartbeats(runner.worker_id)
    assert await running_pages(scan) == limit
    assert await Page.objects.filter(scan=scan, status=Page.Status.PENDING).acount() == total - limit
    assert (pool.running, pool.waiting) == (pool.size, LOOKAHEAD)

    assert await sync_to_async(services.cancel_scan)(scan=scan)
    # The runner is done while the running pages are still held: Cancel waits for none of them.
    assert await asyncio.wait_for(task, SAFETY_S) == Scan.Status.CANCELLED
    assert pool.waiting == 0, "the look-ahead pages left the queue without starting"
    assert len(gate.started) == pool.size and not gate.finished
    assert {page.status async for page in Page.objects.filter(scan=scan)} == {Page.Status.PENDING}

    gate.release.set()
    await gate.until(lambda: len(gate.finished) == pool.size)
    assert outcomes == ["stopped"] * pool.size, "each running page stopped at its next checkpoint"
    await until(lambda: pool.running == 0)
    assert pool.started - started_before == pool.size  # no other page ever started
    assert await Page.objects.filter(scan=scan, status=Page.Status.DONE).acount() == 0


async def test_cpu_scans_leave_the_rest_of_the_budget_to_the_model_servers_scans(owner, tmp_path, fake, held_pages):
    gate, _ = held_pages
    server = fake(FAKE_VLLM_LATENCY=60)  # no answer within the test: its pages stay in flight
    limit = claim_limit()
    extra = 3
    await sync_to_async(use_external)(server.base_url, max_in_flight=limit + extra)
    cpu_scan = await sync_to_async(line_scan)(owner, tmp_path, "cpu.pdf", ["CPU"] * (limit + 4), {"engine": "tesseract"})
    vllm_scan = await sync_to_async(new_scan)(owner, tmp_path, 3 * extra, name="vlm.pdf")
    runner = Runner()
    task = asyncio.create_task(runner.run_scans([cpu_scan.pk, vllm_scan.pk]))
    try:
        async def budget_spent() -> bool:
            return await running_pages(cpu_scan) + await running_pages(vllm_scan) == limit + extra

        await until(budget_spent)
        await two_more_heartbeats(runner.worker_id)
        assert (await running_pages(cpu_scan), await running_pages(vllm_scan)) == (limit, extra)
    finally:
        await runner.stop()
        await asyncio.wait_for(task, SAFETY_S)
    # Stopping gave every page back.
    assert await Page.objects.filter(status=Page.Status.RUNNING).acount() == 0


async def test_each_scan_is_read_with_its_engine_and_language(owner, tmp_path):
    # The settings: Built-in (CPU) mode with RapidOCR chosen as its engine.
    await sync_to_async(save_settings)(mode="builtin", cpu_engine="rapidocr", page_retries=0)
    default = await sync_to_async(line_scan)(owner, tmp_path, "default.pdf", ["Reading order"])
    german = await sync_to_async(line_scan)(
        owner, tmp_path, "german.pdf", ["Größe der Straße"], {"engine": "tesseract", "language": "deu"}
    )
    old = await sync_to_async(line_scan)(owner, tmp_path, "old.pdf", ["Older scans"], {"engine": "builtin"})
    # A language whose trained data went away after the scan was queued: the scan fails, saying so.
    gone = await sync_to_async(line_scan)(owner, tmp_path, "gone.pdf", ["Bonjour"], {"engine": "tesseract", "language": "fra"})

    statuses = await Runner(max_in_flight=4).run_scans([default.pk, german.pk, old.pk, gone.pk])

    scans = {scan.pk: scan async for scan in Scan.objects.all()}
    texts = {page.scan_id: page.text async for page in Page.objects.all()}
    assert statuses == {default.pk: "done", german.pk: "done", old.pk: "done", gone.pk: "failed"}
    assert [scans[s.pk].engine for s in (default, german, old)] == ["rapidocr", "tesseract", "rapidocr"]
    assert scans[german.pk].model.endswith(" deu")
    assert texts[default.pk] == "Reading order" and texts[old.pk] == "Older scans"
    assert texts[german.pk] == "Größe der Straße"
    assert "Tesseract language fra is not installed" in scans[gone.pk].error
    assert "To add it" in scans[gone.pk].error


def test_the_ocr_command_refuses_a_language_that_is_not_installed_before_queueing_anything(tmp_path, settings):
    pdf = line_pdf(tmp_path / "letter.pdf", ["Bonjour"])
    with pytest.raises(CommandError) as refused:
        call_command("ocr", str(pdf), "--engine", "tesseract", "--lang", "eng+fra", "--out", str(tmp_path / "out"))
    assert str(refused.value).startswith("Tesseract language fra is not installed (installed in")
    assert "To add it: copy fra.traineddata" in str(refused.value)
    assert Scan.objects.count() == 0
    assert stored_files(settings.MEDIA_ROOT) == []
    assert not (tmp_path / "out" / "letter.md").exists()
