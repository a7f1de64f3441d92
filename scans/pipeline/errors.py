"""What can go wrong when an engine OCRs a page, sorted by what the caller should do about it."""

from __future__ import annotations


class EngineError(Exception):
    """Base class; `str(error)` is a message fit to show a person."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TransientEngineError(EngineError):
    """Connection refused/reset, timeout, 429, 5xx: the same request may well succeed later.
    Retry with backoff, waiting at least `retry_after` seconds when the server said so."""

    def __init__(self, message: str, *, retry_after: float | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status


class OutputRejected(EngineError):
    """The server answered, but the answer is unusable (cut off at max_tokens, or not in the
    format the prompt asked for). Retry with a higher temperature. `text` is the rejected output."""

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


class RequestRejected(EngineError):
    """The server refused this page's request (a 4xx other than a bad key or an unknown model, e.g. the
    page does not fit the model's context): sending it again unchanged cannot help, but other pages
    may well succeed, so only this page fails."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class UnparsableOutput(ValueError):
    """Model output that lacks the structure the prompt asked for (e.g. olmOCR's front matter)."""


class PermanentEngineError(EngineError):
    """Bad API key, unknown model, no server configured: no page can succeed, so the scan fails."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
