"""Model-server answers from the real world, through the real engine client and the retry policy against
the vLLM test double: reasoning models, empty answers and blank pages, context limits, proxies' error pages
and runaway loops. Each test checks the page's status, text and warnings, and the exact requests sent."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from scans.pipeline.context import MIN_LONGEST_SIDE, estimated_prompt_tokens
from scans.pipeline.page_ocr import ocr_page_with_retries
from scans.pipeline.prompts import MARKDOWN_PROMPT
from scans.pipeline.types import PageImage, PageResult
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

pytestmark = pytest.mark.timeout(60)

# Pages (by marker) whose successive requests the shared double answers as scripted, then "ok".
SCRIPT = {
    "201": ["think_forever"] * 4,
    "202": ["empty"] * 4,
    "203": ["empty"],
    "204": ["loop"],
    "205": ["loop"] * 4,
    "206": ["loop_phrase"] * 4,
    "207": ["html_502"],
    "208": ["html_503"],
    "209": ["html_504"],
    "210": ["html_502"] * 4,
}
ESCALATING = [0.0, 0.1, 0.2, 0.3]  # the temperatures of four attempts from 0.0


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> FakeServer:
    server = start_fake_vllm(tmp_path_factory.mktemp("double"), env={"FAKE_VLLM_SCRIPT": json.dumps(SCRIPT)})
    yield server
    stop_fake_vllm(server)


async def read(server: FakeServer, image: PageImage, **options) -> tuple[PageResult, Sleeps]:
    engine, sleeps = engine_for(server), Sleeps()
    try:
        outcome = await ocr_page_with_retries(engine, image, ocr_options(**options), rerender=no_rerender, sleep=sleeps)
    finally:
        await engine.aclose()
    return outcome, sleeps


# --- 1. reasoning models -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "args"),
    [
        ({"FAKE_VLLM_THINKING": "inline"}, []),  # <think>...</think> in the content
        ({"FAKE_VLLM_THINKING": "template"}, []),  # ...</think>: the chat template opened the block
        ({"FAKE_VLLM_THINKING": "inline"}, ["--reasoning-parser", "qwen3"]),  # content + reasoning_content
        ({"FAKE_VLLM_THINKING": "template", "FAKE_VLLM_REASONING_FIELD": "reasoning"}, ["--reasoning-parser", "deepseek_r1"]),
    ],
)
async def test_a_reasoning_models_page_is_its_answer_without_the_reasoning(tmp_path: Path, env, args) -> None:
    with fake_vllm(tmp_path, env=env, args=args) as server:
        outcome, _ = await read(server, marked_page(11))
        assert len(sent(server, 11)) == 1
    assert outcome.status == "done" and outcome.attempts == 1 and outcome.warnings == []
    assert outcome.text.startswith("# PAGE 11\n\nText of page 11.") and "let me look" not in outcome.text.lower()
    assert "think>" not in outcome.text


@pytest.mark.parametrize("args", [[], ["--reasoning-parser", "qwen3"]])
async def test_reasoning_only_is_retried_then_fails_saying_what_to_change(tmp_path: Path, args) -> None:
    env = {"FAKE_VLLM_SCRIPT": json.dumps({"201": ["think_forever"] * 4})}
    with fake_vllm(tmp_path, env=env, args=args) as server:
        outcome, _ = await read(server, marked_page(201))
        requests = sent(server, 201)
    assert outcome.status == "failed" and outcome.attempts == 4 and outcome.text == ""
    assert outcome.error.startswith("The model answered with its reasoning only, no transcription (it was still thinking")
    assert 'Extra request body", e.g. {"chat_template_kwargs": {"enable_thinking": false}}' in outcome.error
    assert "non-reasoning (Instruct) model" in outcome.error and outcome.error.endswith("(after 4 attempts)")
    assert [r["temperature"] for r in requests] == ESCALATING and all(r["max_tokens"] == 512 for r in requests)
    assert outcome.output_tokens == 4 * 512  # every attempt is paid for


async def test_a_cut_off_answer_without_tags_is_reasoning_once_the_template_is_known_to_open_it(tmp_path: Path) -> None:
    # Served without a reasoning parser, a model whose chat template opens <think> that runs out of tokens
    # while thinking writes no tag at all; its earlier answers (...</think>) told the engine how it thinks.
    env = {"FAKE_VLLM_THINKING": "template", "FAKE_VLLM_SCRIPT": json.dumps({"18": ["think_forever"] * 2})}
    with fake_vllm(tmp_path, env=env) as server:
        engine = engine_for(server)
        try:
            first = await ocr_page_with_retries(engine, marked_page(17), ocr_options(page_retries=1), rerender=no_rerender)
            second = await ocr_page_with_retries(engine, marked_page(18), ocr_options(page_retries=1), rerender=no_rerender)
        finally:
            await engine.aclose()
        assert [r["outcome"] for r in sent(server, 18)] == ["think_forever"] * 2
    assert first.status == "done" and first.text.startswith("# PAGE 17\n")
    assert (second.status, second.text, second.attempts) == ("failed", "", 2)
    assert second.error.startswith("The model answered with its reasoning only")


async def test_the_extra_request_body_turns_thinking_off_and_cannot_replace_ocrsites_fields(tmp_path: Path) -> None:
    env = {"FAKE_VLLM_THINKING": "template", "FAKE_VLLM_SCRIPT": json.dumps({"12": ["think_forever"] * 4})}
    extra = {"chat_template_kwargs": {"enable_thinking": False}, "model": "other/model", "max_tokens": 1, "stream": True}
    with fake_vllm(tmp_path, env=env) as server:
        outcome, _ = await read(server, marked_page(12), extra_body=extra)
        [request] = sent(server, 12)
    assert outcome.status == "done" and outcome.text.startswith("# PAGE 12\n") and outcome.warnings == []
    assert request["chat_template_kwargs"] == {"enable_thinking": False}
    assert (request["model"], request["max_tokens"]) == (MODEL, 512)


# --- 2. empty answers and blank pages ---------------------------------------------------------------------


async def test_an_empty_answer_for_a_page_with_text_is_retried_then_kept_with_a_warning(server: FakeServer) -> None:
    outcome, _ = await read(server, marked_page(202))
    assert (outcome.status, outcome.text, outcome.attempts, outcome.error) == ("done", "", 4, "")
    assert [w["code"] for w in outcome.warnings] == ["empty"] and "not blank" in outcome.warnings[0]["message"]
    assert [r["temperature"] for r in sent(server, 202)] == ESCALATING


async def test_an_empty_answer_once_is_retried(server: FakeServer) -> None:
    outcome, _ = await read(server, marked_page(203))
    assert outcome.status == "done" and outcome.text.startswith("# PAGE 203") and outcome.warnings == []
    assert [r["outcome"] for r in sent(server, 203)] == ["empty", "ok"]


def _png(image: Image.Image) -> PageImage:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return PageImage(number=1, data=buffer.getvalue(), mime="image/png", width=image.width, height=image.height)


def _blank_images() -> list[Image.Image]:
    rng = random.Random(5)
    grain = Image.effect_noise((850, 1100), 8).point(lambda v: 232 + (v - 128) // 2)
    specks = Image.new("L", (850, 1100), 248)
    draw = ImageDraw.Draw(specks)
    for _ in range(10):
        x, y = rng.randrange(850), rng.randrange(1100)
        draw.ellipse((x, y, x + 2, y + 2), fill=40)
    return [Image.new("RGB", (850, 1100), "white"), grain, Image.new("L", (850, 1100), 20), specks]


async def test_blank_pages_are_done_at_once_with_a_blank_warning(tmp_path: Path) -> None:
    with fake_vllm(tmp_path) as server:
        outcomes = [(await read(server, _png(image)))[0] for image in _blank_images()]
        requests = server.requests()
    assert len(requests) == 4 and {r["page_marker"] for r in requests} == {None}  # one request each
    for outcome in outcomes:
        assert (outcome.status, outcome.text, outcome.attempts) == ("done", "", 1)
        assert outcome.warnings == [{"code": "blank", "message": "Blank page: no text on it."}]


# --- 3. context limits ------------------------------------------------------------------------------------


async def test_max_tokens_never_ask_for_more_than_fits(tmp_path: Path) -> None:
    with fake_vllm(tmp_path, args=["--max-model-len", "4096"]) as server:
        outcome, _ = await read(server, marked_page(13), max_tokens=4096)
        [request] = sent(server, 13)
    # Asked as set, 4096 would not fit beside the prompt: vLLM would answer 400.
    assert request["max_tokens"] == 4096 - estimated_prompt_tokens(MARKDOWN_PROMPT, 400, 520) - 32
    assert outcome.status == "done" and outcome.text.startswith("# PAGE 13")


async def test_a_page_too_long_for_the_context_is_sent_again_smaller(tmp_path: Path) -> None:
    env = {"FAKE_VLLM_PAGE_TOKEN_FACTOR": "14:20"}  # page 14 costs 20 x the tokens of its size
    with fake_vllm(tmp_path, env=env, args=["--max-model-len", "8192"]) as server:
        outcome, _ = await read(server, marked_page(14, size=(850, 1100)), max_tokens=4096, page_retries=0)
        first, second = sent(server, 14)
    assert first["outcome"] == "400" and first["error"].startswith("The decoder prompt (length 23525) is longer")
    assert first["image_size"] == [850, 1100] and second["outcome"] == "ok"
    assert max(second["image_size"]) == MIN_LONGEST_SIDE and second["max_tokens"] == 4096
    assert outcome.status == "done" and outcome.text.startswith("# PAGE 14") and outcome.attempts == 2


async def test_a_page_that_never_fits_fails_naming_the_settings_to_change(tmp_path: Path) -> None:
    env = {"FAKE_VLLM_PAGE_TOKEN_FACTOR": "15:400"}
    with fake_vllm(tmp_path, env=env, args=["--max-model-len", "8192"]) as server:
        outcome, _ = await read(server, marked_page(15, size=(850, 1100)), max_tokens=4096)
        requests = sent(server, 15)
    assert [(r["outcome"], max(r["image_size"])) for r in requests] == [("400", 1100), ("400", MIN_LONGEST_SIDE)]
    assert outcome.status == "failed" and outcome.text == "" and outcome.attempts == 2
    assert outcome.error.startswith("The page does not fit the model's context (8192 tokens): The decoder prompt (length 76925)")
    assert 'Lower "Target longest side" or "Max tokens" in the OCR settings' in outcome.error
    assert "--max-model-len" in outcome.error and outcome.error.endswith(
        f"(after 2 attempts, the last with a {MIN_LONGEST_SIDE} px image and max_tokens 256)")


async def test_max_tokens_too_large_for_a_server_that_does_not_list_max_model_len(tmp_path: Path) -> None:
    env = {"FAKE_VLLM_MODELS_WITHOUT_MAX_LEN": "1"}  # a gateway's /v1/models
    with fake_vllm(tmp_path, env=env, args=["--max-model-len", "4096"]) as server:
        outcome, _ = await read(server, marked_page(16), max_tokens=4096, page_retries=0)
        first, second = sent(server, 16)
    assert first["outcome"] == "400" and first["error"].startswith("'max_tokens' or 'max_completion_tokens' is too large: 4096.")
    # The limit named in the 400 is learnt: the same page asks for what fits.
    assert second["outcome"] == "ok" and second["max_tokens"] == 4096 - estimated_prompt_tokens(MARKDOWN_PROMPT, 400, 520) - 32
    assert second["image_size"] == first["image_size"]
    assert outcome.status == "done" and outcome.text.startswith("# PAGE 16") and outcome.attempts == 2


# --- 5. proxies and gateways ------------------------------------------------------------------------------


@pytest.mark.parametrize("number", [207, 208, 209])  # nginx 502, AWS load balancer 503, Cloudflare 504
async def test_a_proxys_html_error_page_is_retried(server: FakeServer, number: int) -> None:
    outcome, sleeps = await read(server, marked_page(number))
    assert outcome.status == "done" and outcome.text.startswith(f"# PAGE {number}") and outcome.attempts == 2
    assert len(sent(server, number)) == 2 and len(sleeps) == 1


async def test_a_proxy_that_keeps_failing_leaves_one_readable_line(server: FakeServer) -> None:
    outcome, sleeps = await read(server, marked_page(210))
    assert outcome.status == "failed" and outcome.attempts == 4 and len(sleeps) == 3
    assert outcome.error == (
        f"HTTP 502 Bad Gateway from the server at {server.base_url} (an HTML error page: a proxy or gateway in "
        "front of the model server answered) (after 4 attempts)"
    )
    assert len(sent(server, 210)) == 4


# --- 6. runaway output ------------------------------------------------------------------------------------


async def test_a_loop_is_retried_at_a_higher_temperature(server: FakeServer) -> None:
    outcome, _ = await read(server, marked_page(204))
    assert outcome.status == "done" and outcome.warnings == [] and outcome.attempts == 2
    assert outcome.text.startswith("# PAGE 204\n\nText of page 204.")
    assert [(r["outcome"], r["temperature"]) for r in sent(server, 204)] == [("loop", 0.0), ("ok", 0.1)]


@pytest.mark.parametrize(
    ("number", "collapsed", "unit"),
    [
        (205, "# PAGE 205\n\n| Item | Quantity |\n|---|---|\n| Item | 1 |", "| Item | 1 |"),
        (206, "# PAGE 206\n\nThe terms and conditions apply to the terms and conditions", "to the terms and conditions"),
    ],
)
async def test_a_loop_that_persists_is_kept_collapsed_with_a_warning(server: FakeServer, number, collapsed, unit) -> None:
    outcome, _ = await read(server, marked_page(number))
    assert (outcome.status, outcome.text, outcome.attempts, outcome.finish_reason) == ("done", collapsed, 4, "length")
    [warning] = outcome.warnings
    assert warning["code"] == "repetition" and f"repeated {unit!r}" in warning["message"]
    assert "until max_tokens (512 tokens)" in warning["message"] and "collapsed to one copy" in warning["message"]
    assert [r["temperature"] for r in sent(server, number)] == ESCALATING
