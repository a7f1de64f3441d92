"""The per-page retry policy, against a scripted engine (the double-backed paths are in test_with_double)."""

from __future__ import annotations

import asyncio
import io
import random

import pytest
from PIL import Image

from scans.pipeline.errors import (
    ContextLimitExceeded,
    EmptyAnswer,
    OutputRejected,
    PermanentEngineError,
    RepetitiveOutput,
    TransientEngineError,
)
from scans.pipeline.page_ocr import (
    BACKOFF_CAP_S,
    backoff_delay,
    escalated_temperature,
    ocr_page_with_retries,
)
from scans.pipeline.types import PageImage, PageResult
from tests.scans.pipeline.helpers import marked_page, ocr_options

UPRIGHT = {"primary_language": "en", "is_rotation_valid": True, "rotation_correction": 0, "is_table": False, "is_diagram": False}


class ScriptedEngine:
    """Answers each call with the next scripted item: a PageResult, or an exception to raise."""

    name = "vllm"
    model = "scripted"

    def __init__(self, *script) -> None:
        self.script = list(script)
        self.calls: list[tuple[PageImage, float | None]] = []

    async def ocr_page(self, image, options, *, temperature=None):
        self.calls.append((image, temperature))
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    async def aclose(self) -> None:
        pass


class Sleeps(list):
    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


async def no_rerender(rotation: int) -> PageImage:
    raise AssertionError("no re-render expected")


async def test_first_attempt_succeeds() -> None:
    engine = ScriptedEngine(PageResult("PAGE 1", 10, 5, 80, "stop"))
    attempts = []

    async def on_attempt(n):
        attempts.append(n)

    outcome = await ocr_page_with_retries(engine, marked_page(1), ocr_options(), rerender=no_rerender, on_attempt=on_attempt)
    assert (outcome.status, outcome.text, outcome.attempts, outcome.fallback, outcome.error) == ("done", "PAGE 1", 1, False, "")
    assert (outcome.input_tokens, outcome.output_tokens, outcome.latency_ms, outcome.finish_reason) == (10, 5, 80, "stop")
    assert attempts == [1]
    assert engine.calls[0][1] == 0.0


async def test_transient_errors_back_off_then_succeed() -> None:
    engine = ScriptedEngine(
        TransientEngineError("500"),
        TransientEngineError("429", retry_after=12.5),
        TransientEngineError("refused"),
        PageResult("PAGE 1"),
    )
    sleeps = Sleeps()
    attempts = []

    async def on_attempt(n):
        attempts.append(n)

    outcome = await ocr_page_with_retries(
        engine, marked_page(1), ocr_options(page_retries=3), rerender=no_rerender, on_attempt=on_attempt,
        sleep=sleeps, rng=random.Random(1),
    )
    assert outcome.status == "done" and outcome.attempts == 4 and attempts == [1, 2, 3, 4]
    assert len(sleeps) == 3
    assert 0 <= sleeps[0] <= 1 and sleeps[1] >= 12.5 and 0 <= sleeps[2] <= 4
    assert [t for _, t in engine.calls] == [0.0] * 4  # transient errors do not change the temperature


