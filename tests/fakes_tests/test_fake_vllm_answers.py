"""The vLLM test double's answers from the real world: reasoning models, context limits with vLLM's own
messages, proxies' error pages, blank pages, loops, and requests held until the test releases them."""

from __future__ import annotations

import base64
import io
import json
import random
import threading
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.fakes import pages
from tests.scans.pipeline.helpers import MODEL, FakeServer, fake_vllm, start_fake_vllm, stop_fake_vllm
from tests.support import wait_until

pytestmark = pytest.mark.timeout(60)


# Scripted pages of the shared double (default configuration).
SCRIPT = {"7": ["html_502"], "21": ["html_503"], "22": ["html_504"], "8": ["empty"], "9": ["loop"], "23": ["loop_phrase"],
          "10": ["hold"]}


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> FakeServer:
    server = start_fake_vllm(tmp_path_factory.mktemp("double"), env={"FAKE_VLLM_SCRIPT": json.dumps(SCRIPT)})
    yield server
    stop_fake_vllm(server)


def data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def ask(server: FakeServer, image: Image.Image | None, prompt: str = "Transcribe this page as Markdown.", **extra) -> httpx.Response:
    content: list[dict] = [{"type": "text", "text": prompt}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": data_uri(image)}})
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}
    return httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=20)


def page(number: int, size: tuple[int, int] = (400, 520)) -> Image.Image:
    return pages.page_image(number, size)


@pytest.mark.parametrize(
    ("thinking", "args", "field", "content_starts", "in_field"),
    [
        ("inline", [], "reasoning_content", "<think>\nOkay, let me look", False),  # no reasoning parser
        ("template", [], "reasoning_content", "Okay, let me look", False),  # <think> was in the prompt
        ("inline", ["--reasoning-parser", "qwen3"], "reasoning_content", "\n\n# PAGE 3\n", True),
        ("template", ["--reasoning-parser", "deepseek_r1"], "reasoning", "\n\n# PAGE 3\n", True),  # newer vLLM
    ],
)
def test_thinking_models(tmp_path: Path, thinking, args, field, content_starts, in_field) -> None:
    env = {"FAKE_VLLM_THINKING": thinking, "FAKE_VLLM_REASONING_FIELD": field}
    with fake_vllm(tmp_path, env=env, args=args) as server:
        message = ask(server, page(3)).json()["choices"][0]["message"]
        plain = ask(server, page(3), chat_template_kwargs={"enable_thinking": False}).json()["choices"][0]["message"]
        assert server.requests()[-1]["chat_template_kwargs"] == {"enable_thinking": False}
    assert message["content"].startswith(content_starts)
    assert ("</think>" in message["content"]) is not in_field
    assert field in message and (message[field] or "").lstrip().startswith("Okay, let me look") is in_field
    assert plain["content"].startswith("# PAGE 3\n") and plain[field] is None


def test_a_model_that_thinks_until_max_tokens(tmp_path: Path) -> None:
    with fake_vllm(tmp_path, env={"FAKE_VLLM_SCRIPT": json.dumps({"4": ["think_forever"]})},
                   args=["--reasoning-parser", "qwen3"]) as server:
        answer = ask(server, page(4), max_tokens=200).json()
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 200
    assert choice["message"]["content"] is None and choice["message"]["reasoning_content"].lstrip().startswith("Okay")


