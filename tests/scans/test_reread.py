"""Single pages read again by the runner against the vLLM test double: with another prompt or model
than the rest of the scan, the previous text kept until the new one arrives, and a new reading that
fails costing that reading only."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import sync_to_async

from scans import exports, services
from scans.models import Page, Scan
from scans.pipeline.runner import Runner
from tests.scans.conftest import new_scan, use_external
from tests.scans.pipeline.helpers import MODEL

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]


@pytest.fixture(autouse=True)
def short_knobs(monkeypatch, settings, tmp_path):
    monkeypatch.setenv("OCRSITE_RUNNER_POLL_MS", "200")
    settings.MEDIA_ROOT = tmp_path / "media"


async def page(scan: Scan, number: int) -> Page:
    return await Page.objects.aget(scan=scan, number=number)


async def read_again(scan: Scan, number: int, **options: str) -> None:
    assert await sync_to_async(services.reread_page)(page=await page(scan, number), options=options)


async def done_scan(fake, owner, tmp_path, pages: int, **env) -> tuple[object, Scan]:
    server = fake(**env)
    await sync_to_async(use_external)(server.base_url)
    scan = await sync_to_async(new_scan)(owner, tmp_path, pages)
    assert await Runner(max_in_flight=2).run_scan(scan.pk) == Scan.Status.DONE
    return server, scan


async def test_pages_read_again_with_other_prompts_each_get_their_own(fake, owner, tmp_path):
    server, scan = await done_scan(fake, owner, tmp_path, 3)
    first = (await page(scan, 1)).text
    assert "first point of page 1" in first  # the Markdown prompt's answer has a list
    await read_again(scan, 1, prompt="olmocr")
    await read_again(scan, 2, prompt="markdown", model=MODEL)

    assert await Runner(max_in_flight=2).run_scan(scan.pk) == Scan.Status.DONE
    one, two, three = [await page(scan, n) for n in (1, 2, 3)]
    # olmOCR's answer has front matter (parsed into metadata) and no list.
    assert one.text == "# PAGE 1\n\nText of page 1." and one.metadata.get("primary_language") == "en"
    assert "first point of page 2" in two.text and two.metadata == {}
    assert (one.engine, one.model, one.reocr_options) == ("vllm", MODEL, None)
    assert three.finished_at < one.finished_at  # page 3 was not read again
    assert sorted(r["page_marker"] for r in server.requests()) == [1, 1, 2, 2, 3]
    scan = await Scan.objects.aget(pk=scan.pk)
    assert scan.engine == "vllm" and scan.model == MODEL


async def test_the_previous_text_stays_until_the_new_reading_arrives(fake, owner, tmp_path):
    server, scan = await done_scan(fake, owner, tmp_path, 2, FAKE_VLLM_SCRIPT='{"2": ["ok", "hold"]}')
    before = (await page(scan, 2)).text
    await read_again(scan, 2, prompt="olmocr")
    task = asyncio.create_task(Runner(max_in_flight=2).run_scan(scan.pk))

    async def held() -> bool:
        return sum(1 for r in server.requests() if r["page_marker"] == 2) == 2

    for _ in range(500):
        if await held():
            break
        await asyncio.sleep(0.02)
    assert await held()
    current = await page(scan, 2)
    assert current.status == Page.Status.RUNNING and current.text == before
    markdown = await sync_to_async(exports.export_markdown)(await Scan.objects.aget(pk=scan.pk))
    assert exports.split_markdown(markdown)[2] == before

    (server.state_dir / "release-2").touch()
    assert await asyncio.wait_for(task, 30) == Scan.Status.DONE
    assert (await page(scan, 2)).text == "# PAGE 2\n\nText of page 2."


async def test_a_model_the_server_does_not_serve_fails_only_that_reading(fake, owner, tmp_path):
    _, scan = await done_scan(fake, owner, tmp_path, 2)
    before = (await page(scan, 1)).text
    await read_again(scan, 1, model="no/such-model")
    await read_again(scan, 2, prompt="olmocr")

    assert await Runner(max_in_flight=2).run_scan(scan.pk) == Scan.Status.DONE
    one, two = await page(scan, 1), await page(scan, 2)
    assert one.status == Page.Status.DONE and one.text == before and one.reocr_options is None
    assert [w["code"] for w in one.warnings] == ["reread_failed"] and "no/such-model" in one.warnings[0]["message"]
    assert two.text == "# PAGE 2\n\nText of page 2."
    scan = await Scan.objects.aget(pk=scan.pk)
    assert scan.error == "" and scan.model == MODEL
