"""Rendering + the vLLM engine + the retry policy against the vLLM test double, a real process on a real port."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
import json
from pathlib import Path

import pytest

from scans.pipeline.errors import PermanentEngineError
from scans.pipeline.page_ocr import ocr_page_with_retries
from scans.pipeline.page_source import PageSource
from scans.pipeline.render import pdf_page_text, render_page_sync
from tests.fakes.pages import make_pdf
from tests.scans.pipeline.helpers import (
    MODEL,
    FakeServer,
    Sleeps,
    engine_for,
    fake_vllm,
    marked_page,
    no_rerender,
    ocr_options,
    sent,
    start_fake_vllm,
    stop_fake_vllm,
)

# Pages (by marker) whose successive requests the shared double answers as scripted, then "ok".
SCRIPT = {
    "101": ["500", "500"],
    "102": ["429"],
    "103": ["length", "length"],
    "104": ["garbage"],
    "105": ["500", "500"],
    "106": ["length", "length", "length"],
    "107": ["drop"],
}
ROTATED = 120


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> FakeServer:
    server = start_fake_vllm(
        tmp_path_factory.mktemp("double"),
        env={
            "FAKE_VLLM_SCRIPT": json.dumps(SCRIPT),
            "FAKE_VLLM_RETRY_AFTER": "5",
            "FAKE_VLLM_ROTATED_PAGES": str(ROTATED),
        },
    )
    yield server
    stop_fake_vllm(server)


async def test_each_page_text_comes_from_that_page(server: FakeServer, tmp_path: Path) -> None:
    path = make_pdf(tmp_path / "doc.pdf", 12, numbers=range(1, 13))
    engine = engine_for(server)
    options = ocr_options()
    try:
        with ThreadPoolExecutor(2) as executor:
            source = PageSource(path, "application/pdf", longest_side=1288, image_format="png", executor=executor)
            pages = await asyncio.gather(*(source.render(n) for n in range(1, 13)))
            source.close()
        results = await asyncio.gather(*(engine.ocr_page(page, options) for page in pages))
    finally:
        await engine.aclose()
    for number, result in enumerate(results, start=1):
        assert result.text.startswith(f"# PAGE {number}\n"), result.text
        assert result.finish_reason == "stop" and result.input_tokens > 0 and result.output_tokens > 0


async def test_jpeg_pages_are_read_too(server: FakeServer, tmp_path: Path) -> None:
    path = make_pdf(tmp_path / "doc.pdf", 2, numbers=[41, 42])
    engine = engine_for(server)
    try:
        page = render_page_sync(path, "application/pdf", 2, longest_side=1288, image_format="jpeg")
        result = await engine.ocr_page(page, ocr_options(image_format="jpeg"))
    finally:
        await engine.aclose()
    assert "PAGE 42" in result.text


async def test_500s_are_retried(server: FakeServer) -> None:
    engine, sleeps = engine_for(server), Sleeps()
    try:
        outcome = await ocr_page_with_retries(engine, marked_page(101), ocr_options(), rerender=no_rerender, sleep=sleeps)
    finally:
        await engine.aclose()
    assert outcome.status == "done" and "PAGE 101" in outcome.text and outcome.attempts == 3
    assert [e["outcome"] for e in sent(server, 101)] == ["500", "500", "ok"]
    assert len(sleeps) == 2 and all(0 <= s <= 2 for s in sleeps)


async def test_429_honours_retry_after(server: FakeServer) -> None:
    engine, sleeps = engine_for(server), Sleeps()
    try:
        outcome = await ocr_page_with_retries(engine, marked_page(102), ocr_options(), rerender=no_rerender, sleep=sleeps)
    finally:
        await engine.aclose()
    assert outcome.status == "done" and outcome.attempts == 2
    assert sleeps == [5.0]
    assert [e["outcome"] for e in sent(server, 102)] == ["429", "ok"]


async def test_dropped_connection_is_retried(server: FakeServer) -> None:
    engine = engine_for(server)
    try:
        outcome = await ocr_page_with_retries(engine, marked_page(107), ocr_options(), rerender=no_rerender, sleep=Sleeps())
    finally:
        await engine.aclose()
    assert outcome.status == "done" and outcome.attempts == 2 and "PAGE 107" in outcome.text


async def test_length_escalates_temperature(server: FakeServer) -> None:
    engine = engine_for(server)
    try:
        outcome = await ocr_page_with_retries(engine, marked_page(103), ocr_options(temperature=0.0), rerender=no_rerender)
    finally:
        await engine.aclose()
    assert outcome.status == "done" and outcome.attempts == 3 and outcome.finish_reason == "stop"
    assert [(e["outcome"], e["temperature"]) for e in sent(server, 103)] == [("length", 0.0), ("length", 0.1), ("ok", 0.2)]


async def test_unparsable_olmocr_output_is_retried(server: FakeServer) -> None:
    engine = engine_for(server)
    try:
        outcome = await ocr_page_with_retries(engine, marked_page(104), ocr_options(prompt_preset="olmocr"), rerender=no_rerender)
    finally:
        await engine.aclose()
    assert outcome.status == "done" and outcome.attempts == 2
    assert outcome.text.startswith("# PAGE 104")
    assert outcome.metadata == {
        "primary_language": "en", "is_rotation_valid": True, "rotation_correction": 0, "is_table": False, "is_diagram": False,
    }
    assert [e["temperature"] for e in sent(server, 104)] == [0.0, 0.1]


async def test_rotation_correction_rerenders(server: FakeServer, tmp_path: Path) -> None:
    path = make_pdf(tmp_path / "doc.pdf", 1, numbers=[ROTATED])
    options = ocr_options(prompt_preset="olmocr")
    first = render_page_sync(path, "application/pdf", 1, longest_side=1288, image_format="png")
    rotations = []

    async def rerender(rotation: int):
        rotations.append(rotation)
        return await asyncio.to_thread(
            render_page_sync, path, "application/pdf", 1, longest_side=1288, image_format="png", rotation=rotation
        )

    engine = engine_for(server)
    try:
        outcome = await ocr_page_with_retries(engine, first, options, rerender=rerender)
    finally:
        await engine.aclose()
    assert rotations == [270]
    assert outcome.status == "done" and outcome.attempts == 2 and "PAGE 120" in outcome.text
    assert outcome.metadata["is_rotation_valid"] is True and outcome.metadata["rotation_applied"] == 270
    assert len(sent(server, ROTATED)) == 2


async def test_fallback_to_the_text_layer(server: FakeServer, tmp_path: Path) -> None:
    path = make_pdf(tmp_path / "doc.pdf", 1, numbers=[105], text_layer=True)
    page = render_page_sync(path, "application/pdf", 1, longest_side=1288, image_format="png")

    async def fallback() -> str:
        return await asyncio.to_thread(pdf_page_text, path, 1)

    engine = engine_for(server)
    try:
        outcome = await ocr_page_with_retries(
            engine, page, ocr_options(page_retries=1), rerender=no_rerender, fallback_text=fallback, sleep=Sleeps()
        )
    finally:
        await engine.aclose()
    assert (outcome.status, outcome.fallback, outcome.text) == ("done", True, "Text layer of page 105")
    assert "500" in outcome.error and outcome.attempts == 2


async def test_final_failure_keeps_the_truncated_output(server: FakeServer) -> None:
    engine = engine_for(server)
    try:
        outcome = await ocr_page_with_retries(engine, marked_page(106), ocr_options(page_retries=2), rerender=no_rerender)
    finally:
        await engine.aclose()
    assert outcome.status == "failed" and outcome.attempts == 3 and outcome.finish_reason == "length"
    assert outcome.text.startswith("# PAGE 106") and "second point" not in outcome.text
    assert "cut off" in outcome.error


async def test_unknown_model_is_permanent(server: FakeServer) -> None:
    engine = engine_for(server, model="nobody/serves-this")
    try:
        with pytest.raises(PermanentEngineError) as caught:
            await ocr_page_with_retries(engine, marked_page(1), ocr_options(), rerender=no_rerender)
    finally:
        await engine.aclose()
    assert str(caught.value) == f"The server does not serve model 'nobody/serves-this' (it serves: {MODEL})."


async def test_api_key(tmp_path: Path) -> None:
    with fake_vllm(tmp_path, args=["--api-key", "k-123"]) as server:
        for key, expected in (("", "rejected the API key"), ("wrong", "rejected the API key")):
            engine = engine_for(server, api_key=key)
            try:
                with pytest.raises(PermanentEngineError, match=expected):
                    await engine.ocr_page(marked_page(3), ocr_options())
            finally:
                await engine.aclose()
        engine = engine_for(server, api_key="k-123")
        try:
            assert "PAGE 3" in (await engine.ocr_page(marked_page(3), ocr_options())).text
        finally:
            await engine.aclose()


async def test_connection_refused_until_the_server_is_up(tmp_path: Path) -> None:
    server = start_fake_vllm(tmp_path, env={"FAKE_VLLM_STARTUP_DELAY": "1.0"}, wait=False)
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        await asyncio.sleep(0.4)

    engine = engine_for(server)
    try:
        outcome = await ocr_page_with_retries(engine, marked_page(8), ocr_options(page_retries=10), rerender=no_rerender, sleep=sleep)
    finally:
        await engine.aclose()
        stop_fake_vllm(server)
    assert outcome.status == "done" and "PAGE 8" in outcome.text
    assert outcome.attempts >= 2 and len(sleeps) == outcome.attempts - 1


async def test_timeout_is_retried_then_fails(tmp_path: Path) -> None:
    with fake_vllm(tmp_path, env={"FAKE_VLLM_LATENCY": "5"}) as server:
        engine = engine_for(server, timeout_s=0.5)
        sleeps = Sleeps()
        try:
            outcome = await ocr_page_with_retries(engine, marked_page(9), ocr_options(page_retries=1), rerender=no_rerender, sleep=sleeps)
        finally:
            await engine.aclose()
    assert outcome.status == "failed" and outcome.attempts == 2 and len(sleeps) == 1
    assert "did not answer within 0.5 s" in outcome.error


async def test_cancellation_during_a_slow_request_is_prompt(tmp_path: Path) -> None:
    with fake_vllm(tmp_path, env={"FAKE_VLLM_LATENCY": "30"}) as server:
        engine = engine_for(server, timeout_s=60)
        try:
            task = asyncio.create_task(ocr_page_with_retries(engine, marked_page(10), ocr_options(), rerender=no_rerender))
            await asyncio.sleep(0.5)
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 5)  # not the 30 s the server would take
        finally:
            await engine.aclose()