def test_context_limits_with_vllms_messages(tmp_path: Path) -> None:
    prompt = "Transcribe this page as Markdown."  # 33 characters: 9 tokens
    env = {"FAKE_VLLM_PAGE_TOKEN_FACTOR": "5:4", "FAKE_VLLM_SCRIPT": json.dumps({"6": ["loop"]})}
    with fake_vllm(tmp_path, env=env, args=["--max-model-len", "2000"]) as server:
        too_many = ask(server, page(1), prompt, max_tokens=1995)
        long_text = ask(server, None, "x" * 8000)
        big_image = ask(server, page(2, (1288, 1288)), prompt)  # 46 x 46 patches of 28 px
        dense = ask(server, page(5, (700, 700)), prompt)  # 25 x 25 patches, 4 tokens each
        full = ask(server, page(6, (1000, 1000)), prompt)  # fits, but its answer runs into the limit
        models = httpx.get(f"{server.base_url}/models").json()
        log = server.requests()
    assert models["data"][0]["max_model_len"] == 2000
    assert [r.status_code for r in (too_many, long_text, big_image, dense)] == [400] * 4
    assert too_many.json()["error"] == {
        "message": "'max_tokens' or 'max_completion_tokens' is too large: 1995. This model's maximum context length "
        "is 2000 tokens and your request has 9 input tokens (1995 > 2000 - 9).",
        "type": "BadRequestError", "param": None, "code": 400,
    }
    assert long_text.json()["error"]["message"] == (
        "This model's maximum context length is 2000 tokens. However, your request has 2000 input tokens. "
        "Please reduce the length of the input messages."
    )
    assert big_image.json()["error"]["message"].startswith(
        "The decoder prompt (length 2125) is longer than the maximum model length of 2000. Make sure that "
        "`max_model_len` is no smaller than the number of text tokens plus multimodal tokens."
    )
    assert "(length 2509)" in dense.json()["error"]["message"]  # 9 + 4 x 625
    answer = full.json()
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["prompt_tokens"] == 9 + 35 * 35 and answer["usage"]["total_tokens"] == 2000
    assert [(entry["page_marker"], entry["outcome"]) for entry in log] == [(1, "400"), (None, "400"), (2, "400"), (5, "400"), (6, "loop")]
    assert log[2]["image_size"] == [1288, 1288] and log[2]["error"].startswith("The decoder prompt")


@pytest.mark.parametrize(
    ("number", "status", "server_header", "title"),
    [(7, 502, "nginx/1.24.0", "502 Bad Gateway"), (21, 503, "awselb/2.0", "503 Service Temporarily Unavailable"),
     (22, 504, "cloudflare", "504: Gateway time-out")],
)
def test_proxies_answer_with_html_error_pages(shared: FakeServer, number, status, server_header, title) -> None:
    response = ask(shared, page(number))
    again = ask(shared, page(number))
    assert response.status_code == status and response.headers["server"] == server_header
    assert response.headers["content-type"].startswith("text/html") and title in response.text
    assert again.status_code == 200 and f"PAGE {number}" in again.json()["choices"][0]["message"]["content"]


def test_blank_pages_get_an_empty_answer_and_empty_outcome_any_page(shared: FakeServer) -> None:
    rng = random.Random(3)
    noisy = Image.new("L", (600, 780), 235)
    noisy.putdata([min(255, max(0, 235 + int(rng.gauss(0, 6)))) for _ in range(600 * 780)])
    white = ask(shared, Image.new("RGB", (600, 780), "white")).json()["choices"][0]
    grain = ask(shared, noisy).json()["choices"][0]
    empty = ask(shared, page(8)).json()["choices"][0]
    then = ask(shared, page(8)).json()["choices"][0]
    assert (white["message"]["content"], white["finish_reason"]) == ("", "stop")
    assert grain["message"]["content"] == "" and empty["message"]["content"] == ""
    assert "PAGE 8" in then["message"]["content"]


@pytest.mark.parametrize(("number", "unit"), [(9, "| Item | 1 |\n"), (23, "to the terms and conditions ")])
def test_loops_run_until_max_tokens(shared: FakeServer, number, unit) -> None:
    answer = ask(shared, page(number), max_tokens=300).json()
    content = answer["choices"][0]["message"]["content"]
    assert answer["choices"][0]["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 300
    assert content.startswith(f"# PAGE {number}\n") and content.count(unit) > 30


def test_a_held_request_is_answered_when_released(shared: FakeServer) -> None:
    answers: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: answers.append(ask(shared, page(10))))
    thread.start()
    wait_until(lambda: [r for r in shared.requests() if r["page_marker"] == 10], timeout=10, message="the held request")
    assert [r["outcome"] for r in shared.requests() if r["page_marker"] == 10] == ["hold"] and not answers
    (shared.state_dir / "release-10").touch()
    thread.join(10)
    assert [r["outcome"] for r in shared.requests() if r["page_marker"] == 10] == ["hold"]  # recorded once, on arrival
    assert "PAGE 10" in answers[0].json()["choices"][0]["message"]["content"]
