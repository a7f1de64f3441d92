"""What can go wrong when an engine OCRs a page, sorted by what the caller should do about it."""

from __future__ import annotations

from typing import Literal


class EngineError(Exception):
    """Base class; `str(error)` is a message fit to show a person."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TransientEngineError(EngineError):
    """Connection refused/reset, timeout, 429, 5xx: the same request may well succeed later.
    Retry with backoff, waiting at least `retry_after` seconds when the server said so.
    `connection_lost`: the connection failed or broke before an answer (refused, reset, the server died
    mid-request): with several model servers the request goes to another one, not counted as an attempt."""

    def __init__(
        self, message: str, *, retry_after: float | None = None, status: int | None = None, connection_lost: bool = False
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status
        self.connection_lost = connection_lost


class AnsweredError(EngineError):
    """An error about an answer that arrived: what it said (`text`) and what it cost are kept with it,
    so the page's tokens count it and a page that fails keeps its last output."""

    def __init__(
        self,
        message: str,
        *,
        text: str = "",
        finish_reason: str = "",
        input_tokens: int = 0,
        output_tokens: int = 0,
        latency_ms: int = 0,
    ) -> None:
        super().__init__(message)
        self.text = text
        self.finish_reason = finish_reason
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.latency_ms = latency_ms


class OutputRejected(AnsweredError):
    """The server answered, but the answer is unusable (cut off at max_tokens, or not in the
    format the prompt asked for). Retry with a higher temperature. `text` is the rejected output."""


class EmptyAnswer(OutputRejected):
    """The model answered with no text at all. Fine for a blank page; for any other, retried and, if it
    stays empty, the page is done with an "empty" warning."""


class ReasoningOnly(OutputRejected):
    """A reasoning ("thinking") model answered with its reasoning and no transcription. Reasoning is
    never page text (`text` is empty); retried, then the page fails with advice."""


class RepetitiveOutput(OutputRejected):
    """The model looped (a line or phrase repeated until max_tokens). `text` is the answer with the
    repeats collapsed; retried at a higher temperature, then kept with a "repetition" warning."""


class RequestRejected(EngineError):
    """The server refused this page's request (a 4xx other than a bad key or an unknown model, e.g. the
    page does not fit the model's context): sending it again unchanged cannot help, but other pages
    may well succeed, so only this page fails."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


ContextOverflow = Literal["prompt", "max_tokens", "answer"]


class ContextLimitExceeded(AnsweredError):
    """The page does not fit the model's context (vLLM's `max_model_len`): its prompt (the image's tokens
    plus the text) is too long, the `max_tokens` asked for do not fit beside it (both a 400), or the
    answer was cut off by the context rather than by `max_tokens` (`too_long` "answer", with its text and
    tokens). A smaller image and fewer `max_tokens` may fit, so the page is retried that way first.

    `max_model_len` and `prompt_tokens` are what the server said (None when it did not say);
    `max_tokens` is what was asked for; `answer` (keyword arguments of AnsweredError) the answer the
    context cut off, if any."""

    def __init__(
        self,
        message: str,
        *,
        too_long: ContextOverflow,
        max_model_len: int | None = None,
        prompt_tokens: int | None = None,
        max_tokens: int | None = None,
        status: int | None = 400,
        **answer,
    ) -> None:
        super().__init__(message, **answer)
        self.too_long = too_long
        self.max_model_len = max_model_len
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.status = status


class UnparsableOutput(ValueError):
    """Model output that lacks the structure the prompt asked for (e.g. olmOCR's front matter)."""


class PermanentEngineError(EngineError):
    """Bad API key, unknown model, no server configured: no page can succeed, so the scan fails."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
