"""Request limits that hold before a body is read: its size per path, and how slowly it may arrive.

`RequestLimits` wraps the whole ASGI application. For an HTTP request it
- answers 413 at once, reading nothing, when `Content-Length` is over the path's limit;
- stops a streamed (chunked) body as soon as it passes the limit, and answers 413;
- answers 408 when the body does not progress by `BODY_PROGRESS_BYTES` within
  `settings.OCRSITE_BODY_TIMEOUT_MS` (a client trickling a few bytes a second is cut off, a slow but
  real upload is not: 64 KiB per 20 s is 3.2 KB/s);
- answers 507 when the application fails on a full disk before it answered (Django spools a body
  to a temporary file before any view runs).
The application then sees `http.disconnect`, as if the client had gone (Django drops the request).
Headers are the server's job: `manage.py serve` gives Granian `settings.OCRSITE_HEADER_TIMEOUT_MS`.

Limits per path: `settings.OCRSITE_BODY_LIMITS`, a list of `(path prefix, bytes)`, the first match
wins; any other path gets `settings.DATA_UPLOAD_MAX_MEMORY_SIZE`, Django's own limit for a body
without files.

`MultipartErrorsMiddleware` is the Django side for upload forms (too many files, a full disk).
"""

from __future__ import annotations

import asyncio
import errno
import html
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from asgiref.sync import markcoroutinefunction, sync_to_async
from django.conf import settings
from django.contrib import messages
from django.core.exceptions import TooManyFilesSent
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

BODY_PROGRESS_BYTES = 64 * 1024
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
MB = 1024 * 1024


def body_limit(path: str) -> int:
    """The largest body, in bytes, accepted for `path`."""
    for prefix, limit in settings.OCRSITE_BODY_LIMITS:
        if path.startswith(prefix):
            return limit
    return settings.DATA_UPLOAD_MAX_MEMORY_SIZE


def _megabytes(size: int) -> str:
    return f"{size / MB:.1f} MB"


@dataclass(frozen=True)
class _Refusal:
    status: int
    message: str


class _Body:
    """The request's `receive`, cut off (as a disconnect) at the size limit or when the body stalls."""

    def __init__(self, receive: Receive, limit: int, timeout_s: float) -> None:
        self._receive = receive
        self._limit = limit
        self._timeout_s = timeout_s
        self._received = 0
        self._progress_mark = 0
        self._deadline = time.monotonic() + timeout_s
        self._complete = False
        self.refusal: _Refusal | None = None

    async def receive(self) -> Message:
        if self._complete or self.refusal is not None:
            return await self._receive()  # after the body: only http.disconnect comes
        try:
            message = await asyncio.wait_for(self._receive(), max(0.0, self._deadline - time.monotonic()))
        except TimeoutError:
            self.refusal = _Refusal(
                408,
                f"The request body arrived too slowly (less than {BODY_PROGRESS_BYTES // 1024} KiB in "
                f"{self._timeout_s:g} s); the connection was closed.",
            )
            return {"type": "http.disconnect"}
        if message["type"] != "http.request":
            return message
        self._received += len(message.get("body", b""))
        if self._received > self._limit:
            self.refusal = _Refusal(
                413, f"The request body is larger than {_megabytes(self._limit)}, the limit for this address."
            )
            return {"type": "http.disconnect"}
        if self._received - self._progress_mark >= BODY_PROGRESS_BYTES:
            self._progress_mark = self._received
            self._deadline = time.monotonic() + self._timeout_s
        self._complete = not message.get("more_body", False)
        return message


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server rejects a malformed length itself
    return None


def _wants_html(scope: Scope) -> bool:
    return any(name == b"accept" and b"text/html" in value for name, value in scope.get("headers", ()))


async def _answer(scope: Scope, send: Send, refusal: _Refusal) -> None:
    """A short error page (HTML for browsers) that also closes the connection: its body may be unread."""
    if _wants_html(scope):
        text = html.escape(refusal.message)
        body = f"<!doctype html><title>{refusal.status}</title><h1>{refusal.status}</h1><p>{text}</p>\n"
        content_type = b"text/html; charset=utf-8"
    else:
        body = refusal.message + "\n"
        content_type = b"text/plain; charset=utf-8"
    data = body.encode()
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(data)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class RequestLimits:
    """ASGI middleware enforcing the body limits above; WebSocket and lifespan pass straight through."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = body_limit(scope["path"])
        length = _content_length(scope)
        if length is not None and length > limit:
            await _answer(scope, send, _Refusal(
                413, f"The request body is {_megabytes(length)}; this address accepts at most {_megabytes(limit)}.",
            ))
            return
        body = _Body(receive, limit, settings.OCRSITE_BODY_TIMEOUT_MS / 1000)
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self.app(scope, body.receive, tracked_send)
        except OSError as exc:
            if started or exc.errno not in DISK_FULL:
                raise
            body.refusal = _Refusal(507, "The server's disk is full; nothing was stored. Try again later.")
        if body.refusal is not None and not started:
            await _answer(scope, send, body.refusal)


class MultipartErrorsMiddleware:
    """A form POST whose files Django cannot take goes back to its page with a message, instead of
    Django's bare "400 Bad Request" (more files than `DATA_UPLOAD_MAX_NUMBER_FILES`) or a 500 (a
    full disk while the files are written to `FILE_UPLOAD_TEMP_DIR`). Put it before
    CsrfViewMiddleware, the first reader of the form."""

    async_capable = True
    sync_capable = False

    def __init__(self, get_response: Callable[[HttpRequest], Awaitable[HttpResponse]]) -> None:
        self.get_response = get_response
        markcoroutinefunction(self)

    async def __call__(self, request: HttpRequest) -> HttpResponse:
        return await self.get_response(request)

    async def process_view(self, request: HttpRequest, view, args, kwargs) -> HttpResponse | None:
        if request.method != "POST" or not request.content_type.startswith("multipart/"):
            return None
        try:
            # Parses the form once for every later reader; off the loop, and not queued behind the
            # thread-sensitive executor's database work.
            await sync_to_async(lambda: request.POST, thread_sensitive=False)()
        except TooManyFilesSent:
            message = (
                f"Too many files at once: one upload takes at most {settings.DATA_UPLOAD_MAX_NUMBER_FILES}. "
                "Nothing was uploaded; choose fewer files."
            )
        except OSError as exc:
            if exc.errno not in DISK_FULL:
                raise
            message = "The server's disk is full; nothing was uploaded. Try again later."
        else:
            return None
        # The file being written when parsing stopped is held open by its upload handler: closing
        # it deletes its temporary file (Django itself does this only when a handler stops the upload).
        for handler in request.upload_handlers:
            if getattr(handler, "file", None) is not None:
                handler.file.close()
        messages.error(request, message)
        return HttpResponseRedirect(request.get_full_path(), status=303)
