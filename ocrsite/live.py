"""The live-event transport both apps use: publish typed payloads to Channels groups, and the WebSocket
consumer base that serves them.

Rules (DESIGN.md, "Live events"):
- events go out after the write they describe has committed (`publish_on_commit` for sync code);
- channel layers deliver at most once, so every connection gets a full snapshot on connect and on a
  `{"type": "resync"}` from the browser, and an event whose data was read before that snapshot is dropped;
- publishing never raises into the caller: a channel-layer outage must not break OCR or a request;
- a frame the browser should not have sent (not JSON, not an object, binary, an unknown type) is answered
  with a `socket.error` and the socket stays open; the log gets one line per LOG_INTERVAL_S, no traceback;
- signing out closes the sockets opened with that session (4401), so no page text streams on after it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypedDict, TypeVar

from asgiref.sync import async_to_sync, sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.layers import get_channel_layer
from django.db import transaction

logger = logging.getLogger(__name__)

SEND_TIMEOUT_S = 5.0
EVENT_HANDLER = "live.event"  # consumers implement `live_event`
CLOSE_HANDLER = "live.close"  # consumers implement `live_close`
CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
LOG_INTERVAL_S = 60.0  # refused frames: at most one log line per interval


class SocketErrorEvent(TypedDict):
    """The answer to a frame the socket cannot use; the socket stays open."""

    type: Literal["socket.error"]
    message: str


LIVE_EVENT_TYPES: tuple[type, ...] = (SocketErrorEvent,)

Message = tuple[str, Mapping[str, Any]]  # (group, payload)
Build = Callable[[], list[Message]]  # sync: reads the database, returns what to send

_background: set[asyncio.Task] = set()
T = TypeVar("T")

# The reads behind snapshots and totals run on threads of their own. By default sync_to_async (and
# Django's async ORM) use one thread per process, which also carries the OCR runner's writes: a browser's
# snapshot would queue behind them, and page commits behind a burst of snapshots. Each of these threads
# keeps its own database connection (readers do not block SQLite's WAL writer).
_reads = ThreadPoolExecutor(max_workers=2, thread_name_prefix="live-read")


async def read(function: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run a sync database read for live events or a snapshot off the event loop, on the read threads."""
    return await sync_to_async(function, thread_sensitive=False, executor=_reads)(*args, **kwargs)


async def send(messages: Iterable[Message], *, read_at: float) -> None:
    """Send each payload to its group within SEND_TIMEOUT_S. `read_at` (epoch seconds, taken before the
    payloads' data was read) lets a consumer drop events older than the snapshot it has sent.
    Raises what the channel layer raises."""
    layer = get_channel_layer()
    if layer is None:
        return
    for group, payload in messages:
        message = {"type": EVENT_HANDLER, "payload": payload, "read_at": read_at}
        await asyncio.wait_for(layer.group_send(group, message), SEND_TIMEOUT_S)


async def publish(messages: Iterable[Message], *, read_at: float, what: str) -> None:
    """`send`, logging instead of raising; `what` names the subject in the log line."""
    try:
        await send(messages, read_at=read_at)
    except Exception:
        logger.warning("Could not publish %s", what, exc_info=True)


async def publish_built(build: Build, *, what: str) -> None:
    """Read the payloads with `build` (off the event loop), then publish them. Never raises."""
    read_at = time.time()
    try:
        messages = await read(build)
    except Exception:
        logger.warning("Could not read %s to publish it", what, exc_info=True)
        return
    await publish(messages, read_at=read_at, what=what)


def spawn(coroutine) -> None:
    """Run a publishing coroutine in the background of the running loop, keeping a reference to it."""
    task = asyncio.get_running_loop().create_task(coroutine)
    _background.add(task)
    task.add_done_callback(_background.discard)


