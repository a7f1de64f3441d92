"""One page's error never costs the others (the web runner, `Runner` against the real database and the
vLLM double): a page that never fits the model's context fails alone; answers that arrive while a scan is
failing or being cancelled are committed and exported; Retry sends only the pages that are missing."""

from __future__ import annotations

import asyncio
import json

import pytest
from asgiref.sync import sync_to_async

from scans import exports, services
from scans.models import Page, Scan
from scans.pipeline.context import MIN_LONGEST_SIDE
from scans.pipeline.runner import Runner
from tests.scans.conftest import new_scan, use_external
from tests.scans.test_runner import pages_of, short_knobs  # noqa: F401 - short_knobs is an autouse fixture

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]


async def wait_for(predicate, message: str, timeout: float = 20) -> None:
    for _ in range(int(timeout / 0.05)):
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {message}")


async def exported(scan: Scan) -> dict[str, str]:
    scan = await Scan.objects.aget(pk=scan.pk)
    return {fmt: await sync_to_async(exports.render)(scan, fmt) for fmt in ("md", "txt", "json")}


def assert_exported(outputs: dict[str, str], done: list[int], missing: list[int]) -> None:
    for number in done:
        assert f"PAGE {number}\n" in outputs["md"] and f"PAGE {number}\n" in outputs["txt"]
    for number in missing:
        assert f"PAGE {number}\n" not in outputs["md"]
    statuses = {page["number"]: page["status"] for page in json.loads(outputs["json"])["pages"]}
    assert all(statuses[number] == "done" for number in done)


async def test_a_page_that_never_fits_the_context_fails_alone(fake, owner, tmp_path):
    # Page 2 costs 400 x the tokens of a page its size: too many for the double's max_model_len (32768)
    # even at the smallest size ocrsite tries.
    server = fake(FAKE_VLLM_PAGE_TOKEN_FACTOR="2:400")
    await sync_to_async(use_external)(server.base_url)
    scan = await sync_to_async(new_scan)(owner, tmp_path, 3)

    assert await Runner(max_in_flight=4).run_scan(scan.pk) == Scan.Status.DONE_WITH_ERRORS

    one, two, three = await pages_of(scan)
    assert (one.status, three.status, two.status) == (Page.Status.DONE, Page.Status.DONE, Page.Status.FAILED)
    assert one.text.startswith("# PAGE 1\n") and three.text.startswith("# PAGE 3\n") and two.text == ""
    assert two.error.startswith("The page does not fit the model's context (32768 tokens): The decoder prompt")
    assert 'Lower "Target longest side" or "Max tokens"' in two.error and two.attempts == 2
    requests = server.requests()
    assert sorted(r["page_marker"] for r in requests) == [1, 2, 2, 3]
    assert [max(r["image_size"]) for r in requests if r["page_marker"] == 2] == [1288, MIN_LONGEST_SIDE]
    outputs = await exported(scan)
    assert_exported(outputs, done=[1, 3], missing=[2])
    assert "<!-- OCR failed: The page does not fit" in exports.split_markdown(outputs["md"])[2]
    assert outputs["md"].index("PAGE 1\n") < outputs["md"].index("OCR failed: The page does not fit") < outputs["md"].index("PAGE 3\n")


async def test_answers_in_flight_are_kept_when_an_error_fails_the_scan(fake, owner, tmp_path):
    script = {"1": ["hold"], "2": ["401"], "3": ["hold"]}  # the API key is revoked while pages 1 and 3 are out
    server = fake(FAKE_VLLM_SCRIPT=json.dumps(script))
    await sync_to_async(use_external)(server.base_url)
    scan = await sync_to_async(new_scan)(owner, tmp_path, 5)
    task = asyncio.create_task(Runner(max_in_flight=3).run_scan(scan.pk))

    async def rejected() -> bool:
        return any(r["outcome"] == "401" for r in server.requests())

    await wait_for(rejected, "the 401")
    (server.state_dir / "release").touch()  # the held answers arrive while the scan is failing
    assert await asyncio.wait_for(task, 20) == Scan.Status.FAILED

    scan = await Scan.objects.aget(pk=scan.pk)
    assert "rejected the API key (401)" in scan.error
    pages = await pages_of(scan)
    assert [p.status for p in pages] == [Page.Status.DONE, Page.Status.PENDING, Page.Status.DONE, Page.Status.PENDING, Page.Status.PENDING]
    assert sorted(r["page_marker"] for r in server.requests()) == [1, 2, 3]  # nothing sent after the 401
    assert_exported(await exported(scan), done=[1, 3], missing=[2, 4, 5])

    good = fake()
    await sync_to_async(use_external)(good.base_url)
    assert await sync_to_async(services.retry_failed_pages)(scan=scan) == 3
    assert await Runner(max_in_flight=3).run_scan(scan.pk) == Scan.Status.DONE
    assert sorted(r["page_marker"] for r in good.requests()) == [2, 4, 5]  # only what was missing
    assert_exported(await exported(scan), done=[1, 2, 3, 4, 5], missing=[])


async def test_a_cancelled_scan_keeps_and_exports_the_pages_that_were_read(fake, owner, tmp_path):
    server = fake(FAKE_VLLM_SCRIPT=json.dumps({"2": ["hold"], "3": ["hold"]}))
    await sync_to_async(use_external)(server.base_url)
    scan = await sync_to_async(new_scan)(owner, tmp_path, 3)
    task = asyncio.create_task(Runner(max_in_flight=3).run_scan(scan.pk))

    async def page_one_done_and_others_held() -> bool:
        held = sum(r["outcome"] == "hold" for r in server.requests())
        return held == 2 and await Page.objects.filter(scan=scan, number=1, status=Page.Status.DONE).aexists()

    await wait_for(page_one_done_and_others_held, "page 1 to be read and pages 2-3 to be held")
    assert await sync_to_async(services.cancel_scan)(scan=scan)
    assert await asyncio.wait_for(task, 20) == Scan.Status.CANCELLED

    assert [p.status for p in await pages_of(scan)] == [Page.Status.DONE, Page.Status.PENDING, Page.Status.PENDING]
    assert_exported(await exported(scan), done=[1], missing=[2, 3])

    good = fake()
    await sync_to_async(use_external)(good.base_url)
    assert await sync_to_async(services.retry_failed_pages)(scan=scan) == 2
    assert await Runner(max_in_flight=3).run_scan(scan.pk) == Scan.Status.DONE
    assert sorted(r["page_marker"] for r in good.requests()) == [2, 3]


async def test_no_page_is_sent_after_an_error_that_fails_the_scan(fake, owner, tmp_path):
    server = fake(FAKE_VLLM_SCRIPT=json.dumps({"1": ["hold:401"]}))
    await sync_to_async(use_external)(server.base_url)
    scan = await sync_to_async(new_scan)(owner, tmp_path, 3)
    task = asyncio.create_task(Runner(max_in_flight=1).run_scan(scan.pk))

    async def held() -> bool:
        return bool(server.requests())

    await wait_for(held, "page 1 to be held")
    # Page 2 is rendered meanwhile and waits for the one slot, which page 1's 401 frees. (Passing does not
    # depend on this wait: without it page 2 may simply not be waiting yet.)
    await asyncio.sleep(0.3)
    (server.state_dir / "release").touch()
    assert await asyncio.wait_for(task, 20) == Scan.Status.FAILED
    assert [r["page_marker"] for r in server.requests()] == [1]
    assert {p.status for p in await pages_of(scan)} == {Page.Status.PENDING}
