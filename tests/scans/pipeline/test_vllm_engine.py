"""The OpenAI-compatible client against precise server answers (httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import pytest
from PIL import Image

from scans.pipeline.errors import (
    ContextLimitExceeded,
    OutputRejected,
    PermanentEngineError,
    ReasoningOnly,
    RepetitiveOutput,
    RequestRejected,
    TransientEngineError,
)
from scans.pipeline.vllm_engine import VLLMEngine
from tests.fakes.pages import read_marker
from tests.scans.pipeline.helpers import MODEL, marked_page, ocr_options
from tests.support import free_port

OLMOCR_TEXT = "---\nprimary_language: de\nis_rotation_valid: true\nrotation_correction: 0\nis_table: true\nis_diagram: false\n---\n| a |\n"


def completion(text: str, finish_reason: str = "stop", prompt_tokens: int = 700, completion_tokens: int = 42) -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": 742},
    }


def engine_with(handler, *, base_url: str = "http://vllm.test:8000", api_key: str = "", **kwargs) -> VLLMEngine:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler), timeout=5)
    options = {"timeout_s": 5, "max_in_flight": 4, **kwargs}
    return VLLMEngine(base_url, MODEL, api_key, client=client, **options)


@pytest.mark.parametrize("base_url", ["http://vllm.test:8000", "http://vllm.test:8000/v1/", "http://vllm.test:8000/"])
async def test_request_shape_and_result(base_url: str) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=completion("```markdown\nPAGE 3\n```"))

    engine = engine_with(handler, base_url=base_url, api_key="sekret")
    result = await engine.ocr_page(marked_page(3), ocr_options(max_tokens=321, temperature=0.25))
    models, request = seen  # the served model's max_model_len is read first
    assert models.method == "GET" and str(models.url) == "http://vllm.test:8000/v1/models"
    assert request.method == "POST" and str(request.url) == "http://vllm.test:8000/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sekret"
    body = json.loads(request.content)
    assert body["model"] == MODEL and body["max_tokens"] == 321 and body["temperature"] == 0.25
    [message] = body["messages"]
    assert message["role"] == "user"
    text_part, image_part = message["content"]
    assert text_part["type"] == "text" and "Markdown" in text_part["text"]
    url = image_part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert read_marker(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))) == 3
    assert result.text == "PAGE 3"
    assert (result.input_tokens, result.output_tokens, result.finish_reason) == (700, 42, "stop")
    assert result.metadata == {} and result.latency_ms >= 0


async def test_temperature_override_and_no_key_means_no_header() -> None:
    seen = []

    def handler(request):
        seen.append(request)
        return httpx.Response(200, json=completion("x"))

    engine = engine_with(handler)
    await engine.ocr_page(marked_page(1), ocr_options(temperature=0.0), temperature=0.8)
    assert json.loads(seen[-1].content)["temperature"] == 0.8
    assert all("authorization" not in request.headers for request in seen)


async def test_olmocr_metadata_is_parsed() -> None:
    engine = engine_with(lambda r: httpx.Response(200, json=completion(OLMOCR_TEXT)))
    result = await engine.ocr_page(marked_page(1), ocr_options(prompt_preset="olmocr"))
    assert result.text == "| a |"
    assert result.metadata["primary_language"] == "de" and result.metadata["is_table"] is True


async def test_unparsable_olmocr_output_is_rejected() -> None:
    engine = engine_with(lambda r: httpx.Response(200, json=completion("just text")))
    with pytest.raises(OutputRejected) as caught:
        await engine.ocr_page(marked_page(1), ocr_options(prompt_preset="olmocr"))
    assert caught.value.text == "just text" and "olmOCR" in str(caught.value)


async def test_finish_reason_length_is_rejected_with_its_text() -> None:
    engine = engine_with(lambda r: httpx.Response(200, json=completion("PAGE 1 and then", "length")))
    with pytest.raises(OutputRejected) as caught:
        await engine.ocr_page(marked_page(1), ocr_options(max_tokens=64))
    assert caught.value.text == "PAGE 1 and then" and caught.value.finish_reason == "length"
    assert caught.value.output_tokens == 42 and "64" in str(caught.value)


@pytest.mark.parametrize(
    ("status", "headers", "retry_after"),
    [(429, {"Retry-After": "7"}, 7.0), (429, {}, None), (500, {}, None), (502, {}, None), (503, {"Retry-After": "2"}, 2.0)],
)
async def test_transient_statuses(status: int, headers: dict, retry_after) -> None:
    engine = engine_with(lambda r: httpx.Response(status, headers=headers, json={"error": {"message": "busy"}}))
    with pytest.raises(TransientEngineError) as caught:
        await engine.ocr_page(marked_page(1), ocr_options())
    assert caught.value.retry_after == retry_after and caught.value.status == status
    assert "busy" in str(caught.value)


async def test_unknown_model_names_the_served_ones() -> None:
    def handler(request):
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "a/b"}, {"id": "c"}]})
        return httpx.Response(404, json={"message": f"The model `{MODEL}` does not exist.", "code": 404})

    engine = engine_with(handler)
    with pytest.raises(PermanentEngineError) as caught:
        await engine.ocr_page(marked_page(1), ocr_options())
    assert str(caught.value) == f"The server does not serve model '{MODEL}' (it serves: a/b, c)."


async def test_404_without_an_api() -> None:
    engine = engine_with(lambda r: httpx.Response(404, text="Not Found"))
    with pytest.raises(PermanentEngineError, match="No OpenAI-compatible API at http://vllm.test:8000/v1"):
        await engine.ocr_page(marked_page(1), ocr_options())


@pytest.mark.parametrize(("status", "expected"), [(401, "API key"), (403, "API key")])
async def test_permanent_statuses(status: int, expected: str) -> None:
    engine = engine_with(lambda r: httpx.Response(status, json={"error": {"message": "The image is not valid"}}))
    with pytest.raises(PermanentEngineError, match=expected):
        await engine.ocr_page(marked_page(1), ocr_options())


@pytest.mark.parametrize("status", [400, 413, 422])
async def test_a_rejected_request_concerns_only_its_page(status: int) -> None:
    engine = engine_with(lambda r: httpx.Response(status, json={"error": {"message": "The image is not valid"}}))
    with pytest.raises(RequestRejected, match=f"rejected this page's request \\({status}\\): The image is not valid"):
        await engine.ocr_page(marked_page(1), ocr_options())


async def test_garbled_answer_is_transient() -> None:
    engine = engine_with(lambda r: httpx.Response(200, text="<html>proxy error</html>"))
    with pytest.raises(TransientEngineError, match="not an OpenAI chat completion"):
        await engine.ocr_page(marked_page(1), ocr_options())


async def test_connection_refused_is_transient() -> None:
    port = free_port()  # nothing listens there
    engine = VLLMEngine(f"http://127.0.0.1:{port}", MODEL, timeout_s=5, max_in_flight=2)
    try:
        with pytest.raises(TransientEngineError, match="Cannot connect"):
            await engine.ocr_page(marked_page(1), ocr_options())
    finally:
        await engine.aclose()


async def test_requests_in_flight_are_bounded() -> None:
    state = {"inside": 0, "max": 0}

    async def handler(request):
        state["inside"] += 1
        state["max"] = max(state["max"], state["inside"])
        await asyncio.sleep(0.02)
        state["inside"] -= 1
        return httpx.Response(200, json=completion("x"))

    engine = engine_with(handler, max_in_flight=3)
    await asyncio.gather(*(engine.ocr_page(marked_page(n), ocr_options()) for n in range(1, 13)))
    assert state["max"] == 3


async def test_slow_answer_times_out() -> None:
    async def handler(request):
        await asyncio.sleep(30)
        return httpx.Response(200, json=completion("x"))

    engine = engine_with(handler, timeout_s=0.2)
    with pytest.raises(TransientEngineError, match="did not answer within 0.2 s"):
        await engine.ocr_page(marked_page(1), ocr_options())


async def test_cancellation_is_prompt() -> None:
    started = asyncio.Event()

    async def handler(request):
        started.set()
        await asyncio.sleep(30)
        return httpx.Response(200, json=completion("x"))

    engine = engine_with(handler, timeout_s=60)
    task = asyncio.create_task(engine.ocr_page(marked_page(1), ocr_options()))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)


def test_a_timeout_is_required() -> None:
    with pytest.raises(ValueError):
        VLLMEngine("http://x", MODEL, timeout_s=0, max_in_flight=1)


# --- answers from the real world -----------------------------------------------------------------------


def message_answer(message: dict, finish_reason: str = "stop", prompt_tokens: int = 700, completion_tokens: int = 42) -> dict:
    body = completion("", finish_reason, prompt_tokens, completion_tokens)
    body["choices"][0]["message"] = {"role": "assistant", **message}
    return body


@pytest.mark.parametrize(
    "message",
    [
        {"content": None, "reasoning_content": "The page shows PAGE 1."},  # vLLM 0.11 with --reasoning-parser
        {"content": None, "reasoning": "The page shows PAGE 1."},  # later vLLM, OpenRouter, Ollama
        {"content": "\n\n  ", "reasoning_content": "The page shows PAGE 1."},
        {"content": "<think>The page shows PAGE 1.</think>"},
    ],
)
async def test_an_answer_of_reasoning_only_is_rejected_without_its_reasoning(message: dict) -> None:
    engine = engine_with(lambda r: httpx.Response(200, json=message_answer(message)))
    with pytest.raises(ReasoningOnly) as caught:
        await engine.ocr_page(marked_page(1), ocr_options())
    assert caught.value.text == "" and caught.value.output_tokens == 42
    assert "reasoning only" in str(caught.value) and "enable_thinking" in str(caught.value)


async def test_text_before_an_unclosed_reasoning_block_is_kept_with_a_warning() -> None:
    engine = engine_with(lambda r: httpx.Response(200, json=completion("# PAGE 1\n\nText.\n<think>Hmm, did I miss")))
    result = await engine.ocr_page(marked_page(1), ocr_options())
    assert result.text == "# PAGE 1\n\nText." and [w["code"] for w in result.warnings] == ["reasoning"]


async def test_a_loop_that_stopped_by_itself_is_found_too() -> None:
    text = "# PAGE 1\n" + "| Total | 0 |\n" * 60
    engine = engine_with(lambda r: httpx.Response(200, json=completion(text)))
    with pytest.raises(RepetitiveOutput) as caught:
        await engine.ocr_page(marked_page(1), ocr_options())
    assert caught.value.text == "# PAGE 1\n| Total | 0 |" and "60 times" in str(caught.value)


def models_then(answer: httpx.Response, max_model_len: int | None = 4096):
    calls = {"models": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            calls["models"] += 1
            card = {"id": MODEL, "object": "model", **({"max_model_len": max_model_len} if max_model_len else {})}
            return httpx.Response(200, json={"object": "list", "data": [card]})
        return answer

    return handler, calls


async def test_an_answer_cut_off_by_the_context_not_max_tokens() -> None:
    answer = httpx.Response(200, json=completion("# PAGE 1\n\nA long page", "length", prompt_tokens=3800, completion_tokens=296))
    handler, _ = models_then(answer, 4096)
    engine = engine_with(handler)
    with pytest.raises(ContextLimitExceeded) as caught:
        await engine.ocr_page(marked_page(1), ocr_options(max_tokens=512))
    error = caught.value
    assert (error.too_long, error.max_model_len, error.prompt_tokens, error.text) == ("answer", 4096, 3800, "# PAGE 1\n\nA long page")
    assert "3800 for the page, 296 for the answer" in str(error) and "--max-model-len" in str(error)


async def test_max_model_len_is_read_once_for_all_pages() -> None:
    handler, calls = models_then(httpx.Response(200, json=completion("x")), 8192)
    engine = engine_with(handler)
    await asyncio.gather(*(engine.ocr_page(marked_page(n), ocr_options()) for n in range(1, 6)))
    assert calls["models"] == 1 and await engine.max_model_len() == 8192


async def test_a_server_that_cannot_list_its_models_is_not_asked_on_every_page() -> None:
    calls = {"models": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            calls["models"] += 1
            return httpx.Response(500, text="Internal Server Error")
        return httpx.Response(200, json=completion("x"))

    engine = engine_with(handler)
    for number in range(1, 4):
        await engine.ocr_page(marked_page(number), ocr_options())
    assert calls["models"] == 1 and await engine.max_model_len() is None


NGINX_413 = (
    "<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>\r\n"
    "<center><h1>413 Request Entity Too Large</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)


@pytest.mark.parametrize(
    ("response", "error", "message"),
    [
        (httpx.Response(413, text=NGINX_413, headers={"content-type": "text/html"}), RequestRejected,
         "The server rejected this page's request: HTTP 413 Request Entity Too Large from the server at "
         "http://vllm.test:8000/v1 (an HTML error page: a proxy or gateway in front of the model server answered)"),
        (httpx.Response(503, text="upstream connect error or disconnect/reset before headers. reset reason: connection failure",
                        headers={"content-type": "text/plain"}), TransientEngineError,  # Envoy
         "HTTP 503 Service Unavailable from the server at http://vllm.test:8000/v1: upstream connect error or "
         "disconnect/reset before headers. reset reason: connection failure"),
        (httpx.Response(520, text="<!DOCTYPE html><html><head><title>520</title></head></html>"), TransientEngineError,
         "HTTP 520 from the server at http://vllm.test:8000/v1 (an HTML error page: a proxy or gateway in front of "
         "the model server answered)"),  # Cloudflare's own status, no standard phrase
        (httpx.Response(200, text="<!DOCTYPE html>\n<html><body><form>Sign in</form></body></html>"), TransientEngineError,
         "The server's answer is not an OpenAI chat completion: HTTP 200 OK from the server at http://vllm.test:8000/v1 "
         "(an HTML error page: a proxy or gateway in front of the model server answered)"),  # a login page
    ],
)
async def test_error_pages_become_one_readable_line(response: httpx.Response, error: type, message: str) -> None:
    engine = engine_with(lambda r: response)
    with pytest.raises(error) as caught:
        await engine.ocr_page(marked_page(1), ocr_options())
    assert str(caught.value) == message