def test_backoff_is_full_jitter_capped() -> None:
    rng = random.Random(7)
    for failures in range(1, 12):
        ceiling = min(BACKOFF_CAP_S, 2 ** (failures - 1))
        delays = [backoff_delay(failures, None, rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # spread over the whole range (full jitter)
    assert backoff_delay(1, 30.0, rng) == 30.0
    assert backoff_delay(1, 3600.0, rng) == BACKOFF_CAP_S


def test_temperature_ladder() -> None:
    assert [escalated_temperature(0.0, n) for n in range(8)] == [0.0, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 1.0]
    assert [escalated_temperature(0.3, n) for n in range(4)] == [0.3, 0.5, 0.8, 1.0]
    assert escalated_temperature(1.5, 3) == 1.5


async def test_rejected_output_escalates_temperature() -> None:
    engine = ScriptedEngine(
        OutputRejected("cut", text="PAGE 1 par", finish_reason="length", output_tokens=512),
        OutputRejected("cut", text="PAGE 1 part", finish_reason="length", output_tokens=512),
        PageResult("PAGE 1 whole", 100, 50, 10, "stop"),
    )
    sleeps = Sleeps()
    outcome = await ocr_page_with_retries(engine, marked_page(1), ocr_options(), rerender=no_rerender, sleep=sleeps)
    assert outcome.status == "done" and outcome.text == "PAGE 1 whole" and outcome.attempts == 3
    assert [t for _, t in engine.calls] == [0.0, 0.1, 0.2]
    assert outcome.output_tokens == 512 + 512 + 50  # every attempt is paid for
    assert sleeps == []


async def test_final_failure_keeps_last_output() -> None:
    engine = ScriptedEngine(*(OutputRejected("The answer was cut off", text=f"try {n}", finish_reason="length") for n in range(3)))
    outcome = await ocr_page_with_retries(engine, marked_page(1), ocr_options(page_retries=2), rerender=no_rerender)
    assert outcome.status == "failed" and outcome.attempts == 3
    assert outcome.text == "try 2" and outcome.finish_reason == "length"
    assert "cut off" in outcome.error and "3 attempts" in outcome.error


async def test_final_transient_failure_has_no_text_and_no_last_sleep() -> None:
    engine = ScriptedEngine(TransientEngineError("Cannot connect"), TransientEngineError("Cannot connect"))
    sleeps = Sleeps()
    outcome = await ocr_page_with_retries(engine, marked_page(1), ocr_options(page_retries=1), rerender=no_rerender, sleep=sleeps)
    assert outcome.status == "failed" and outcome.text == "" and outcome.attempts == 2
    assert outcome.error.startswith("Cannot connect")
    assert len(sleeps) == 1


async def test_fallback_text_after_failure() -> None:
    engine = ScriptedEngine(TransientEngineError("500"), TransientEngineError("500"))

    async def fallback():
        return "  Text layer of page 1 \n"

    outcome = await ocr_page_with_retries(
        engine, marked_page(1), ocr_options(page_retries=1), rerender=no_rerender, fallback_text=fallback, sleep=Sleeps()
    )
    assert (outcome.status, outcome.fallback, outcome.text) == ("done", True, "Text layer of page 1")
    assert "500" in outcome.error


async def test_empty_fallback_still_fails() -> None:
    engine = ScriptedEngine(OutputRejected("bad", text="junk"))

    async def fallback():
        return "   "

    outcome = await ocr_page_with_retries(
        engine, marked_page(1), ocr_options(page_retries=0), rerender=no_rerender, fallback_text=fallback
    )
    assert (outcome.status, outcome.fallback, outcome.text, outcome.attempts) == ("failed", False, "junk", 1)


async def test_permanent_error_is_raised_at_once() -> None:
    engine = ScriptedEngine(PermanentEngineError("The server does not serve model 'x'"), PageResult("never"))

    async def fallback():
        raise AssertionError("no fallback for a permanent error")

    with pytest.raises(PermanentEngineError, match="does not serve"):
        await ocr_page_with_retries(engine, marked_page(1), ocr_options(), rerender=no_rerender, fallback_text=fallback)
    assert len(engine.calls) == 1


async def test_rotation_correction_rerenders_and_accumulates() -> None:
    sideways = {**UPRIGHT, "is_rotation_valid": False, "rotation_correction": 90}
    engine = ScriptedEngine(
        PageResult("garbled", metadata=sideways),
        PageResult("still sideways", metadata=sideways),
        PageResult("PAGE 1", metadata=UPRIGHT),
    )
    rotations = []

    async def rerender(rotation):
        rotations.append(rotation)
        return marked_page(1, rotation=rotation)

    outcome = await ocr_page_with_retries(engine, marked_page(1), ocr_options(prompt_preset="olmocr"), rerender=rerender)
    assert rotations == [270, 180]  # each correction turns the previous image 90 degrees counter-clockwise
    assert [image.rotation for image, _ in engine.calls] == [0, 270, 180]
    assert outcome.status == "done" and outcome.text == "PAGE 1" and outcome.attempts == 3
    assert outcome.metadata["rotation_applied"] == 180


async def test_rotation_on_last_attempt_is_accepted() -> None:
    sideways = {**UPRIGHT, "is_rotation_valid": False, "rotation_correction": 270}
    engine = ScriptedEngine(PageResult("best effort", metadata=sideways))
    outcome = await ocr_page_with_retries(engine, marked_page(1), ocr_options(page_retries=0), rerender=no_rerender)
    assert outcome.status == "done" and outcome.text == "best effort"
    assert outcome.metadata["is_rotation_valid"] is False


async def test_cancellation_propagates_immediately() -> None:
    class Hanging(ScriptedEngine):
        async def ocr_page(self, image, options, *, temperature=None):
            await asyncio.sleep(60)

    task = asyncio.create_task(ocr_page_with_retries(Hanging(), marked_page(1), ocr_options(), rerender=no_rerender))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 1)


async def test_cancellation_during_backoff() -> None:
    engine = ScriptedEngine(TransientEngineError("500"), PageResult("never"))
    task = asyncio.create_task(ocr_page_with_retries(engine, marked_page(1), ocr_options(), rerender=no_rerender, sleep=lambda s: asyncio.sleep(60)))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 1)
    assert len(engine.calls) == 1