def publish_now(build: Build, *, what: str) -> None:
    """From sync code: build and publish at once. Never raises.

    On an event loop's thread (sync code called from async code) it may neither query the database nor
    block, so it schedules the work on that loop instead."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        spawn(publish_built(build, what=what))
        return
    read_at = time.time()
    try:
        messages = build()
        # In a sync view's thread under ASGI, async_to_sync runs this on the server's loop (where the
        # in-memory channel layer lives); in a plain thread it runs on a loop of its own.
        async_to_sync(send)(messages, read_at=read_at)
    except Exception:
        logger.warning("Could not publish %s", what, exc_info=True)


def publish_on_commit(build: Build, *, what: str) -> None:
    """From sync code inside (or outside) a transaction: publish once it commits. Never raises."""
    try:
        transaction.on_commit(lambda: publish_now(build, what=what))
    except Exception:
        logger.warning("Could not schedule publishing %s", what, exc_info=True)


def session_group(session_key: str) -> str:
    """The group of every live socket opened with this session (the key itself stays out of the layer)."""
    return "session-" + hashlib.sha256(session_key.encode()).hexdigest()[:32]


def close_session_sockets(session_key: str) -> None:
    """From sync code: close every live socket of this session with 4401. Never raises."""
    layer = get_channel_layer()
    if layer is None:
        return
    message = {"type": CLOSE_HANDLER, "code": CLOSE_UNAUTHENTICATED}
    try:
        async_to_sync(layer.group_send)(session_group(session_key), message)
    except Exception:
        logger.warning("Could not close the live sockets of a session that signed out", exc_info=True)


def close_sockets_on_logout(sender, request, user, **kwargs) -> None:
    """`user_logged_out` receiver (connected in `ocrsite.apps`); Django sends it before the session ends."""
    session_key = getattr(getattr(request, "session", None), "session_key", None)
    if session_key:
        close_session_sockets(session_key)


@dataclass
class _LogThrottle:
    """One log line per `interval` seconds; the lines left out in between are counted in the next one."""

    interval: float
    next_at: float = 0.0
    left_out: int = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now < self.next_at:
            self.left_out += 1
            return
        if self.left_out:
            message, args = message + " (and %d more in the previous %g s)", (*args, self.left_out, self.interval)
        self.left_out, self.next_at = 0, now + self.interval
        logger.warning(message, *args)


_refused_frames = _LogThrottle(LOG_INTERVAL_S)


class LiveConsumer(AsyncJsonWebsocketConsumer):
    """Joins the groups `authorize` names (and its session's group), sends `snapshot()`, then forwards newer
    `live.event`s until `live.close` or the browser closes.

    Subclasses implement `authorize(user) -> groups | None` (None: forbidden) and `snapshot()`. The browser
    may send `{"type": "resync"}` (a new snapshot); anything else is answered with a `socket.error`."""

    groups_joined: list[str]
    snapshot_started: float = 0.0
    closing: bool = False

    async def dispatch(self, message: dict) -> None:
        # Channels closes stale DB connections before every handler, through the one thread-sensitive
        # executor where it queues behind the runner's writes; forwarding an event touches no database.
        if message.get("type") == EVENT_HANDLER:
            await self.live_event(message)
            return
        await super().dispatch(message)

    async def connect(self) -> None:
        self.groups_joined = []
        user = self.scope.get("user")
        # Accept, then close with a code: a refused handshake reaches the browser as a bare 1006, and
        # live.js needs the code to know that reconnecting will not help.
        await self.accept()
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.user = user
        groups = await self.authorize(user)
        if groups is None:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        session_key = getattr(self.scope.get("session"), "session_key", None)
        for group in [*groups, *([session_group(session_key)] if session_key else [])]:
            await self.channel_layer.group_add(group, self.channel_name)
            self.groups_joined.append(group)
        await self.send_snapshot()

    async def disconnect(self, code: int) -> None:
        for group in getattr(self, "groups_joined", []):
            await self.channel_layer.group_discard(group, self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs) -> None:
        if text_data is None:
            await self.refuse_frame("binary frames are not accepted")
            return
        try:
            content = json.loads(text_data)
        except ValueError:
            await self.refuse_frame("the frame is not JSON")
            return
        if not isinstance(content, dict):
            await self.refuse_frame("the frame is not a JSON object")
            return
        await self.receive_json(content)

    async def receive_json(self, content: dict, **kwargs) -> None:
        if content.get("type") == "resync":
            await self.send_snapshot()
        else:
            await self.refuse_frame(f"unknown message type {str(content.get('type'))[:40]!r}")

    async def refuse_frame(self, reason: str) -> None:
        _refused_frames.warning("Refused a WebSocket frame on %s: %s", self.scope.get("path", "?"), reason)
        await self.send_json(SocketErrorEvent(type="socket.error", message=f"{reason}; send {{\"type\": \"resync\"}}."))

    async def live_close(self, message: dict) -> None:
        self.closing = True
        await self.close(code=message.get("code", CLOSE_UNAUTHENTICATED))

    async def send_snapshot(self) -> None:
        self.snapshot_started = time.time()
        snapshot = await self.snapshot()
        if snapshot:  # empty when the subject vanished and the socket was closed
            await self.send_json(snapshot)

    async def live_event(self, message: dict) -> None:
        # An event whose data was read before this connection's snapshot is already in the snapshot (or
        # superseded by it); forwarding it would show an older state.
        if self.closing or message.get("read_at", float("inf")) < self.snapshot_started:
            return
        await self.forward(message["payload"])

    async def forward(self, payload: dict) -> None:
        await self.send_json(payload)

    async def authorize(self, user) -> list[str] | None:
        raise NotImplementedError

    async def snapshot(self) -> Mapping[str, Any]:
        raise NotImplementedError
