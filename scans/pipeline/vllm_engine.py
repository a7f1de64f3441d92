"""The engine that speaks vLLM's OpenAI-compatible chat-completions API.

What the server answers is judged here, once, into either a page's text or an error saying what to do:
- reasoning is never page text: `reasoning_content`/`reasoning` are ignored and think blocks are cut out
  of `content`; an answer of nothing but reasoning is `ReasoningOnly`;
- an empty answer is `EmptyAnswer` (the retry policy decides whether the page is blank);
- an answer cut off at max_tokens is `OutputRejected`, `RepetitiveOutput` when it is a loop, and
  `ContextLimitExceeded` when the model's context (not max_tokens) cut it;
- `max_tokens` never asks for more than fits beside the page in the served model's `max_model_len`
  (read from /v1/models), and a 400 saying the page does not fit is `ContextLimitExceeded`;
- an error page from a proxy (HTML) becomes one readable line naming the status and the server.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import re
import time
from dataclasses import replace
from http import HTTPStatus
from typing import Any

import httpx

from scans.pipeline.answers import find_repetition, split_reasoning
from scans.pipeline.context import estimated_prompt_tokens, fitted_max_tokens, parse_context_error
from scans.pipeline.errors import (
    ContextLimitExceeded,
    EmptyAnswer,
    OutputRejected,
    PermanentEngineError,
    ReasoningOnly,
    RepetitiveOutput,
    RequestRejected,
    TransientEngineError,
    UnparsableOutput,
)
from scans.pipeline.options import OCRConfig
from scans.pipeline.prompts import build_prompt, clean_markdown, parse_olmocr
from scans.pipeline.types import PageImage, PageResult, PageWarning
from vllm_control.config import normalize_base_url
from vllm_control.metrics import IN_FLIGHT, endpoint_label
from vllm_control.models import VLMSettings
from vllm_control.redaction import redact_urls
from vllm_control.tls import tls_context

CONNECT_TIMEOUT_S = 10.0
ERROR_DETAIL_CHARS = 300
MODELS_RETRY_S = 30.0  # how soon to ask /v1/models again after it could not answer

CONTEXT_ADVICE = (
    'Lower "Target longest side" or "Max tokens" in the OCR settings, or serve the model with a larger '
    "--max-model-len."
)
THINKING_ADVICE = (
    "Reasoning is never kept as page text. Use a non-reasoning (Instruct) model, or turn thinking off with "
    'the OCR setting "Extra request body", e.g. {"chat_template_kwargs": {"enable_thinking": false}}.'
)
_HTML = re.compile(r"\A\s*(<!doctype html|<html|<head|<body|<\?xml|<center>|<h1>)", re.IGNORECASE)


def _retry_after(response: httpx.Response) -> float | None:
    raw = response.headers.get("retry-after", "").strip()
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _one_line(text: str) -> str:
    return " ".join(text.split())[:ERROR_DETAIL_CHARS]


def _is_html(response: httpx.Response) -> bool:
    return "html" in response.headers.get("content-type", "").lower() or bool(_HTML.match(response.text[:200]))


def _error_detail(response: httpx.Response) -> str:
    """The server's own words on one line: OpenAI's {"error": {"message"}}, vLLM's {"message"}, FastAPI's
    {"detail"}, or a plain-text body; "" for an HTML page (a proxy's error page says nothing useful)."""
    try:
        body = response.json()
    except ValueError:
        return "" if _is_html(response) else _one_line(response.text)
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return _one_line(str(error["message"]))
        for key in ("message", "detail", "error"):
            if body.get(key):
                return _one_line(str(body[key]))
    return _one_line(response.text)


def _first_sentence(text: str) -> str:
    match = re.match(r"(.+?\.)(?:\s|$)", text)
    return match.group(1) if match else text


class VLLMEngine:
    name = "vllm"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str = "",
        *,
        timeout_s: float,
        max_in_flight: int,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive: a request without a deadline can hang a page forever.")
        self.base_url = normalize_base_url(base_url)
        self.endpoint = endpoint_label(self.base_url)
        self.shown_url = redact_urls(self.base_url)  # for messages: page errors reach browsers and logs
        self.model = model
        self.timeout_s = float(timeout_s)
        self.max_in_flight = max(1, max_in_flight)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(self.timeout_s, connect=min(CONNECT_TIMEOUT_S, self.timeout_s)),
            verify=tls_context(),
            limits=httpx.Limits(max_connections=self.max_in_flight, max_keepalive_connections=self.max_in_flight),
        )
        self._slots = asyncio.Semaphore(self.max_in_flight)
        self._max_model_len: int | None = None
        self._models_read = False  # /v1/models answered (with or without a max_model_len)
        self._models_asked_at: float | None = None
        self._models_lock = asyncio.Lock()
        # The model's chat template opens its think block (seen in an earlier answer): an answer cut off
        # before any closing tag is then all reasoning, though it carries no tag at all.
        self._template_opens_thinking = False

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> VLLMEngine:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()

    # --- what the server serves ---------------------------------------------------------------------

    async def _model_cards(self) -> list[dict[str, Any]] | None:
        """/v1/models' `data` (vLLM: {"id", "max_model_len", ...} per served name), or None if it cannot say."""
        timeout = min(CONNECT_TIMEOUT_S, self.timeout_s)
        try:
            async with asyncio.timeout(timeout):
                response = await self._client.get(f"{self.base_url}/models", headers=self._headers, timeout=timeout)
            if response.status_code != 200:
                return None
            data = response.json().get("data")
        except (httpx.HTTPError, TimeoutError, ValueError, AttributeError):
            return None
        return [card for card in data if isinstance(card, dict)] if isinstance(data, list) else None

    async def served_models(self) -> list[str] | None:
        """The model names the server lists, or None if it cannot say."""
        cards = await self._model_cards()
        return None if cards is None else [str(card.get("id")) for card in cards]

    async def max_model_len(self) -> int | None:
        """The served model's context length in tokens (vLLM's `max_model_len` in /v1/models), or None when
        the server does not report it. Asked once (again after MODELS_RETRY_S if the server could not answer)."""
        if self._models_read:
            return self._max_model_len
        async with self._models_lock:
            asked = self._models_asked_at
            if self._models_read or (asked is not None and time.monotonic() - asked < MODELS_RETRY_S):
                return self._max_model_len
            self._models_asked_at = time.monotonic()
            cards = await self._model_cards()
            if cards is not None:
                self._models_read = True
                for card in cards:
                    value = card.get("max_model_len")
                    if card.get("id") == self.model and isinstance(value, int) and value > 0:
                        self._max_model_len = value
        return self._max_model_len

    # --- one page -----------------------------------------------------------------------------------

    def _payload(self, image: PageImage, prompt: str, options: OCRConfig, temperature: float, max_tokens: int) -> dict[str, Any]:
        data_uri = f"data:{image.mime};base64,{base64.b64encode(image.data).decode('ascii')}"
        extra = {key: value for key, value in options.extra_body.items() if key not in VLMSettings.RESERVED_BODY_FIELDS}
        return {
            **extra,
            "model": self.model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": prompt},
                        {"type": "image_url", "image_url": {"url": data_uri}},
                    ],
                }
            ],
            "max_tokens": max_tokens,
            "temperature": temperature,
        }

    async def ocr_page(self, image: PageImage, options: OCRConfig, *, temperature: float | None = None) -> PageResult:
        try:
            prompt = build_prompt(options)
        except ValueError as error:  # e.g. an empty custom prompt
            raise PermanentEngineError(str(error)) from None
        limit = await self.max_model_len()
        max_tokens = fitted_max_tokens(
            options.max_tokens, max_model_len=limit, prompt_tokens=estimated_prompt_tokens(prompt, image.width, image.height)
        )
        payload = self._payload(image, prompt, options, options.temperature if temperature is None else temperature, max_tokens)
        async with self._slots:
            started = time.monotonic()
            with IN_FLIGHT.labels(endpoint=self.endpoint).track_inprogress():
                response = await self._post(payload)
            latency_ms = int((time.monotonic() - started) * 1000)
        if response.status_code != 200:
            await self._raise_for_status(response, max_tokens)
        return self._result(response, options, latency_ms, max_tokens)

    async def _post(self, payload: dict[str, Any]) -> httpx.Response:
        url = f"{self.base_url}/chat/completions"
        try:
            # httpx's timeouts are per read; the outer deadline also bounds a server that trickles bytes.
            async with asyncio.timeout(self.timeout_s + 1):
                return await self._client.post(url, json=payload, headers=self._headers)
        except (httpx.TimeoutException, TimeoutError):
            raise TransientEngineError(
                f"The server at {self.shown_url} did not answer within {self.timeout_s:g} s."
            ) from None
        except httpx.ConnectError as error:
            raise TransientEngineError(
                f"Cannot connect to {self.shown_url}: {redact_urls(str(error)) or 'connection refused'}.", connection_lost=True
            ) from None
        except httpx.TransportError as error:
            raise TransientEngineError(
                f"The connection to {self.shown_url} failed: {redact_urls(str(error)) or type(error).__name__}.",
                connection_lost=True,
            ) from None

    def _status_line(self, response: httpx.Response) -> str:
        """E.g. "HTTP 502 Bad Gateway from the server at http://gpu:8000/v1", naming an HTML error page."""
        status = response.status_code
        phrase = response.reason_phrase
        if not phrase:
            try:
                phrase = HTTPStatus(status).phrase
            except ValueError:  # e.g. Cloudflare's 520-526
                phrase = ""
        line = f"HTTP {status}{f' {phrase}' if phrase else ''} from the server at {self.base_url}"
        if _is_html(response):
            line += " (an HTML error page: a proxy or gateway in front of the model server answered)"
        return line

    async def _raise_for_status(self, response: httpx.Response, max_tokens: int) -> None:
        status = response.status_code
        detail = _error_detail(response)
        said = f"{self._status_line(response)}: {detail}" if detail else self._status_line(response)
        if status == 429:
            raise TransientEngineError(f"The server is busy: {said}", retry_after=_retry_after(response), status=status)
        if status >= 500 or status == 408:
            raise TransientEngineError(said, retry_after=_retry_after(response), status=status)
        if status in (401, 403):
            raise PermanentEngineError(
                f"The server at {self.shown_url} rejected the API key ({status}): check the API key in the settings.",
                status=status,
            )
        if status == 404:
            raise PermanentEngineError(await self._not_found_message(detail or self._status_line(response)), status=status)
        context = parse_context_error(detail) if detail else None
        if context is not None:
            limit = context.max_model_len or await self.max_model_len()
            if context.max_model_len and self._max_model_len is None:
                self._max_model_len = context.max_model_len  # the server said what /v1/models did not
            size = f" ({limit} tokens)" if limit else ""
            raise ContextLimitExceeded(
                f"The page does not fit the model's context{size}: {_first_sentence(detail)} {CONTEXT_ADVICE}",
                too_long=context.too_long,
                max_model_len=limit,
                prompt_tokens=context.prompt_tokens,
                max_tokens=context.max_tokens or max_tokens,
                status=status,
            )
        raise RequestRejected(
            f"The server rejected this page's request ({status}): {detail}" if detail else f"The server rejected this page's request: {said}",
            status=status,
        )

    async def _not_found_message(self, detail: str) -> str:
        served = await self.served_models()
        if served is None:
            return f"No OpenAI-compatible API at {self.shown_url} (404): {detail}"
        names = ", ".join(served) or "nothing"
        return f"The server does not serve model '{self.model}' (it serves: {names})."

    def _result(self, response: httpx.Response, options: OCRConfig, latency_ms: int, max_tokens: int) -> PageResult:
        try:
            body = response.json()
            choice = body["choices"][0]
            message = choice["message"]
            content = message.get("content") or ""
            reasoning = message.get("reasoning_content") or message.get("reasoning") or ""
            finish_reason = choice.get("finish_reason") or ""
            usage = body.get("usage") or {}
            input_tokens = int(usage.get("prompt_tokens") or 0)
            output_tokens = int(usage.get("completion_tokens") or 0)
            if not isinstance(content, str) or not isinstance(reasoning, str):
                raise TypeError
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            shown = self._status_line(response) if _is_html(response) else repr(response.text[:ERROR_DETAIL_CHARS])
            raise TransientEngineError(f"The server's answer is not an OpenAI chat completion: {shown}") from None
        answer = split_reasoning(content)
        rejected = dict(finish_reason=finish_reason, input_tokens=input_tokens, output_tokens=output_tokens, latency_ms=latency_ms)
        cut_off = finish_reason == "length"
        self._template_opens_thinking |= answer.opened_by_template
        if cut_off and self._template_opens_thinking and not answer.reasoning:
            answer = replace(answer, text="", reasoning=answer.text)
        if not answer.text:
            if reasoning.strip() or answer.reasoning:
                still = f" (it was still thinking when it reached max_tokens, {max_tokens} tokens)" if cut_off else ""
                raise ReasoningOnly(f"The model answered with its reasoning only, no transcription{still}. {THINKING_ADVICE}", **rejected)
            if cut_off:
                raise OutputRejected(f"The answer was cut off at max_tokens ({max_tokens} tokens) before any text.", **rejected)
            raise EmptyAnswer("The model answered with no text.", **rejected)
        text = answer.text
        repetition = find_repetition(text, cut_off=cut_off)
        if repetition is not None:
            unit = repetition.unit if len(repetition.unit) <= 60 else repetition.unit[:57] + "..."
            until = f" until max_tokens ({max_tokens} tokens)" if cut_off else ""
            raise RepetitiveOutput(
                f"The model looped: it repeated {unit!r} {repetition.count} times{until}.", text=repetition.text, **rejected
            )
        if cut_off:
            limit = self._max_model_len
            if limit is not None and output_tokens < max_tokens and input_tokens + output_tokens >= limit:
                raise ContextLimitExceeded(
                    f"The answer was cut off by the model's context ({limit} tokens: {input_tokens} for the page, "
                    f"{output_tokens} for the answer). {CONTEXT_ADVICE}",
                    too_long="answer", max_model_len=limit, prompt_tokens=input_tokens, max_tokens=max_tokens,
                    status=None, text=text, finish_reason=finish_reason, input_tokens=input_tokens, output_tokens=output_tokens,
                )
            raise OutputRejected(f"The answer was cut off at max_tokens ({max_tokens} tokens).", text=text, **rejected)
        metadata: dict[str, Any] = {}
        if options.prompt_preset == "olmocr":
            try:
                metadata, text = parse_olmocr(text)
            except UnparsableOutput as error:
                raise OutputRejected(f"The answer is not in olmOCR's format: {error}.", text=text, **rejected) from None
        else:
            text = clean_markdown(text)
        warnings = []
        if answer.unterminated:
            warnings.append(PageWarning(
                code="reasoning",
                message="The answer ended inside a reasoning block that never closed (<think> without </think>): "
                "the text before it is kept, the rest was the model's reasoning.",
            ))
        return PageResult(
            text=text,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            latency_ms=latency_ms,
            finish_reason=finish_reason,
            metadata=metadata,
            warnings=warnings,
        )
