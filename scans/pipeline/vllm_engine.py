"""The engine that speaks vLLM's OpenAI-compatible chat-completions API."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import time
from typing import Any

import httpx

from scans.pipeline.errors import (
    OutputRejected,
    PermanentEngineError,
    RequestRejected,
    TransientEngineError,
    UnparsableOutput,
)
from scans.pipeline.prompts import build_prompt, clean_markdown, parse_olmocr
from scans.pipeline.types import PageImage, PageResult
from scans.pipeline.options import OCRConfig
from vllm_control.config import normalize_base_url
from vllm_control.redaction import redact_urls
from vllm_control.tls import tls_context

CONNECT_TIMEOUT_S = 10.0
ERROR_DETAIL_CHARS = 300


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


def _error_detail(response: httpx.Response) -> str:
    """The server's own words: OpenAI-style {"error": {"message"}}, vLLM's {"message"}, or the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:ERROR_DETAIL_CHARS]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:ERROR_DETAIL_CHARS]
        for key in ("message", "detail", "error"):
            if body.get(key):
                return str(body[key])[:ERROR_DETAIL_CHARS]
    return response.text.strip()[:ERROR_DETAIL_CHARS]


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

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> VLLMEngine:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()

    def _payload(self, image: PageImage, options: OCRConfig, temperature: float) -> dict[str, Any]:
        data_uri = f"data:{image.mime};base64,{base64.b64encode(image.data).decode('ascii')}"
        return {
            "model": self.model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": build_prompt(options)},
                        {"type": "image_url", "image_url": {"url": data_uri}},
                    ],
                }
            ],
            "max_tokens": options.max_tokens,
            "temperature": temperature,
        }

    async def ocr_page(self, image: PageImage, options: OCRConfig, *, temperature: float | None = None) -> PageResult:
        try:
            payload = self._payload(image, options, options.temperature if temperature is None else temperature)
        except ValueError as error:  # e.g. an empty custom prompt
            raise PermanentEngineError(str(error)) from None
        async with self._slots:
            started = time.monotonic()
            response = await self._post(payload)
            latency_ms = int((time.monotonic() - started) * 1000)
        if response.status_code != 200:
            await self._raise_for_status(response)
        return self._result(response, options, latency_ms)

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
            raise TransientEngineError(f"Cannot connect to {self.shown_url}: {redact_urls(str(error)) or 'connection refused'}.") from None
        except httpx.TransportError as error:
            raise TransientEngineError(
                f"The connection to {self.shown_url} failed: {redact_urls(str(error)) or type(error).__name__}."
            ) from None

    async def _raise_for_status(self, response: httpx.Response) -> None:
        status = response.status_code
        detail = _error_detail(response)
        if status == 429:
            raise TransientEngineError(
                f"The server is busy (429 Too Many Requests): {detail}",
                retry_after=_retry_after(response),
                status=status,
            )
        if status >= 500 or status == 408:
            raise TransientEngineError(
                f"The server failed ({status}): {detail}", retry_after=_retry_after(response), status=status
            )
        if status in (401, 403):
            raise PermanentEngineError(
                f"The server at {self.shown_url} rejected the API key ({status}): check the API key in the settings.",
                status=status,
            )
        if status == 404:
            raise PermanentEngineError(await self._not_found_message(detail), status=status)
        raise RequestRejected(f"The server rejected this page's request ({status}): {detail}", status=status)

    async def _not_found_message(self, detail: str) -> str:
        served = await self.served_models()
        if served is None:
            return f"No OpenAI-compatible API at {self.shown_url} (404): {detail}"
        names = ", ".join(served) or "nothing"
        return f"The server does not serve model '{self.model}' (it serves: {names})."

    async def served_models(self) -> list[str] | None:
        """The model names the server lists, or None if it cannot say."""
        try:
            response = await self._client.get(f"{self.base_url}/models", headers=self._headers)
            if response.status_code != 200:
                return None
            return [str(item["id"]) for item in response.json().get("data", [])]
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def _result(self, response: httpx.Response, options: OCRConfig, latency_ms: int) -> PageResult:
        try:
            body = response.json()
            choice = body["choices"][0]
            text = choice["message"].get("content") or ""
            finish_reason = choice.get("finish_reason") or ""
            usage = body.get("usage") or {}
            input_tokens = int(usage.get("prompt_tokens") or 0)
            output_tokens = int(usage.get("completion_tokens") or 0)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise TransientEngineError(
                f"The server's answer is not an OpenAI chat completion: {response.text[:ERROR_DETAIL_CHARS]!r}"
            ) from None
        rejected = dict(
            text=text,
            finish_reason=finish_reason,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            latency_ms=latency_ms,
        )
        if finish_reason == "length":
            raise OutputRejected(
                f"The answer was cut off at max_tokens ({options.max_tokens} tokens).", **rejected
            )
        metadata: dict[str, Any] = {}
        if options.prompt_preset == "olmocr":
            try:
                metadata, text = parse_olmocr(text)
            except UnparsableOutput as error:
                raise OutputRejected(f"The answer is not in olmOCR's format: {error}.", **rejected) from None
        else:
            text = clean_markdown(text)
        return PageResult(
            text=text,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            latency_ms=latency_ms,
            finish_reason=finish_reason,
            metadata=metadata,
        )