# --- answers that are judged: context, empty, loops -------------------------------------------------------


class RecordingEngine(ScriptedEngine):
    """Also records the max_tokens each call was given."""

    def __init__(self, *script) -> None:
        super().__init__(*script)
        self.max_tokens: list[int] = []

    async def ocr_page(self, image, options, *, temperature=None):
        self.max_tokens.append(options.max_tokens)
        return await super().ocr_page(image, options, temperature=temperature)


def too_long(kind="prompt", limit=8192, prompt=20000, **extra) -> ContextLimitExceeded:
    return ContextLimitExceeded("does not fit", too_long=kind, max_model_len=limit, prompt_tokens=prompt, max_tokens=4096, **extra)


async def test_a_page_that_does_not_fit_is_sent_smaller_without_using_a_retry() -> None:
    engine = RecordingEngine(too_long(), PageResult("PAGE 1", 9000, 40))
    outcome = await ocr_page_with_retries(
        engine, marked_page(1, size=(850, 1100)), ocr_options(page_retries=0, max_tokens=4096), rerender=no_rerender
    )
    assert outcome.status == "done" and outcome.text == "PAGE 1" and outcome.attempts == 2
    first, second = (image for image, _ in engine.calls)
    assert (first.width, first.height) == (850, 1100) and max(second.width, second.height) < 1100
    assert engine.max_tokens[0] == 4096 and engine.max_tokens[1] <= 4096
    assert [t for _, t in engine.calls] == [0.0, 0.0]  # not a rejected answer: same temperature


async def test_an_answer_cut_off_by_the_context_of_a_small_page_fails_keeping_its_text() -> None:
    cut = too_long("answer", 8192, 2000, text="PAGE 1 and then", finish_reason="length", input_tokens=2000, output_tokens=6192)
    engine = RecordingEngine(cut, PageResult("never"))
    outcome = await ocr_page_with_retries(engine, marked_page(1), ocr_options(), rerender=no_rerender)
    assert (outcome.status, outcome.text, outcome.attempts, outcome.finish_reason) == ("failed", "PAGE 1 and then", 1, "length")
    assert (outcome.input_tokens, outcome.output_tokens) == (2000, 6192) and len(engine.calls) == 1


async def test_an_empty_answer_falls_back_to_the_text_layer() -> None:
    engine = ScriptedEngine(EmptyAnswer("The model answered with no text."), EmptyAnswer("The model answered with no text."))

    async def fallback():
        return "Text layer of page 1"

    outcome = await ocr_page_with_retries(
        engine, marked_page(1), ocr_options(page_retries=1), rerender=no_rerender, fallback_text=fallback
    )
    assert (outcome.status, outcome.fallback, outcome.text) == ("done", True, "Text layer of page 1")
    assert [w["code"] for w in outcome.warnings] == ["fallback"]


async def test_a_persistent_loop_keeps_the_models_text_even_with_a_text_layer() -> None:
    engine = ScriptedEngine(RepetitiveOutput("The model looped", text="PAGE 1\n| a |", finish_reason="length"))

    async def fallback():
        raise AssertionError("the collapsed OCR text is kept")

    outcome = await ocr_page_with_retries(
        engine, marked_page(1), ocr_options(page_retries=0), rerender=no_rerender, fallback_text=fallback
    )
    assert (outcome.status, outcome.text, outcome.error) == ("done", "PAGE 1\n| a |", "")
    assert [w["code"] for w in outcome.warnings] == ["repetition"]


@pytest.mark.parametrize(("blank", "code"), [(True, "blank"), (False, "empty")])
async def test_an_engine_that_reads_nothing_gets_a_warning(blank: bool, code: str) -> None:
    image = marked_page(1)
    if blank:
        buffer = io.BytesIO()
        Image.new("L", (400, 520), 255).save(buffer, format="PNG")
        image = PageImage(number=1, data=buffer.getvalue(), mime="image/png", width=400, height=520)
    engine = ScriptedEngine(PageResult(""))  # e.g. the built-in engine on a page without text
    outcome = await ocr_page_with_retries(engine, image, ocr_options(), rerender=no_rerender)
    assert (outcome.status, outcome.attempts) == ("done", 1) and [w["code"] for w in outcome.warnings] == [code]
